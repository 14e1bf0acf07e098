"""The fused LM head: for one forward, the model's output layer stood in for by a function of the hidden
states and the head's weight (a ``dler_kernels`` ``linear_*`` kernel), and whether a model allows it.

With ``fused_head`` no [N, V] tensor is made, and the head's weight is used where FSDP2 has it
unsharded (inside the root's forward).
"""

from __future__ import annotations

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


def through_head(model, packed: Packed, head_fn) -> torch.Tensor:
    """Runs ``model`` on ``packed`` with its LM head replaced by ``head_fn(hidden [N, H], weight, bias)``
    at the response positions; returns what ``head_fn`` returned (HF passes it through as ``logits``)."""
    head = model.get_output_embeddings()

    def forward(hidden):
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:  # e.g. fp32 master weights, bf16 activations: a differentiable cast
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        return head_fn(hidden[0], weight, bias)

    head.forward = forward
    try:
        return packed.model_output(model)
    finally:
        del head.forward
