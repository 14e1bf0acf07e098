"""The loss metrics of one mini-batch: the kernel's figures of each micro-batch summed (token-weighted
where they are per-token means), then reduced over the ranks into the mini-batch's loss and means."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .collective import reduce_scalar

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
        keys = ["loss", "tokens", "valid", "num_nonfinite"] + [k for k in TOKEN_MEAN_METRICS if k in self.sums]
        world = {k: reduce_scalar(self.sums.get(k, 0.0), device, dist.ReduceOp.SUM) for k in keys}
        valid = max(world["valid"], 1.0)
        out = {"loss": world["loss"], "tokens": world["tokens"], "valid": world["valid"]}
        out["num_nonfinite"] = world["num_nonfinite"]
        out.update({k: world[k] / valid for k in TOKEN_MEAN_METRICS if k in world})
        out["ratio_max"] = reduce_scalar(self.ratio_max, device, dist.ReduceOp.MAX)
        out["ratio_min"] = reduce_scalar(self.ratio_min, device, dist.ReduceOp.MIN)
        return out
