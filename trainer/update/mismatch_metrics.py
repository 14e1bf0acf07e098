"""The trainer-sampler mismatch of a step's batch, measured every step: how far the rollout engine's
log-probs of the sampled tokens are from the trainer's old log-probs of the same tokens, and, under a
rollout correction (``trainer.rollout.correction``), how much of the batch it masked and how it weighed
the rest.

Each rank sums its own responses into a :class:`MismatchSums`; the step's record merges every rank's
(``trainer.run.step_metrics`` gathers them with the rest of the step's statistics), so the figures are those
of the global batch. The keys, all over the response tokens of the batch (``d = log pi_trainer_old -
log pi_sampler`` per token, the log of the correction's ratio ``rho``):

* ``mismatch_logp_abs_mean``, ``mismatch_logp_abs_max``: mean and max of ``|d|``;
* ``mismatch_kl_k1``, ``mismatch_kl_k3``: the k1 (``mean(-d)``) and k3 (``mean(rho - 1 - d)``, always >= 0)
  estimates of KL(sampler || trainer), the tokens being samples of the sampler;
* ``mismatch_ratio_outside``: the fraction of tokens whose ratio leaves [0.5, 2];
* ``mismatch_seq_log_ratio_min``, ``mismatch_seq_log_ratio_max``: the extremes over responses of
  ``sum_t d`` (the log of the response's whole-sequence ratio);
* ``mismatch_log_ppl_diff``, ``mismatch_ppl_ratio``: per response, the log of the trainer's perplexity over
  the sampler's, ``-mean_t d``, and that ratio, ``exp(-mean_t d)`` (1 / the geometric mean of its ratios
  ``rho``), each averaged over the non-empty responses: verl's ``log_ppl_diff`` and ``ppl_ratio`` (> 0 and
  > 1 where the trainer finds the responses less likely than the sampler did);
* under a correction only: ``mismatch_masked_frac``, the fraction of response tokens the correction
  left out (masked, or weighted 0 as ``icepop`` does), and ``mismatch_weight_mean``, the mean loss weight
  of the tokens it kept (1 where the mode only masks).

A response without the engine's log-probs (an engine that returned none) is left out; when no response
has them, or when the trainer's old log-probs were not computed (``algorithm.old_logprobs: sampler``,
the bypass), the keys are absent rather than made up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dler_kernels.reference import LOG_RATIO_CLAMP

from .packing import UpdateRow

# A token's ratio outside this band counts in mismatch_ratio_outside (verl's and TIS's usual cap of 2).
RATIO_BAND = (0.5, 2.0)


@dataclass
class MismatchSums:
    """One rank's sums over its responses (:meth:`of`), mergeable over ranks (:meth:`merge`)."""

    tokens: int = 0
    sequences: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    k1_sum: float = 0.0
    k3_sum: float = 0.0
    outside: int = 0
    seq_min: float = math.inf
    seq_max: float = -math.inf
    ppl_sequences: int = 0  # the non-empty responses, over which the two perplexity figures are averaged
    log_ppl_diff_sum: float = 0.0
    ppl_ratio_sum: float = 0.0
    corrected: bool = False
    masked: int = 0
    kept_weight_sum: float = 0.0

    @classmethod
    def of(cls, rows: Sequence[UpdateRow], *, corrected: bool) -> MismatchSums:
        """The sums of ``rows`` that have both the trainer's old log-probs and the sampler's.
        ``corrected``: a rollout correction set the rows' ``token_weights`` / ``loss_mask``."""
        rows = [r for r in rows if r.sampler_logprobs is not None and r.old_logprobs is not None]
        sums = cls(corrected=corrected)
        if not rows:
            return sums
        lengths = torch.tensor([len(r.response_ids) for r in rows])
        d = torch.cat([r.old_logprobs.double() - r.sampler_logprobs.double() for r in rows])
        clamped = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = clamped.exp()
        per_seq = torch.zeros(len(rows), dtype=torch.float64).index_add(
            0, torch.repeat_interleave(torch.arange(len(rows)), lengths), d
        )
        sums.tokens, sums.sequences = int(d.numel()), len(rows)
        if d.numel():
            sums.abs_sum, sums.abs_max = float(d.abs().sum()), float(d.abs().max())
            sums.k1_sum, sums.k3_sum = float(-d.sum()), float((ratio - 1.0 - clamped).sum())
            sums.outside = int(((ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])).sum())
        sums.seq_min, sums.seq_max = float(per_seq.min()), float(per_seq.max())
        # a response without tokens has no perplexity (verl's masked mean would count it as ratio 1)
        non_empty = lengths > 0
        log_ppl_diff = -per_seq[non_empty] / lengths[non_empty]
        sums.ppl_sequences = int(non_empty.sum())
        sums.log_ppl_diff_sum, sums.ppl_ratio_sum = float(log_ppl_diff.sum()), float(log_ppl_diff.exp().sum())
        if corrected:
            for r in rows:
                n = len(r.response_ids)
                keep = r.loss_mask if r.loss_mask is not None else torch.ones(n, dtype=torch.bool)
                ones = torch.ones(n, dtype=torch.float64)
                weights = r.token_weights.double() if r.token_weights is not None else ones
                keep = keep & (weights != 0)  # icepop leaves a token out by weight 0, not by the mask
                sums.masked += int((~keep).sum())
                sums.kept_weight_sum += float(weights[keep].sum())
        return sums

    @classmethod
    def merge(cls, parts: Sequence[MismatchSums]) -> MismatchSums:
        """Every rank's sums as one (counts and sums added, extremes kept)."""
        out = cls(corrected=any(p.corrected for p in parts))
        for p in parts:
            out.tokens += p.tokens
            out.sequences += p.sequences
            out.abs_sum += p.abs_sum
            out.abs_max = max(out.abs_max, p.abs_max)
            out.k1_sum += p.k1_sum
            out.k3_sum += p.k3_sum
            out.outside += p.outside
            out.seq_min, out.seq_max = min(out.seq_min, p.seq_min), max(out.seq_max, p.seq_max)
            out.ppl_sequences += p.ppl_sequences
            out.log_ppl_diff_sum += p.log_ppl_diff_sum
            out.ppl_ratio_sum += p.ppl_ratio_sum
            out.masked += p.masked
            out.kept_weight_sum += p.kept_weight_sum
        return out

    def as_record(self) -> dict[str, Any]:
        """The metrics.jsonl keys of the module docstring (none when no response had both log-probs)."""
        if self.sequences == 0:
            return {}
        tokens = max(self.tokens, 1)
        record = {
            "mismatch_logp_abs_mean": self.abs_sum / tokens,
            "mismatch_logp_abs_max": self.abs_max,
            "mismatch_kl_k1": self.k1_sum / tokens,
            "mismatch_kl_k3": self.k3_sum / tokens,
            "mismatch_ratio_outside": self.outside / tokens,
            "mismatch_seq_log_ratio_min": self.seq_min,
            "mismatch_seq_log_ratio_max": self.seq_max,
        }
        if self.ppl_sequences:
            record["mismatch_log_ppl_diff"] = self.log_ppl_diff_sum / self.ppl_sequences
            record["mismatch_ppl_ratio"] = self.ppl_ratio_sum / self.ppl_sequences
        if self.corrected:
            kept = self.tokens - self.masked
            record["mismatch_masked_frac"] = self.masked / tokens
            record["mismatch_weight_mean"] = self.kept_weight_sum / kept if kept else 0.0
        return record
