"""The LM head stood in for during one forward: by a function of the hidden states and the head's weight
(a ``dler_kernels`` ``linear_*`` kernel: the fused head), and whether a model allows it; or by the same
matmul in float32 (``fp32_head_logits``: the logits path's fp32 LM head, ``algorithm.lm_head_fp32``).

With ``fused_head`` no [N, V] tensor is made, and the head's weight is used where FSDP2 has it
unsharded (inside the root's forward).
"""

from __future__ import annotations

import contextlib

import torch

from .packing import Packed

# Model configs whose logits are not the plain LM-head output (soft-capping, scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_head_unsupported(model) -> str | None:
    """Why ``fused_head`` cannot stand in for this model's logits, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"its output embedding is {type(head).__name__}, not an nn.Linear LM head"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1.0):
            return f"its config sets {name}={value}: the logits are not the LM head's output"
    return None


def through_head(model, packed: Packed, head_fn, *, fp32_head: bool = False) -> torch.Tensor:
    """Runs ``model`` on ``packed`` with its LM head replaced by ``head_fn(hidden [N, H], weight, bias)``
    at the response positions; returns what ``head_fn`` returned (HF passes it through as ``logits``).
    ``fp32_head``: ``head_fn`` computes in float32, so a float32 weight is passed as it is (with the
    hidden states upcast) rather than cast down to the activations' dtype."""
    head = model.get_output_embeddings()

    def forward(hidden):
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:
            if fp32_head and weight.dtype == torch.float32:
                hidden = hidden.float()
            else:  # e.g. fp32 master weights, bf16 activations: a differentiable cast
                weight = weight.to(hidden.dtype)
                bias = bias.to(hidden.dtype) if bias is not None else None
        return head_fn(hidden[0], weight, bias)

    with _head_forward(head, forward):
        return packed.model_output(model)


def fp32_head_logits(model, packed: Packed) -> torch.Tensor:
    """[N, V] float32 logits of the response positions with the LM head's matmul in float32 (hidden
    states, weight and bias upcast: one float32 copy of the weight while autograd keeps it): the
    logits path's fp32 LM head. Transforms the model applies after its head (soft-capping) still apply."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"lm_head_fp32 needs an nn.Linear LM head; this model's output embedding is {type(head).__name__}"
        )

    def forward(hidden):
        bias = head.bias.float() if head.bias is not None else None
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    with _head_forward(head, forward):
        return packed.model_output(model)[0]


@contextlib.contextmanager
def _head_forward(head, forward):
    """``head`` computes ``forward`` inside the block (its hooks still run, FSDP2's included)."""
    head.forward = forward
    try:
        yield
    finally:
        del head.forward
