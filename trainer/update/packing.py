"""Rows into micro-batches: the update's row, the plan that splits a mini-batch by a token budget, and
the packed row a model reads.

One optimizer step consumes a *mini-batch* of responses. It is split into *micro-batches* by a token
budget; each micro-batch is a few whole sequences packed into one row without padding (position ids
restart per sequence, so transformers builds a block-diagonal causal mask). Only the positions that
predict response tokens get logits (``logits_to_keep``): the rest of the T x V never exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..chunking import chunks_by_size
from ..dist.collective import reduce_scalar


@dataclass
class UpdateRow:
    """One response as the update sees it."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    old_logprobs: torch.Tensor | None = None  # [len(response_ids)], from policy.compute_logprobs
    ref_logprobs: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None  # [len(response_ids)], the rollout engine's (None: it gave none)
    token_weights: torch.Tensor | None = None  # [len(response_ids)] loss weights of a rollout correction (None: 1)
    loss_mask: torch.Tensor | None = None  # [len(response_ids)] bool, False: masked by a rollout correction

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Consecutive runs of rows whose total length fits ``token_budget`` (a row longer than the
    budget gets a micro-batch of its own). In order, so the plan is deterministic."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    return list(chunks_by_size(range(len(lengths)), lengths.__getitem__, token_budget))


def synced_plan(rows: Sequence[UpdateRow], token_budget: int, device: torch.device) -> list[list[int] | None]:
    """The micro-batch plan, padded with ``None`` (a dummy forward of :data:`DUMMY_ROW`) up to the
    largest plan of any rank.

    Under FSDP2 every forward all-gathers parameters, so every rank must run the same number of
    forwards; ranks with fewer tokens run dummy ones whose loss is multiplied by zero."""
    plan: list[list[int] | None] = list(plan_micro_batches([r.tokens for r in rows], token_budget))
    most = int(reduce_scalar(len(plan), device, dist.ReduceOp.MAX))
    return plan + [None] * (most - len(plan))


# One token predicting itself: the cheapest forward that takes part in FSDP's collectives.
DUMMY_ROW = UpdateRow(prompt_ids=[0], response_ids=[0], advantage=0.0, old_logprobs=torch.zeros(1))


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

    def response_logits(self, model) -> torch.Tensor:
        """[N, V] logits of the response positions only: the rest of the T x V never exists."""
        return self.model_output(model)[0]

    def model_output(self, model) -> torch.Tensor:
        """The model's output (``logits``) at the response positions of the packed row."""
        return model(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            logits_to_keep=self.loss_positions,
            use_cache=False,
        ).logits
