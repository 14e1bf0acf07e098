"""The loss metrics of one mini-batch: the kernel's figures of each micro-batch summed (token-weighted
where they are per-token means), then reduced over the ranks into the mini-batch's loss and means."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..dist.collective import reduce_values

# The kernel's per-call token means; weighted by tokens here to give the mini-batch's means.
TOKEN_MEAN_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "entropy", "kl_ref")


class MiniBatchMetrics:
    """Sums over this rank's micro-batches: the loss (already globally normalised, so the sum is the
    mini-batch's loss), tokens, non-finite counts, means weighted by the tokens they are over (the tokens a
    rollout correction left unmasked: ``valid``), and the extreme ratios."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.ratio_max, self.ratio_min = -math.inf, math.inf

    def add(
        self, loss: torch.Tensor, tokens: int, metrics: Mapping[str, torch.Tensor], valid: int | None = None
    ) -> None:
        """One micro-batch: its ``loss`` and ``metrics`` as the kernel returned them, over ``tokens``, of
        which ``valid`` (default: all) were not masked: the kernel's means are over those."""
        n = float(tokens)
        self._add("loss", float(loss.detach()))
        self._add("tokens", n)
        v = n if valid is None else float(valid)
        self._add("valid", v)
        for key in TOKEN_MEAN_METRICS:
            if key in metrics:
                self._add(key, float(metrics[key]) * v)
        self._add("num_nonfinite", float(metrics["num_nonfinite"]))
        self.ratio_max = max(self.ratio_max, float(metrics["ratio_max"]))
        self.ratio_min = min(self.ratio_min, float(metrics["ratio_min"]))

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def reduced(self, device: torch.device) -> dict[str, float]:
        """The mini-batch's metrics over every rank (collective: every rank calls it, in the same order)."""
        # The same values on every rank, whatever its micro-batches were: a rank with dummy ones only (no
        # rows in this mini-batch) has no sums at all, and a list of its own would pair its collective with
        # a different one on the other ranks. Which means exist is itself summed over the ranks.
        keys = ("loss", "tokens", "valid", "num_nonfinite", *TOKEN_MEAN_METRICS)
        present = [float(k in self.sums) for k in TOKEN_MEAN_METRICS]
        sums = reduce_values([self.sums.get(k, 0.0) for k in keys] + present, device)
        world, present = dict(zip(keys, sums)), dict(zip(TOKEN_MEAN_METRICS, sums[len(keys) :]))
        valid = max(world["valid"], 1.0)
        out = {k: world[k] for k in ("loss", "tokens", "valid", "num_nonfinite")}
        out.update({k: world[k] / valid for k in TOKEN_MEAN_METRICS if present[k] > 0})
        # one MAX for both extremes: the smallest ratio is minus the largest of the negated ones
        ratio_max, neg_ratio_min = reduce_values([self.ratio_max, -self.ratio_min], device, dist.ReduceOp.MAX)
        out["ratio_max"], out["ratio_min"] = ratio_max, -neg_ratio_min
        return out
