"""What an objective is: ``Objective`` (its per-token policy-gradient loss as a function of [N] vectors, the
parameters it reads and their defaults) and ``Sequences`` (the per-sequence sums a sequence-level objective needs).

The policy loss depends on the logits only through each token's log-prob (and, for the entropy bonus, its
entropy), so an objective is a differentiable function of [N] vectors: the current log-probs ``logp`` (the only
differentiated input), the old ones, the advantages, the mask and the sequence ids. The kernels need nothing else
from it: d(loss)/d(logp) per row, which autograd gives from this one definition, turns into d(loss)/d(logits)
in the backends' slab kernels. This module is a leaf of the package: it imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to +-20 before exp (e^20 ~ 5e8 keeps float32 finite; verl and TRL clamp alike)."""


def dense_ids(ids: torch.Tensor) -> torch.Tensor:
    """[N] int64 indices in [0, N) of the ids ``ids`` [N]: equal ids share one, numbered in sorted order (torch.unique's
    inverse). Unlike torch.unique, no shape depends on the values, so torch.compile traces it within one graph;
    per-id buffers then have N slots, those of no id empty."""
    sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    rank = torch.cumsum(starts, 0) - 1
    return torch.empty_like(rank).scatter_(0, order, rank)


class Sequences:
    """The sequences of the valid tokens (by ``seq_ids``): per-sequence sums and means broadcast back to tokens.
    A masked token belongs to its sequence but adds nothing; a sequence without a valid token has count 0. The
    per-sequence vectors [S] have one slot per token (``dense_ids``), the unused ones of count 0."""

    def __init__(self, seq_ids: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
        self.index = dense_ids(seq_ids)
        self.n = seq_ids.numel()  # slots, not sequences: those past the last sequence stay empty (count 0)
        self.valid = valid
        self.count = self.sum(valid.to(dtype))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[S] the sum of ``x`` over each sequence's valid tokens (differentiable)."""
        x = torch.where(self.valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x.new_zeros(self.n).index_add(0, self.index, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """[S] the mean of ``x`` over each sequence's valid tokens (0 for a sequence without one)."""
        return self.sum(x) / torch.clamp(self.count, min=1.0)

    def per_token(self, s: torch.Tensor) -> torch.Tensor:
        """[N] each token's sequence value of the [S] vector ``s``."""
        return s[self.index]


@dataclass(frozen=True)
class Objective:
    """One policy objective: ``pg(logp, old, adv, valid, seqs, p)`` -> the per-token policy-gradient loss [N]
    (differentiable in ``logp``; masked rows are zeroed by the caller). ``p`` maps each parameter the objective
    reads to its value; ``seqs`` is a :class:`Sequences` for a sequence-level objective, None for a token-local one.
    The loss of a batch is the aggregation (``loss_agg``) of these per-token values, plus the KL and entropy terms,
    which are the same for every objective."""

    name: str
    pg: Callable[..., torch.Tensor]
    defaults: Mapping[str, object] = field(default_factory=dict)
    """The parameters it reads, with their defaults (the paper's, or the library named in its docstring)."""
    sequence_level: bool = False
    """Whether a token's loss depends on other tokens of its sequence (it then needs ``seq_ids``)."""
    kernel_code: int | None = None
    """Its code in the fused one-pass kernels (the token-local objectives: ``csrc/policy_loss_math.h``
    ``ObjectiveCode``, the Triton row kernel's ``OBJECTIVE``), which compute the same formula; None: no fused
    kernel, the two passes of ``objective_path`` (log-probs, the objective on them, the slab gradient)."""
    paper: str = ""

    @property
    def fused(self) -> bool:
        return self.kernel_code is not None
