"""The two passes through the policy: its log-probs of the responses (no gradient), and the loss's
forward and backward over a mini-batch's micro-batches (gradients accumulate in ``.grad``).

Both run over packed micro-batches (``packing``) with the kernels of ``dler_kernels``; with
``fused_head`` the LM head is stood in for by ``dler_kernels.linear_policy_loss`` (or
``linear_token_logprobs``) on the hidden states (``fused_head``). The loss is normalised by the
*global* count of the mini-batch (tokens for ``token-mean``, sequences for ``seq-mean-*``) summed over
micro-batches and ranks, so accumulation and data parallelism give the gradient of one big batch
exactly. FSDP2 is told to sum gradients (divide factor 1) for the same reason (``fsdp``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import dler_kernels as dk

from ..dist.collective import reduce_scalar
from .fused_head import fp32_head_logits, through_head
from .loss_metrics import MiniBatchMetrics
from .packing import DUMMY_ROW, Packed, UpdateRow, synced_plan


def loss_backend(device: torch.device) -> str:
    """The name of the kernel backend that computes the loss and log-probs on ``device`` (dler_kernels'
    dispatch: ``DLER_BACKEND``, else Triton on a GPU and the C++ extension on the CPU), for the run's
    summary."""
    return dk.backend_for(torch.empty(0, device=device))


@torch.no_grad()
def compute_logprobs(
    model,
    rows: Sequence[UpdateRow],
    *,
    token_budget: int,
    temperature: float,
    device: torch.device | None = None,
    fused_head: bool = False,
    lm_head_fp32: bool = False,
) -> list[torch.Tensor]:
    """The model's log-probs of each row's response tokens at ``temperature`` (one CPU tensor per row,
    in row order), with the no-grad kernel (no autograd graph, no N x V kept; with ``fused_head`` no
    N x V at all). ``lm_head_fp32``: the LM head's matmul in float32 (both paths)."""
    device = device or _device_of(model)
    was_training = model.training
    out: list[torch.Tensor | None] = [None] * len(rows)
    model.eval()
    try:
        for plan in synced_plan(rows, token_budget, device):
            if plan is None:
                Packed.of([DUMMY_ROW], device).response_logits(model)
                continue
            packed = Packed.of([rows[i] for i in plan], device)
            if fused_head:
                head = functools.partial(
                    _logprob_head, targets=packed.targets, temperature=temperature, fp32_head=lm_head_fp32
                )
                logp = through_head(model, packed, head, fp32_head=lm_head_fp32)
            else:
                logp = dk.token_logprobs(_logits(model, packed, lm_head_fp32), packed.targets, temperature=temperature)
            for i, part in zip(plan, logp.split([len(r.response_ids) for r in packed.rows])):
                out[i] = part.cpu()
    finally:
        model.train(was_training)
    return out


def _device_of(model) -> torch.device:
    """Where the inputs go when the caller does not say. Pass ``device`` explicitly under FSDP2 CPU
    offload: the parameters then live on the CPU while the forward runs on the GPU."""
    return next(model.parameters()).device  # a DTensor reports its local shard's device


def accumulate_gradients(
    model,
    rows: Sequence[UpdateRow],
    loss: Mapping[str, Any],
    *,
    token_budget: int,
    device: torch.device | None = None,
    fused_head: bool = False,
    lm_head_fp32: bool = False,
) -> dict[str, float]:
    """Forward + backward of one mini-batch over its micro-batches; gradients accumulate in
    ``.grad``. ``loss`` holds the keyword arguments of ``dler_kernels.policy_loss`` that a run
    fixes (``TrainConfig.policy_loss_kwargs()``). ``fused_head``: the loss from the hidden states
    and the LM head weight (``dler_kernels.linear_policy_loss``, see ``fused_head_unsupported``).
    ``lm_head_fp32``: the LM head's matmul in float32 (both paths). Returns the mini-batch's loss and
    metrics (token-weighted means over ranks). Rows with a rollout correction (``UpdateRow.token_weights``
    / ``loss_mask``) pass it to the kernel as ``token_weights`` and ``mask``; the normaliser stays the count
    without it (a masked or weight-0 token leaves the numerator only, see ``trainer.rollout.correction``)."""
    beta, loss_agg = loss.get("beta", 0.0), loss.get("loss_agg", "token-mean")
    device = device or _device_of(model)
    if any(r.old_logprobs is None for r in rows):
        raise ValueError("old_logprobs missing: set them from compute_logprobs(...) before the update")
    if beta > 0 and any(r.ref_logprobs is None for r in rows):
        raise ValueError("ref_logprobs missing while beta > 0: compute them with the reference model first")
    tokens = sum(len(r.response_ids) for r in rows)
    # as the kernel counts: tokens, or sequences that have at least one token
    count = tokens if loss_agg == "token-mean" else sum(1 for r in rows if r.response_ids)
    normalizer = reduce_scalar(count, device)
    if normalizer == 0:  # only empty responses anywhere: nothing to learn from, on every rank alike
        return {}
    metrics = MiniBatchMetrics()
    for plan in synced_plan(rows, token_budget, device):
        if plan is None:
            (Packed.of([DUMMY_ROW], device).response_logits(model).sum() * 0.0).backward()
            continue
        packed = Packed.of([rows[i] for i in plan], device)
        old = torch.cat([rows[i].old_logprobs for i in plan]).to(device)
        ref = torch.cat([rows[i].ref_logprobs for i in plan]).to(device) if beta > 0 else None
        mask, weights = correction_inputs([rows[i] for i in plan], device)
        kwargs = dict(ref_logprobs=ref, seq_ids=packed.seq_ids, normalizer=normalizer, token_weights=weights, **loss)
        if fused_head:
            outputs = []
            head = functools.partial(_loss_head, packed=packed, old=old, mask=mask, kwargs=kwargs, outputs=outputs,
                                     fp32_head=lm_head_fp32)  # fmt: skip
            through_head(model, packed, head, fp32_head=lm_head_fp32).sum().backward()
            out = outputs[-1]
        else:
            logits = _logits(model, packed, lm_head_fp32)
            out = dk.policy_loss(logits, packed.targets, old, packed.advantages, mask, **kwargs)
            out.loss.backward()
        metrics.add(out.loss, packed.targets.numel(), out.metrics, valid=int(mask.sum()))
    return metrics.reduced(device)


def correction_inputs(rows: Sequence[UpdateRow], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss mask and token weights of ``rows`` packed in order: their rollout correction's
    (``UpdateRow.loss_mask`` / ``token_weights``), all-true and None (weight 1) where rows carry none."""
    n = [len(r.response_ids) for r in rows]
    masks = [r.loss_mask if r.loss_mask is not None else torch.ones(k, dtype=torch.bool) for r, k in zip(rows, n)]
    mask = torch.cat(masks).to(device) if masks else torch.ones(0, dtype=torch.bool, device=device)
    if all(r.token_weights is None for r in rows):
        return mask, None
    weights = [r.token_weights if r.token_weights is not None else torch.ones(k) for r, k in zip(rows, n)]
    return mask, torch.cat(weights).float().to(device)


def _logits(model, packed: Packed, fp32_head: bool) -> torch.Tensor:
    return fp32_head_logits(model, packed) if fp32_head else packed.response_logits(model)


def _logprob_head(hidden, weight, bias, *, targets, temperature, fp32_head):
    return dk.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, fp32_head=fp32_head)


def _loss_head(hidden, weight, bias, *, packed, old, mask, kwargs, outputs, fp32_head):
    out = dk.linear_policy_loss(hidden, weight, packed.targets, old, packed.advantages, mask, bias=bias,
                                fp32_head=fp32_head, **kwargs)  # fmt: skip
    outputs.append(out)
    # Returned as the model's output, so that FSDP2's backward hooks fire; a copy, not a view (FSDP2
    # warns that an in-place op on a returned view would drop its hook).
    return out.loss.reshape(1, 1, 1).clone()
