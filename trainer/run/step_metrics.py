"""A step's metrics record: the update's optimizer steps summed into one set of loss metrics, and every
rank's rollout statistics gathered (as named records) into the one line of ``metrics.jsonl``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dist import collective
from ..rollout.sampling import GROUP_COUNTS, SamplingStats
from ..update.loss_metrics import TOKEN_MEAN_METRICS
from ..update.mismatch_metrics import MismatchSums
from ..update.packing import UpdateRow


def percentiles(lengths: np.ndarray) -> tuple[float, float]:
    """The median and 90th percentile of ``lengths`` (0, 0 when empty)."""
    if lengths.size == 0:
        return 0.0, 0.0
    p50, p90 = np.percentile(lengths, [50, 90])
    return float(p50), float(p90)


class UpdateTotals:
    """The metrics of one step's optimizer steps: token-weighted means of the kernel's per-token metrics,
    the mean loss and gradient norm over optimizer steps (the loss is already a per-step mean), the sum of
    non-finite counts, the extreme ratios, and how many optimizer steps ran and were skipped."""

    def __init__(self) -> None:
        self.steps, self.skipped, self.tokens, self.valid = 0, 0, 0.0, 0.0
        self.loss, self.grad_norm, self.num_nonfinite = 0.0, 0.0, 0.0
        self.token_sums: dict[str, float] = {}
        self.ratio_max, self.ratio_min = -math.inf, math.inf

    def add(self, metrics: dict[str, float], grad_norm: float) -> None:
        tokens = metrics.get("tokens", 0.0)
        valid = metrics.get("valid", tokens)  # the tokens the means are over (a rollout correction masks some)
        self.steps += 1
        self.tokens += tokens
        self.valid += valid
        self.loss += metrics["loss"]
        self.grad_norm += grad_norm
        self.num_nonfinite += metrics.get("num_nonfinite", 0.0)
        for key in TOKEN_MEAN_METRICS:
            if key in metrics:
                self.token_sums[key] = self.token_sums.get(key, 0.0) + metrics[key] * valid
        self.ratio_max = max(self.ratio_max, metrics.get("ratio_max", -math.inf))
        self.ratio_min = min(self.ratio_min, metrics.get("ratio_min", math.inf))

    def skip(self) -> None:
        """An optimizer step whose gradient norm was not finite (its metrics still count)."""
        self.skipped += 1

    def means(self, lr: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.steps:
            out = {"loss": self.loss / self.steps, "grad_norm": self.grad_norm / self.steps}
            out.update(update_tokens=self.tokens, num_nonfinite=self.num_nonfinite)
            valid = max(self.valid, 1.0)
            out.update({k: self.token_sums[k] / valid for k in TOKEN_MEAN_METRICS if k in self.token_sums})
            if (
                self.valid > 0
            ):  # a step whose every token a rollout correction masked has no ratio (not +-inf in the JSON)
                out.update(ratio_max=self.ratio_max, ratio_min=self.ratio_min)
        out.update(lr=lr, optimizer_steps=self.steps, skipped_steps=self.skipped)
        return out


@dataclass
class RankStepStats:
    """What one rank contributes to the step's record (gathered from every rank)."""

    sampling: dict[str, Any]  # SamplingStats.as_dict()
    generated_lengths: list[int]  # of every response it generated, kept or not
    batch_lengths: list[int]  # of the responses it trained on
    update_tokens: int  # prompt and response tokens of its update rows
    mismatch: MismatchSums | None  # None: the trainer's old log-probs were not computed (bypass)

    @classmethod
    def of(cls, sampling: SamplingStats, rows: Sequence[UpdateRow], mismatch: MismatchSums | None) -> RankStepStats:
        batch_lengths = [len(r.response_ids) for r in rows]
        return cls(sampling.as_dict(), sampling.lengths, batch_lengths, sum(r.tokens for r in rows), mismatch)


def step_record(
    step: int,
    sampling: SamplingStats,
    rows: Sequence[UpdateRow],
    advantages: dict[str, float],
    update: dict[str, float],
    timings: dict[str, float],
    with_budgets: bool,
    mismatch: MismatchSums | None = None,
) -> dict[str, Any]:
    """One line of OUT/metrics.jsonl (collective): rollout statistics over every generated response of
    every rank, then the advantages', the update's, the trainer-sampler mismatch's (``mismatch``: this
    rank's sums, merged over the ranks; None leaves its keys out) and the timings' figures.
    ``with_budgets``: add the DA-DLER budget counts."""
    everyone = collective.gather(RankStepStats.of(sampling, rows, mismatch))
    parts = [rank.sampling for rank in everyone]
    samples = sum(p["samples"] for p in parts)

    def mean(key: str) -> float:
        return sum(p[key] * p["samples"] for p in parts) / samples if samples else 0.0

    p50, p90 = percentiles(np.asarray([n for rank in everyone for n in rank.generated_lengths]))
    lengths = np.asarray([n for rank in everyone for n in rank.batch_lengths])
    update_tokens = sum(rank.update_tokens for rank in everyone)
    generated = sum(p["generated_tokens"] for p in parts)
    record: dict[str, Any] = {
        "step": step,
        "accuracy": mean("accuracy"),
        "mean_response_length": mean("mean_length"),
        "p50_response_length": p50,
        "p90_response_length": p90,
        "truncation_rate": mean("truncation_rate"),
        "reward": sum(p["mean_reward"] for p in parts) / len(parts),
        "batch_mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "prompts_generated": sum(p["prompts_generated"] for p in parts),
        "kept_fraction": sum(p["groups_with_spread"] for p in parts)
        / max(1, sum(p["prompts_generated"] for p in parts)),
        # the generated groups, partitioned: kept (with spread), or dropped as all correct / all wrong / equal rewards
        **{key: sum(p[key] for p in parts) for key in GROUP_COUNTS},
        "sampling_rounds": max(p["rounds"] for p in parts),
        "sampling_capped": any(p["capped"] for p in parts),
        **advantages,
        **update,
        **mismatch_record([rank.mismatch for rank in everyone]),
        **timings,
        "generated_tokens": generated,
        "rollout_tokens_per_s": generated / max(sum(p["generate_seconds"] for p in parts) / len(parts), 1e-9),
        "update_tokens_per_s": update_tokens / max(timings["update_s"] + timings["logprob_s"], 1e-9),
    }
    if with_budgets:
        merged: dict[str, int] = {}
        for p in parts:
            for budget, n in p["budgets"].items():
                merged[budget] = merged.get(budget, 0) + n
        record["budgets"] = merged
    return record


def mismatch_record(parts: Sequence[MismatchSums | None]) -> dict[str, Any]:
    """The mismatch keys of the step (``trainer.update.mismatch_metrics``) from every rank's sums; none when the
    ranks did not measure it."""
    measured = [p for p in parts if p is not None]
    return MismatchSums.merge(measured).as_record() if measured else {}
