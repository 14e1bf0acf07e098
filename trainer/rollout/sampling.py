"""Dynamic sampling: generate, score and filter groups until the step's batch is full.

One call of ``DynamicSampler.collect`` turns "the next prompts of the data stream" into exactly
``prompts_per_step`` scored groups that carry a learning signal (DAPO / DLER dynamic sampling):
groups whose rewards have zero spread (every response of the group gets the same advantage, 0) are
dropped and more prompts are drawn, for at most ``max_rounds`` rounds. The rewards are those the update
sees, after the length penalty, so an all-correct group that the penalty separates by length is kept:
that is the signal a length penalty exists to give. ``dynamic_sampling_on="correctness"`` judges
correctness before any penalty instead, as the DLER release does (verl's DAPO filter on ``seq_reward``,
the verifier's score before the stop-properly penalty). Under several ranks each sampler draws from its
rank's share of the stream (:class:`RankSlice`).

With GFPO group filtering (``gfpo_sample_size``) each prompt gets a larger group, is scored whole, and only
its ``samples_per_prompt`` best responses (:func:`gfpo_retain`) go on to the advantages and the update.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np

from ..data import Example, PromptStream
from ..reward.budgets import DifficultyBudgets
from ..reward.rewards import LengthPenaltyConfig, apply_length_penalty
from ..seeds import round_seed
from .contract import RolloutEngine, Sample


class Scorer(Protocol):
    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]: ...


GfpoMetric = Literal["length", "token_efficiency"]
DynamicSamplingOn = Literal["reward", "correctness"]


class SamplingWarning(UserWarning):
    """The round cap ended dynamic sampling with fewer prompts than asked for."""


@dataclass
class SamplingConfig:
    """How a step's groups are sampled: group size, sampling settings and dynamic sampling's rounds."""

    prompts_per_step: int = 8
    """Groups in a step's batch (per rank): dynamic sampling fills exactly this many."""
    samples_per_prompt: int = 8
    """G, the responses sampled for each prompt (one group)."""
    max_tokens: int | None = None
    """The longest response; None: the largest length budget (DA-DLER: the max of its budgets)."""
    temperature: float = 1.0
    """The engine's sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``."""
    dynamic_sampling: bool = True
    """Drop groups with no spread (see ``dynamic_sampling_on``) and sample more prompts until the batch is full."""
    dynamic_sampling_on: DynamicSamplingOn = "reward"
    """What a kept group's responses must differ in: ``reward``, the rewards after the length penalty (what the
    advantages see), or ``correctness`` before any penalty (the DLER release's filter). They differ on a group whose
    correct responses the penalty separates: a budget below max_tokens (DA-DLER, a budget schedule), a penalty
    graded by length (ALP, Kimi, L1-Max, ShorterBetter, cosine), or a correct response cut by max_tokens."""
    max_rounds: int = 4
    """Sampling rounds at most per step; a batch still short after them trains on what it has (with a warning)."""
    oversample: float = 1.0
    """Round 1 asks for ceil(prompts_per_step * oversample) prompts; later rounds size themselves from the
    kept fraction seen so far."""
    max_prompts_per_round: int | None = None
    """The most prompts one round may ask for (None: no limit)."""
    gfpo_sample_size: int | None = None
    """GFPO group filtering: sample this many responses per prompt and train on the ``samples_per_prompt`` best
    of them (None: off)."""
    gfpo_metric: GfpoMetric = "length"
    """GFPO: keep the shortest responses (``length``) or those of the most reward per token (``token_efficiency``)."""

    def __post_init__(self):
        for name in ("prompts_per_step", "samples_per_prompt", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("dynamic_sampling needs samples_per_prompt >= 2 (a group of one has no spread)")
        if self.oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.dynamic_sampling_on not in get_args(DynamicSamplingOn):
            raise ValueError(
                f"dynamic_sampling_on must be one of {list(get_args(DynamicSamplingOn))}, "
                f"got {self.dynamic_sampling_on!r}"
            )
        if self.gfpo_metric not in get_args(GfpoMetric):
            raise ValueError(f"gfpo_metric must be one of {list(get_args(GfpoMetric))}, got {self.gfpo_metric!r}")
        if self.gfpo_sample_size is not None and self.gfpo_sample_size <= self.samples_per_prompt:
            raise ValueError(
                f"gfpo_sample_size ({self.gfpo_sample_size}) must be larger than samples_per_prompt "
                f"({self.samples_per_prompt}), the responses GFPO keeps of each group (or null: no filtering)"
            )
        if self.max_prompts_per_round is not None and self.max_prompts_per_round < self.prompts_per_step:
            raise ValueError(
                f"max_prompts_per_round ({self.max_prompts_per_round}) must be >= prompts_per_step "
                f"({self.prompts_per_step})"
            )


@dataclass
class ScoredGroup:
    """One prompt's responses with everything the update needs."""

    example: Example
    prompt_ids: list[int]
    samples: list[Sample]
    correct: np.ndarray  # [G] 0/1, before any length penalty
    rewards: np.ndarray  # [G] after the length penalty
    lengths: np.ndarray  # [G] response tokens
    truncated: np.ndarray  # [G] cut by max_tokens
    budget: int  # the length budget the penalty used (DA-DLER: the prompt's own)
    retained: np.ndarray | None = None  # GFPO: indices of the responses trained on (None: all)

    def has_spread(self, on: DynamicSamplingOn = "reward") -> bool:
        """Whether the responses trained on (GFPO: the retained ones) differ in ``on``: their rewards after the length
        penalty, or their correctness before it. Exact comparison, as verl's filter (std > 0): any difference in
        reward gives the group nonzero advantages."""
        values = self.rewards if on == "reward" else self.correct
        values = values if self.retained is None else values[self.retained]
        return bool(values.min() != values.max())

    def filtered(self) -> ScoredGroup:
        """The group as the update sees it: GFPO's retained responses only (the others take no part in the loss,
        nor in the group's advantage statistics), or the group itself without filtering."""
        if self.retained is None:
            return self
        keep = self.retained
        samples = [self.samples[i] for i in keep]
        return ScoredGroup(
            self.example, self.prompt_ids, samples, self.correct[keep], self.rewards[keep], self.lengths[keep],
            self.truncated[keep], self.budget,
        )  # fmt: skip


def gfpo_retain(lengths, rewards, k: int, metric: str = "length") -> np.ndarray:
    """GFPO (Shrivastava et al. 2025, arXiv 2508.09726): the indices, in group order, of the ``k`` responses of a
    group to train on: the shortest (``length``), or those of the highest reward per token (``token_efficiency``,
    reward / length), the paper's two metrics. Ties go to the earlier response. The others get no advantage and
    no loss, and the retained group's advantages are normalised over the retained responses alone, which is
    what computing the advantages of the filtered group does. The searchable copy of the paper held its abstract
    and summaries, not its equations: the retained-set normalisation is the one TRL's and EasyDeL's GFPO
    trainers implement ("the model is trained on the filtered group")."""
    lengths = np.asarray(lengths, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    if lengths.shape != rewards.shape or lengths.ndim != 1:
        raise ValueError(f"lengths and rewards must be 1-D of one length, got {lengths.shape}, {rewards.shape}")
    if not 1 <= k <= lengths.size:
        raise ValueError(f"k must be in [1, {lengths.size}] (the group's responses), got {k}")
    if metric == "length":
        order = np.argsort(lengths, kind="stable")
    elif metric == "token_efficiency":
        order = np.argsort(-rewards / np.maximum(lengths, 1.0), kind="stable")  # an empty response counts as 1 token
    else:
        raise ValueError(f"metric must be one of {list(get_args(GfpoMetric))}, got {metric!r}")
    return np.sort(order[:k])


# SamplingStats' counts of the generated groups, summed over the ranks into each line of metrics.jsonl.
GROUP_COUNTS = (
    "groups_with_spread", "groups_all_correct", "groups_all_wrong", "groups_same_reward", "groups_length_signal",
)  # fmt: skip


@dataclass
class SamplingStats:
    rounds: int = 0
    prompts_generated: int = 0
    # The generated groups (before the cut to prompts_per_step), each counted once: with spread (kept), or
    # dropped as all correct, all wrong, or (dynamic_sampling_on=reward) correctness spread the rewards lose.
    groups_with_spread: int = 0
    groups_all_correct: int = 0
    groups_all_wrong: int = 0
    groups_same_reward: int = 0
    groups_length_signal: int = 0  # groups with spread whose responses are all correct: a length signal alone
    samples: int = 0
    accuracy: float = 0.0  # over every generated response, not only the kept ones
    mean_length: float = 0.0
    p50_length: float = 0.0
    p90_length: float = 0.0
    truncation_rate: float = 0.0
    mean_reward: float = 0.0  # over the returned batch
    budgets: dict[int, int] = field(default_factory=dict)  # budget -> prompts (DA-DLER)
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    capped: bool = False
    lengths: list[int] = field(default_factory=list)  # of every generated response (not in as_dict)

    @property
    def kept_fraction(self) -> float:
        return self.groups_with_spread / self.prompts_generated if self.prompts_generated else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("budgets", "lengths")}
        out["kept_fraction"] = self.kept_fraction
        out["budgets"] = {str(k): v for k, v in sorted(self.budgets.items())}
        return out


class RankSlice:
    """The prompts of one rank: each ``take(k)`` draws ``k * world`` from the shared order and keeps
    every ``world``-th, so ranks see disjoint prompts while their streams advance alike."""

    def __init__(self, stream: PromptStream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def take(self, k: int) -> list[Example]:
        return self.stream.take(k * self.world)[self.rank :: self.world]


class DynamicSampler:
    """Draws prompts from ``stream``, samples ``samples_per_prompt`` responses each with ``engine``,
    scores them (``scorer`` for correctness, the length penalty for the reward, DA-DLER budgets
    when ``budgets`` is given) and keeps groups with spread until the batch is full.

    ``another_round(short)`` decides, from whether this sampler's batch is still short, whether every
    sampler of the job runs another round (the trainer passes "any rank is short"): rounds are
    collective, and a sampler that is full takes part in them with no prompts, because the engines of
    all ranks may have to step in lockstep (vLLM's data parallelism). Alone, a sampler continues
    exactly while it is short."""

    def __init__(
        self,
        engine: RolloutEngine,
        stream: PromptStream,
        prompt_ids: Callable[[Sequence[Example]], list[list[int]]],
        scorer: Scorer,
        penalty: LengthPenaltyConfig,
        config: SamplingConfig,
        budgets: DifficultyBudgets | None = None,
        another_round: Callable[[bool], bool] = bool,
    ):
        self.engine, self.stream, self.prompt_ids, self.scorer = engine, stream, prompt_ids, scorer
        self.another_round = another_round
        # Where a short batch's message goes instead of a SamplingWarning: the asynchronous loop's producer thread
        # collects its own (warnings.catch_warnings is process-wide, and would take the trainer's warnings too).
        self.report_short: Callable[[str], None] | None = None
        self.penalty, self.config, self.budgets = penalty, config, budgets
        largest = budgets.max_budget if budgets is not None else penalty.length_budget
        self.max_tokens = config.max_tokens if config.max_tokens is not None else largest
        if budgets is not None and self.max_tokens < largest:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be >= the largest DA-DLER budget ({largest}): "
                "rollouts generate up to the largest budget and the penalty applies each prompt's own"
            )

    def collect(self, step: int, seed: int = 0) -> tuple[list[ScoredGroup], SamplingStats]:
        cfg, stats = self.config, SamplingStats()
        target, kept, generated = cfg.prompts_per_step, [], []
        for round_ in range(cfg.max_rounds if cfg.dynamic_sampling else 1):
            missing = target - len(kept)
            if not self.another_round(missing > 0):
                break
            examples = self.stream.take(self._round_size(missing, stats)) if missing > 0 else []
            groups = self._generate_and_score(examples, step, round_seed(seed, round_), stats)
            stats.rounds += bool(examples)
            generated += groups
            kept += [g for g in groups if g.has_spread(cfg.dynamic_sampling_on) or not cfg.dynamic_sampling]
        batch = [g.filtered() for g in kept[:target]]
        self._summarise(generated, batch, stats)
        if len(kept) < target:
            stats.capped = True
            message = (
                f"dynamic sampling: only {len(kept)} of {target} prompts have a {cfg.dynamic_sampling_on} spread after "
                f"{stats.rounds} rounds ({stats.prompts_generated} prompts generated: "
                f"{stats.groups_all_correct} all correct, {stats.groups_all_wrong} all wrong"
                + (f", {stats.groups_same_reward} of equal rewards" if stats.groups_same_reward else "")
                + f"); training on "
                f"{len(kept)}. Raise max_rounds or oversample, or use data of a difficulty that suits the model."
            )
            if self.report_short is not None:
                self.report_short(message)
            else:
                warnings.warn(message, SamplingWarning, stacklevel=2)
        return batch, stats

    def _round_size(self, missing: int, stats: SamplingStats) -> int:
        cfg = self.config
        if stats.rounds == 0 or not cfg.dynamic_sampling:
            ask = math.ceil(missing * cfg.oversample)
        else:
            # Expect the kept fraction seen so far; never below 1/8 so one unlucky round
            # does not make the next one explode.
            frac = max(stats.kept_fraction, 0.125)
            ask = math.ceil(missing / frac)
        if cfg.max_prompts_per_round is not None:
            ask = min(ask, cfg.max_prompts_per_round)
        return max(ask, missing)

    def _generate_and_score(self, examples, step: int, seed: int, stats: SamplingStats) -> list[ScoredGroup]:
        cfg = self.config
        prompts = self.prompt_ids(examples)
        start = time.perf_counter()
        outputs = self.engine.generate(
            prompts,
            n=cfg.gfpo_sample_size or cfg.samples_per_prompt,
            max_tokens=self.max_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
        )
        stats.generate_seconds += time.perf_counter() - start
        start = time.perf_counter()
        texts = [s.text for group in outputs for s in group]
        golds = [ex.answer for ex, group in zip(examples, outputs) for _ in group]
        correct = np.asarray(self.scorer.score(texts, golds) if texts else [], dtype=np.float64)
        groups, offset = [], 0
        for ex, ids, samples in zip(examples, prompts, outputs):
            c = correct[offset : offset + len(samples)]
            offset += len(samples)
            groups.append(self._score_group(ex, ids, samples, c, step))
        stats.score_seconds += time.perf_counter() - start
        stats.prompts_generated += len(groups)
        stats.groups_with_spread += sum(g.has_spread(cfg.dynamic_sampling_on) for g in groups)
        return groups

    def _score_group(self, example: Example, ids: list[int], samples: list[Sample], correct, step) -> ScoredGroup:
        lengths = np.array([len(s.token_ids) for s in samples])
        truncated = np.array([s.finish_reason == "length" for s in samples])
        if self.budgets is not None:
            budget = self.budgets.observe(example.id, correct, step)
        else:
            budget = self.penalty.length_budget
        rewards = apply_length_penalty(self.penalty, correct, lengths, truncated, budget)
        group = ScoredGroup(example, list(ids), samples, correct, rewards, lengths, truncated, budget)
        if self.config.gfpo_sample_size is not None:
            group.retained = gfpo_retain(lengths, rewards, self.config.samples_per_prompt, self.config.gfpo_metric)
        return group

    def _summarise(self, generated: list[ScoredGroup], batch: list[ScoredGroup], stats: SamplingStats) -> None:
        if generated:
            correct = np.concatenate([g.correct for g in generated])
            lengths = np.concatenate([g.lengths for g in generated])
            truncated = np.concatenate([g.truncated for g in generated])
            stats.samples = int(correct.size)
            stats.accuracy = float(correct.mean())
            stats.mean_length = float(lengths.mean())
            stats.p50_length, stats.p90_length = (float(q) for q in np.percentile(lengths, [50, 90]))
            stats.lengths = lengths.tolist()
            stats.truncation_rate = float(truncated.mean())
            stats.generated_tokens = int(lengths.sum())
            # Judged on what dynamic sampling judges: GFPO's retained responses (ScoredGroup.has_spread).
            on = self.config.dynamic_sampling_on
            for g in generated:
                c = g.correct if g.retained is None else g.correct[g.retained]
                if g.has_spread(on):
                    stats.groups_length_signal += bool(c.min() == 1)
                elif c.min() == 1:
                    stats.groups_all_correct += 1
                elif c.max() == 0:
                    stats.groups_all_wrong += 1
                else:
                    stats.groups_same_reward += 1
        if batch:
            stats.mean_reward = float(np.concatenate([g.rewards for g in batch]).mean())
        for g in batch:
            stats.budgets[g.budget] = stats.budgets.get(g.budget, 0) + 1


@dataclass
class RolloutBatch:
    """The kept groups flattened to one row per response: what advantages and the update read."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sampling_logprobs: list[list[float]]
    rewards: np.ndarray  # [B] float
    correct: np.ndarray  # [B] 0/1
    group_ids: np.ndarray  # [B] int, index of the group in the batch
    lengths: np.ndarray  # [B] int
    truncated: np.ndarray  # [B] bool

    @classmethod
    def from_groups(cls, groups: Sequence[ScoredGroup]) -> RolloutBatch:
        rows = [(gi, g, s) for gi, g in enumerate(groups) for s in g.samples]
        return cls(
            prompt_ids=[g.prompt_ids for _, g, _ in rows],
            response_ids=[s.token_ids for _, _, s in rows],
            sampling_logprobs=[s.logprobs for _, _, s in rows],
            rewards=np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0),
            correct=np.concatenate([g.correct for g in groups]) if groups else np.zeros(0),
            group_ids=np.array([gi for gi, _, _ in rows], dtype=np.int64),
            lengths=np.concatenate([g.lengths for g in groups]) if groups else np.zeros(0, dtype=np.int64),
            truncated=np.concatenate([g.truncated for g in groups]) if groups else np.zeros(0, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.response_ids)
