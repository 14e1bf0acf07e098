"""The policy update: packed micro-batches, the loss through ``dler_kernels``, FSDP2, AdamW.

One optimizer step consumes a *mini-batch* of responses. It is split into *micro-batches* by a
token budget; each micro-batch is a few whole sequences packed into one row without padding
(position ids restart per sequence, so transformers builds a block-diagonal causal mask).
Only the positions that predict response tokens get logits (``logits_to_keep``); with
``fused_head`` not even those: the LM head's forward is swapped, for the duration of one call, for
``dler_kernels.linear_policy_loss`` (or ``linear_token_logprobs``) on the hidden states, so no
[N, V] tensor is made and the head's weight is used where FSDP2 has it unsharded (inside the
root's forward). The loss is normalised by the *global* count of the mini-batch (tokens for
``token-mean``, sequences for ``seq-mean-*``) summed over micro-batches and ranks, so
accumulation and data parallelism give the gradient of one big batch exactly. FSDP2 is told to
sum gradients (divide factor 1) for the same reason.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import dler_kernels as dk

from .chunking import chunks_by_size
from .collective import reduce_scalar


@dataclass
class UpdateRow:
    """One response as the update sees it."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    old_logprobs: torch.Tensor | None = None  # [len(response_ids)], from compute_logprobs
    ref_logprobs: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Consecutive runs of rows whose total length fits ``token_budget`` (a row longer than the
    budget gets a micro-batch of its own). In order, so the plan is deterministic."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    return list(chunks_by_size(range(len(lengths)), lengths.__getitem__, token_budget))


def _synced_plan(rows: Sequence[UpdateRow], token_budget: int, device: torch.device) -> list[list[int] | None]:
    """The micro-batch plan, padded with ``None`` (a dummy forward) up to the largest plan of any rank.

    Under FSDP2 every forward all-gathers parameters, so every rank must run the same number of
    forwards; ranks with fewer tokens run dummy ones whose loss is multiplied by zero."""
    plan: list[list[int] | None] = list(plan_micro_batches([r.tokens for r in rows], token_budget))
    most = int(reduce_scalar(len(plan), device, dist.ReduceOp.MAX))
    return plan + [None] * (most - len(plan))


# One token predicting itself: the cheapest forward that takes part in FSDP's collectives.
_DUMMY_ROW = UpdateRow(prompt_ids=[0], response_ids=[0], advantage=0.0, old_logprobs=torch.zeros(1))


@dataclass
class Packed:
    """Sequences packed into one row, and the positions whose next token is a response token."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    loss_positions: torch.Tensor  # [N] indices into T
    targets: torch.Tensor  # [N] the response tokens
    seq_ids: torch.Tensor  # [N] which row of the micro-batch each token belongs to
    advantages: torch.Tensor  # [N]
    rows: list[UpdateRow]

    @classmethod
    def of(cls, rows: Sequence[UpdateRow], device: torch.device) -> Packed:
        ids, pos, loss_pos, seq, adv = [], [], [], [], []
        start = 0
        for r, row in enumerate(rows):
            p, n = len(row.prompt_ids), len(row.response_ids)
            if p < 1:
                raise ValueError("every row needs at least one prompt token (the first response token is predicted)")
            ids += row.prompt_ids + row.response_ids
            pos += range(p + n)
            # position t predicts token t + 1: response token j sits at start + p + j
            loss_pos += range(start + p - 1, start + p + n - 1)
            seq += [r] * n
            adv += [row.advantage] * n
            start += p + n

        def tensor(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=device)

        return cls(
            input_ids=tensor(ids)[None],
            position_ids=tensor(pos)[None],
            loss_positions=tensor(loss_pos),
            targets=tensor([t for row in rows for t in row.response_ids]),
            seq_ids=tensor(seq),
            advantages=tensor(adv, torch.float32),
            rows=list(rows),
        )

    def through_head(self, model, head_fn) -> torch.Tensor:
        """Runs ``model`` with its LM head replaced by ``head_fn(hidden [N, H], weight, bias)`` at the
        response positions; returns what ``head_fn`` returned (HF passes it through as ``logits``)."""
        head = model.get_output_embeddings()

        def forward(hidden):
            weight, bias = head.weight, head.bias
            if weight.dtype != hidden.dtype:  # e.g. fp32 master weights, bf16 activations: a differentiable cast
                weight = weight.to(hidden.dtype)
                bias = bias.to(hidden.dtype) if bias is not None else None
            return head_fn(hidden[0], weight, bias)

        head.forward = forward
        try:
            return self._forward(model)
        finally:
            del head.forward

    def response_logits(self, model) -> torch.Tensor:
        """[N, V] logits of the response positions only: the rest of the T x V never exists."""
        return self._forward(model)[0]

    def _forward(self, model) -> torch.Tensor:
        """The model's output (``logits``) at the response positions of the packed row."""
        return model(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            logits_to_keep=self.loss_positions,
            use_cache=False,
        ).logits


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


@torch.no_grad()
def compute_logprobs(
    model,
    rows: Sequence[UpdateRow],
    *,
    token_budget: int,
    temperature: float,
    device: torch.device | None = None,
    fused_head: bool = False,
) -> list[torch.Tensor]:
    """The model's log-probs of each row's response tokens at ``temperature`` (one CPU tensor per row,
    in row order), with the no-grad kernel (no autograd graph, no N x V kept; with ``fused_head`` no
    N x V at all)."""
    device = device or _device_of(model)
    was_training = model.training
    out: list[torch.Tensor | None] = [None] * len(rows)
    model.eval()
    try:
        for plan in _synced_plan(rows, token_budget, device):
            if plan is None:
                Packed.of([_DUMMY_ROW], device).response_logits(model)
                continue
            packed = Packed.of([rows[i] for i in plan], device)
            if fused_head:
                head = functools.partial(_logprob_head, targets=packed.targets, temperature=temperature)
                logp = packed.through_head(model, head)
            else:
                logp = dk.token_logprobs(packed.response_logits(model), packed.targets, temperature=temperature)
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
) -> dict[str, float]:
    """Forward + backward of one mini-batch over its micro-batches; gradients accumulate in
    ``.grad``. ``loss`` holds the keyword arguments of ``dler_kernels.policy_loss`` that a run
    fixes (``TrainConfig.policy_loss_kwargs()``). ``fused_head``: the loss from the hidden states
    and the LM head weight (``dler_kernels.linear_policy_loss``, see ``fused_head_unsupported``).
    Returns the mini-batch's loss and metrics (token-weighted means over ranks)."""
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
    totals: dict[str, float] = {}
    for plan in _synced_plan(rows, token_budget, device):
        if plan is None:
            (Packed.of([_DUMMY_ROW], device).response_logits(model).sum() * 0.0).backward()
            continue
        packed = Packed.of([rows[i] for i in plan], device)
        old = torch.cat([rows[i].old_logprobs for i in plan]).to(device)
        ref = torch.cat([rows[i].ref_logprobs for i in plan]).to(device) if beta > 0 else None
        mask = torch.ones_like(packed.targets, dtype=torch.bool)
        kwargs = dict(ref_logprobs=ref, seq_ids=packed.seq_ids, normalizer=normalizer, **loss)
        if fused_head:
            outputs = []
            head = functools.partial(_loss_head, packed=packed, old=old, mask=mask, kwargs=kwargs, outputs=outputs)
            packed.through_head(model, head).sum().backward()
            out = outputs[-1]
        else:
            out = dk.policy_loss(packed.response_logits(model), packed.targets, old, packed.advantages, mask, **kwargs)
            out.loss.backward()
        n = float(packed.targets.numel())
        _add(totals, "loss", float(out.loss.detach()))  # already globally normalised: sums to the batch loss
        _add(totals, "tokens", n)
        for key in TOKEN_MEAN_METRICS:
            if key in out.metrics:
                _add(totals, key, float(out.metrics[key]) * n)
        _add(totals, "num_nonfinite", float(out.metrics["num_nonfinite"]))
        totals["ratio_max"] = max(totals.get("ratio_max", -math.inf), float(out.metrics["ratio_max"]))
        totals["ratio_min"] = min(totals.get("ratio_min", math.inf), float(out.metrics["ratio_min"]))
    return _reduce_metrics(totals, device)


def _logprob_head(hidden, weight, bias, *, targets, temperature):
    return dk.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)


def _loss_head(hidden, weight, bias, *, packed, old, mask, kwargs, outputs):
    out = dk.linear_policy_loss(hidden, weight, packed.targets, old, packed.advantages, mask, bias=bias, **kwargs)
    outputs.append(out)
    # Returned as the model's output, so that FSDP2's backward hooks fire; a copy, not a view (FSDP2
    # warns that an in-place op on a returned view would drop its hook).
    return out.loss.reshape(1, 1, 1).clone()


# The kernel's per-call token means; weighted by tokens here to give the mini-batch's means.
TOKEN_MEAN_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "entropy", "kl_ref")


def _add(totals: dict, key: str, value: float) -> None:
    totals[key] = totals.get(key, 0.0) + value


def _reduce_metrics(totals: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = ["loss", "tokens", "num_nonfinite"] + [k for k in TOKEN_MEAN_METRICS if k in totals]
    world = {k: reduce_scalar(totals.get(k, 0.0), device, dist.ReduceOp.SUM) for k in keys}
    tokens = max(world["tokens"], 1.0)
    out = {"loss": world["loss"], "tokens": world["tokens"], "num_nonfinite": world["num_nonfinite"]}
    out.update({k: world[k] / tokens for k in TOKEN_MEAN_METRICS if k in world})
    out["ratio_max"] = reduce_scalar(totals.get("ratio_max", -math.inf), device, dist.ReduceOp.MAX)
    out["ratio_min"] = reduce_scalar(totals.get("ratio_min", math.inf), device, dist.ReduceOp.MIN)
    return out


def full_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-named full tensors, one at a time (an all-gather each under FSDP2: every rank
    must iterate), for the rollout engine or a checkpoint."""
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        yield name, (t.detach().to(dtype) if dtype is not None else t.detach())
