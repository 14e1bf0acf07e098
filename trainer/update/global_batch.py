"""Advantages over the batch of every rank: each rank's kept rollouts are gathered (as named records),
the kernel computes the advantages of the whole batch, so DLER's batch statistics are those of the
global batch, and each rank takes back the values of its own responses as update rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import dler_kernels as dk

from ..dist import collective
from ..rollout.sampling import DynamicSamplingOn, RolloutBatch, ScoredGroup
from .packing import UpdateRow


@dataclass
class RankBatch:
    """One rank's kept responses as the advantages need them (gathered from every rank)."""

    rewards: list[float]
    correct: list[float]
    lengths: list[int]
    group_ids: list[int]  # index of each response's group among this rank's groups
    groups: int

    @classmethod
    def of(cls, batch: RolloutBatch, groups: int) -> RankBatch:
        return cls(
            batch.rewards.tolist(), batch.correct.tolist(), batch.lengths.tolist(), batch.group_ids.tolist(), groups
        )


def global_advantages(
    groups: Sequence[ScoredGroup],
    advantage_kwargs: Mapping[str, Any],
    *,
    spread_on: DynamicSamplingOn = "reward",
    correct_boost: float = 0.0,
) -> tuple[list[UpdateRow], dict[str, float]]:
    """One update row per local response, with its advantage over the global batch, and the batch's
    advantage statistics (collective). ``advantage_kwargs``: ``TrainConfig.advantage_kwargs()``; ``spread_on``:
    what the kernel's dynamic-sampling keep-mask judges, the sampler's rule (``SamplingConfig.dynamic_sampling_on``),
    so that a group the sampler kept for its reward spread is not dropped here for its correctness. ``correct_boost``
    is added, after the normalisation, to the advantage of every kept response the checker scored correct (the DLER
    release's ``correct_sample_advantage_boost_value``: verl-dler's ``dp_actor.update_policy`` adds it where the
    verifier's score, before the stop-properly penalty, is at least 1)."""
    batch = RolloutBatch.from_groups(groups)
    everyone = collective.gather(RankBatch.of(batch, len(groups)))
    rewards = torch.tensor([r for rank in everyone for r in rank.rewards], dtype=torch.float32)
    correct = torch.tensor([c for rank in everyone for c in rank.correct], dtype=torch.float32)
    lengths = torch.tensor([n for rank in everyone for n in rank.lengths], dtype=torch.float32)
    group_ids, offset = [], 0
    for rank in everyone:  # local group indices -> indices into the global batch
        group_ids += [offset + g for g in rank.group_ids]
        offset += rank.groups
    result = dk.compute_advantages(
        rewards,
        torch.tensor(group_ids, dtype=torch.long),
        correctness=correct if spread_on == "correctness" else None,
        token_counts=lengths,
        **advantage_kwargs,
    )
    all_values = result.values
    if correct_boost:
        all_values = all_values + correct_boost * ((correct >= 1.0) & result.keep).to(all_values.dtype)
    start = sum(len(rank.rewards) for rank in everyone[: collective.rank()])
    values = all_values[start : start + len(batch)].tolist()
    rows = [
        UpdateRow(list(p), list(r), float(a), sampler_logprobs=sampler_logprobs(lp, len(r)))
        for p, r, a, lp in zip(batch.prompt_ids, batch.response_ids, values, batch.sampling_logprobs)
    ]
    kept = all_values[result.keep]
    stats = {
        "advantage_mean": float(kept.mean()) if kept.numel() else 0.0,
        "advantage_std": float(kept.std(unbiased=False)) if kept.numel() else 0.0,
        "advantage_min": float(kept.min()) if kept.numel() else 0.0,
        "advantage_max": float(kept.max()) if kept.numel() else 0.0,
        "batch_prompts": offset,
        "batch_responses": int(rewards.numel()),
    }
    return rows, stats


def sampler_logprobs(logprobs: Sequence[float], length: int) -> torch.Tensor | None:
    """The engine's log-probs of a response as the update row keeps them; None unless one per token."""
    return torch.tensor(logprobs, dtype=torch.float32) if len(logprobs) == length else None
