"""Rewards: correctness times a length penalty, judged against the group's length budget.

Every length penalty is a pure, vectorised function over one group (the G responses of a
prompt) with the same signature::

    penalty(correct [G] float in {0,1}, lengths [G] int, truncated [G] bool, budget int, cfg) -> rewards [G]

``budget`` is the group's length budget L: the configured ``length_budget``, or the prompt's own
budget (:mod:`trainer.reward.budgets`: DA-DLER, DRQA), so every penalty composes with difficulty-aware budgets and
with any advantage method. A response is *truncated* when the engine cut it at ``max_tokens``.
Semantics: each penalty's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LengthPenaltyConfig:
    """Which penalty, and its parameters (defaults: the papers' settings)."""

    name: str = "truncation"
    """The penalty: a key of :data:`LENGTH_PENALTIES`."""
    length_budget: int = 4000
    """L, the length budget of every penalty, in tokens (DLER: 4000)."""
    truncation_coef: float = 0.0
    """``truncation``: the reward factor of a response over budget (DLER paper: 0; the released code: 0.1)."""
    overlong_buffer: int = 1000
    """``overlong``: DAPO's buffer L_c before L_max (L_max is ``length_budget``)."""
    cosine_correct: tuple[float, float] = (2.0, 1.0)
    """``cosine``: (r0, rL), the reward of a correct response at 0 tokens and at L."""
    cosine_wrong: tuple[float, float] = (-10.0, 0.0)
    """``cosine``: (r0, rL) for a wrong response."""
    cosine_exceed: float = -10.0
    """``cosine``: the reward of a response over budget or truncated."""
    l1_alpha: float = 0.0003
    """``l1_max``: alpha, the reward lost per token over the target length."""
    l1_delta: float = 0.5
    """``l1_max``: delta, the offset inside the clip to [0, 1]."""
    laser_bonus: float = 0.5
    """``laser``: the bonus of a correct response within L tokens."""
    drqa_data: str | None = None
    """``drqa``: the jsonl of ``dler drqa-data``, with the per-question concise lengths."""
    drqa_verbose_reward: float = 0.5
    """``drqa``: the reward of a correct response longer than its question's concise length."""
    shorter_better_alpha: float = 2.0
    """``shorter_better``: alpha, the reward of a correct response (paper: 1 and 2)."""
    shorter_better_beta: float = 0.001
    """``shorter_better``: beta, the reward lost per token of distance to the group's sample optimal length."""
    alp_beta: float = 0.5
    """``alp``: beta, what a response of L tokens loses on a prompt the whole group solved (N = L: our choice)."""

    def __post_init__(self):
        if self.name not in LENGTH_PENALTIES:
            raise ValueError(f"length penalty name must be one of {sorted(LENGTH_PENALTIES)}, got {self.name!r}")
        if self.length_budget < 1:
            raise ValueError(f"length_budget must be >= 1 token, got {self.length_budget}")
        if not 0 <= self.truncation_coef <= 1:
            raise ValueError(f"truncation_coef must be in [0, 1], got {self.truncation_coef}")
        if self.name == "drqa" and not self.drqa_data:
            raise ValueError("length penalty 'drqa' needs drqa_data: the jsonl file written by `dler drqa-data`")
        if not 0 <= self.drqa_verbose_reward <= 1:
            raise ValueError(f"drqa_verbose_reward must be in [0, 1], got {self.drqa_verbose_reward}")
        for key in ("shorter_better_alpha", "shorter_better_beta", "alp_beta"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.name == "overlong" and not 0 < self.overlong_buffer <= self.length_budget:
            raise ValueError(
                f"overlong_buffer must be in (0, length_budget={self.length_budget}], got {self.overlong_buffer}"
            )


def _finished_within(lengths: np.ndarray, truncated: np.ndarray, budget: int) -> np.ndarray:
    return ~truncated & (lengths <= budget)


def truncation(correct, lengths, truncated, budget, cfg):
    """DLER: R if the response ended by itself within L tokens, else ``truncation_coef * R``."""
    return np.where(_finished_within(lengths, truncated, budget), correct, cfg.truncation_coef * correct)


def overlong(correct, lengths, truncated, budget, cfg):
    """DAPO soft overlong punishment, added to R: 0 up to L-L_c, linear down to -1 at L, -1 beyond.
    A function of the length alone, as in DAPO (which samples up to L, so truncated means |o| = L)."""
    soft = budget - cfg.overlong_buffer
    return correct + np.clip((soft - lengths) / cfg.overlong_buffer, -1.0, 0.0)


def _eta(t: np.ndarray, start: float, end: float, budget: int) -> np.ndarray:
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t / budget))


def cosine(correct, lengths, truncated, budget, cfg):
    """Yeo et al. 2025: cosine in the length from r0 (at 0 tokens) to rL (at L), separate for
    correct and wrong; an exceeded (truncated or over L) response gets ``cosine_exceed``."""
    right = _eta(lengths, *cfg.cosine_correct, budget)
    wrong = _eta(lengths, *cfg.cosine_wrong, budget)
    exceeded = truncated | (lengths > budget)
    return np.where(exceeded, cfg.cosine_exceed, np.where(correct > 0, right, wrong))


def l1_max(correct, lengths, truncated, budget, cfg):
    """L1-Max / LCPO (Aggarwal & Welleck 2025): R * clip(alpha (n_gold - |o|) + delta, 0, 1), n_gold = L."""
    return correct * np.clip(cfg.l1_alpha * (budget - lengths) + cfg.l1_delta, 0.0, 1.0)


def kimi(correct, lengths, truncated, budget, cfg):
    """Kimi k1.5: lambda = 0.5 - (|o|-min)/(max-min) over the group (0 when all lengths are equal);
    correct responses get +lambda, wrong ones min(0, lambda)."""
    lo, hi = lengths.min(), lengths.max()
    lam = np.zeros_like(correct) if hi == lo else 0.5 - (lengths - lo) / (hi - lo)
    return correct + np.where(correct > 0, lam, np.minimum(0.0, lam))


def laser(correct, lengths, truncated, budget, cfg):
    """LASER step reward (Liu et al. 2025): ``laser_bonus`` added for a correct response of at most
    the target length L tokens."""
    return correct + cfg.laser_bonus * correct * (lengths <= budget)


def drqa(correct, lengths, truncated, budget, cfg):
    """DRQA: the labels of ``trainer.commands.drqa`` as rewards. ``budget`` is the question's concise length (the median
    tokens of its correct-concise chains): correct within it 1, correct beyond it ``drqa_verbose_reward``,
    wrong 0."""
    concise = _finished_within(lengths, truncated, budget)
    return np.where(correct > 0, np.where(concise, 1.0, cfg.drqa_verbose_reward), 0.0)


def shorter_better(correct, lengths, truncated, budget, cfg):
    """ShorterBetter (Yi et al. 2025, arXiv 2504.21370, method, "Sample Optimal Length (SOL)"):
    r = alpha 1[correct] - beta |len - SOL|, where SOL is the length of the group's shortest correct response, or
    the group's mean length when none is correct. The group's budget counts as the paper's generation limit: a
    response that did not finish within L tokens is not correct (a response cut at the paper's max length has no
    answer), neither for its own reward nor for the SOL."""
    right = (correct > 0) & _finished_within(lengths, truncated, budget)
    sol = lengths[right].min() if right.any() else lengths.mean()
    return cfg.shorter_better_alpha * right - cfg.shorter_better_beta * np.abs(lengths - sol)


def alp(correct, lengths, truncated, budget, cfg):
    """ALP, adaptive length penalty (Xiang et al. 2025, arXiv 2506.05256, method, "Adaptive Length Penalty"):
    r = 1[correct] - (beta / N) max(p_solved, 1/K) |y|, with p_solved the group's solve rate over its K
    responses, so an easy prompt pays more per token than a hard one. (The searchable copy of the paper held
    its abstract and introduction; the formula is the method's as a review of the paper quotes it, and it has
    a 1/N normaliser.) The paper leaves N a normalisation constant; here N is the group's
    budget L, so ``alp_beta`` is what a response of L tokens loses on a prompt the whole group solved, and a
    per-prompt budget (DA-DLER, a schedule) scales the penalty."""
    solved = max(float(correct.mean()), 1.0 / correct.size)
    return correct - cfg.alp_beta * solved * lengths / budget


def no_penalty(correct, lengths, truncated, budget, cfg):
    return correct.copy()


PenaltyFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int, LengthPenaltyConfig], np.ndarray]
LENGTH_PENALTIES: dict[str, PenaltyFn] = {
    "truncation": truncation,
    "overlong": overlong,
    "cosine": cosine,
    "l1_max": l1_max,
    "kimi": kimi,
    "laser": laser,
    "drqa": drqa,
    "shorter_better": shorter_better,
    "alp": alp,
    "none": no_penalty,
}


def apply_length_penalty(
    cfg: LengthPenaltyConfig,
    correct: Sequence[float],
    lengths: Sequence[int],
    truncated: Sequence[bool],
    budget: int | None = None,
) -> np.ndarray:
    """Rewards of one group: ``cfg.name``'s penalty with the group's budget (default ``cfg.length_budget``)."""
    c = np.asarray(correct, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(truncated, dtype=bool)
    if not (c.shape == n.shape == t.shape) or c.ndim != 1:
        raise ValueError(f"correct, lengths, truncated must be 1-D of one length, got {c.shape}, {n.shape}, {t.shape}")
    if c.size == 0:
        raise ValueError("a group needs at least one response")
    if ((c != 0) & (c != 1)).any():
        raise ValueError("correct must hold 0 or 1 per response")
    if (n < 0).any():
        raise ValueError("lengths must be >= 0 tokens")
    budget = cfg.length_budget if budget is None else int(budget)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    return LENGTH_PENALTIES[cfg.name](c, n, t, budget, cfg)
