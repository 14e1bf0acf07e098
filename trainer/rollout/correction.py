"""Rollout correction: the loss weights and loss mask that correct for the gap between the rollout engine
(the *sampler*, which generated the responses) and the trainer's own old policy.

The engine and the trainer compute the same policy with different kernels, precisions and reductions (and
the engine renormalises over its top-p nucleus), so a response sampled from pi_sampler is scored by the
loss as if it came from pi_old: on-policy RL silently turns off-policy. Each mode below reads the
per-token ratio ``rho_t = pi_old(trainer)(y_t) / pi_sampler(y_t)`` (both detached: data, not graph) and
returns what the fused loss takes, ``token_weights`` [N] and a ``mask`` [N]; the PPO ratio
pi_theta / pi_old and its clip are untouched. Log-ratios are clamped to +-20 before ``exp`` (the loss
kernels' ``LOG_RATIO_CLAMP``, verl's ``SAFETY_BOUND``), so no weight overflows, where verl 0.9.1 clamps: each
token's for the token modes and for ``seq_mis`` (verl's ``seq_mean_k1`` clamps the tokens', then averages),
and the response's sum for ``seq_tis`` (verl's ``rollout_is: sequence`` sums the raw ones, then clamps).

Modes (defaults from the papers, in brackets):

* ``none``: weight 1, nothing masked.
* ``token_tis``: token-level truncated IS, weight ``min(rho_t, C)`` [C = 2: Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training"; verl's ``rollout_is: token``].
* ``seq_tis``: sequence-level truncated IS, every token of response i weighted ``min(prod_t rho_t, C)``,
  the product of its ratios as verl's ``rollout_is: sequence`` [C = 2, verl's ``rollout_is_threshold``].
* ``token_mis``: token-level masked IS (rejection), tokens with ``rho_t`` outside [lo, hi] masked, the rest
  weight 1 [0.5, 2: verl's ``rollout_rs: token_k1`` with threshold 2 and its reciprocal lower bound].
* ``seq_mis``: sequence-level masked IS, a whole response masked when the geometric mean of its ratios,
  ``exp(mean_t log rho_t)``, leaves [lo, hi] [0.999, 1.001: verl's ``rollout_rs: seq_mean_k1`` preset
  ``decoupled_geo_rs``; Liu, Li et al. 2025, "When Speed Kills Stability"]. verl bounds the reciprocal,
  ``exp(-mean_t log rho_t)``, by the same numbers: the same band where lo = 1 / hi, 1e-6 apart at the defaults.
* ``icepop``: IcePop's two-sided token band, weight ``rho_t`` inside [alpha, beta] and weight 0 outside,
  ``M(k) = k`` on the band, 0 off it [alpha 0.5, beta 5: Ling Team 2025, Ring-1T "Every Step Evolves";
  verl's ``decoupled_token_icepop``]. Its out-of-band tokens are weighted 0, not masked (below).

A masked token (or IcePop's weight-0 one) leaves the loss's numerator only: the loss normaliser stays
what it is without a correction (every response token of the mini-batch for ``token-mean``, every non-empty
response for the ``seq-mean-*`` aggregations), as in IcePop's objective, ``1/sum_i |y_i|`` over all tokens.
Under ``token-mean``, ``seq-mean-token-sum`` and ``seq-mean-token-sum-norm`` a step that masks much therefore
takes a smaller step, not a larger one on the few tokens it kept. Under ``seq-mean-token-mean`` the kernel's
mask also sets each response's inner mean, so the two ways of leaving a token out differ there: the
rejection modes (``token_mis``, ``seq_mis``) mask, and a response with k of |y| tokens masked is averaged
over its |y| - k kept ones, each weighing |y| / (|y| - k) times more (verl's rejection modes, which take
the rejected tokens out of the response mask, do the same); ``icepop`` weights by 0 and leaves the mask
alone, so each response's mean stays over all its |y| tokens, as IcePop's objective and verl's
``decoupled_token_icepop`` have it. IcePop's weight-0 tokens stay in the loss metrics' counts too (clip
fractions, entropy; verl's metrics also count every response token). The weights multiply each token's
whole loss term, KL to the reference and entropy bonus included (both off by default); IcePop and verl
weigh the policy-gradient term only.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dler_kernels.reference import LOG_RATIO_CLAMP
from dler_kernels.validate import check_choice, check_number

CorrectionMode = Literal["none", "token_tis", "seq_tis", "token_mis", "seq_mis", "icepop"]
CORRECTION_MODES = typing.get_args(CorrectionMode)
TRUNCATING_MODES = ("token_tis", "seq_tis")  # weight min(ratio, C): an upper cap only
MASKING_MODES = ("token_mis", "seq_mis", "icepop")  # a band [low, high] outside which tokens are masked
# (low, high) of each mode when the config leaves them null; the papers' and verl's defaults (docstring).
DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "token_tis": (None, 2.0),
    "seq_tis": (None, 2.0),
    "token_mis": (0.5, 2.0),
    "seq_mis": (0.999, 1.001),
    "icepop": (0.5, 5.0),
}


@dataclass
class RolloutCorrectionConfig:
    """How the loss corrects for the sampler's log-probs differing from the trainer's old log-probs
    (``trainer.rollout.correction``; the ratio is pi_old(trainer) / pi_sampler per token)."""

    mode: CorrectionMode = "none"
    """``none``, ``token_tis``, ``seq_tis`` (truncated IS), ``token_mis``, ``seq_mis`` (masked IS) or ``icepop``."""
    low: float | None = None
    """Lower bound of the masking modes' band (None: the mode's default, 0.5 / 0.999 / 0.5)."""
    high: float | None = None
    """The truncating modes' cap C, or the masking modes' upper bound (None: 2 / 2 / 2 / 1.001 / 5)."""

    def __post_init__(self):
        check_choice("mode", self.mode, CORRECTION_MODES)
        check_number("low", self.low, low=0.0, low_open=True, allow_none=True)
        check_number("high", self.high, low=0.0, low_open=True, allow_none=True)
        if self.mode == "none" and (self.low is not None or self.high is not None):
            raise ValueError("low and high bound a correction, and mode is 'none': set a mode or leave them null")
        if self.mode in TRUNCATING_MODES and self.low is not None:
            raise ValueError(
                f"mode {self.mode!r} truncates weights from above only (min(ratio, high)); low is not used, leave "
                "it null"
            )
        low, high = self.bounds
        if self.mode in TRUNCATING_MODES and high < 1:
            raise ValueError(f"high (the cap C of {self.mode}) must be >= 1 so that an exact engine's weight 1 "
                             f"stays 1; got {high}")  # fmt: skip
        if self.mode in MASKING_MODES and not low <= 1 <= high:
            raise ValueError(
                f"mode {self.mode!r} keeps ratios in [low, high], which must hold 1 (an exact engine's ratio) "
                f"so that nothing is masked when engine and trainer agree; got [{low}, {high}]"
            )

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """(low, high) with the mode's defaults filled in (None where the mode has no such bound)."""
        low, high = DEFAULT_BOUNDS[self.mode]
        return (self.low if self.low is not None else low, self.high if self.high is not None else high)


@dataclass
class Correction:
    """What one mode makes of a batch's ratios: the loss's token weights (None: all 1) and mask."""

    weights: torch.Tensor | None  # [N] float32; 0 where icepop leaves a token out
    mask: torch.Tensor  # [N] bool, False = masked (out of the counts of seq-mean-token-mean too)


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, sequences: int) -> torch.Tensor:
    """[sequences] sums of ``values`` [N] by ``seq_ids`` [N] (ids in [0, sequences))."""
    return values.new_zeros(sequences).index_add(0, seq_ids, values)


def correction(
    config: RolloutCorrectionConfig, log_ratio: torch.Tensor, seq_ids: torch.Tensor, sequences: int
) -> Correction:
    """The weights and mask of ``config.mode`` for the per-token ``log_ratio`` [N] = log pi_old(trainer) -
    log pi_sampler of ``sequences`` responses whose tokens ``seq_ids`` [N] name (vectorised, no loop)."""
    mode, (low, high) = config.mode, config.bounds
    raw = log_ratio.detach().double()
    lr = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    keep = torch.ones_like(lr, dtype=torch.bool)
    if mode == "none":
        return Correction(None, keep)
    if mode in ("token_tis", "token_mis", "icepop"):
        ratio = lr.exp()
    elif mode == "seq_mis":  # the geometric mean of the response's ratios, of the clamped tokens' as verl's
        counts = sequence_sums(torch.ones_like(lr), seq_ids, sequences)
        ratio = (sequence_sums(lr, seq_ids, sequences) / counts.clamp(min=1.0)).exp()[seq_ids]
    else:
        # the product of the raw ratios, clamped once: clamping each token first would let a +25 and a -24
        # cancel to weight 1 where the product is e
        per_seq = sequence_sums(raw, seq_ids, sequences)
        ratio = per_seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()[seq_ids]
    if mode in TRUNCATING_MODES:
        return Correction(ratio.clamp(max=high).float(), keep)
    keep = (ratio >= low) & (ratio <= high)
    if mode == "icepop":
        # weight 0, not the mask: a masked token would also leave its response's token count, which sets
        # the inner mean of seq-mean-token-mean, and IcePop divides by the whole |y_i|
        return Correction(torch.where(keep, ratio, 0.0).float(), torch.ones_like(keep))
    return Correction(None, keep)


def correct_rows(
    config: RolloutCorrectionConfig, old_logprobs: Sequence[torch.Tensor], sampler_logprobs: Sequence[torch.Tensor]
) -> list[Correction]:
    """:func:`correction` of each response, from its trainer ``old_logprobs`` and its ``sampler_logprobs``
    (one [len] tensor per response each), computed in one vectorised pass; one Correction per response."""
    lengths = [len(o) for o in old_logprobs]
    for i, (o, s) in enumerate(zip(old_logprobs, sampler_logprobs)):
        if s is None:
            raise ValueError(
                f"rollout correction {config.mode!r} needs the engine's log-probs of every response; response {i} "
                "has none (the engine returned no log-probs, or not one per token)"
            )
        if len(s) != len(o):
            raise ValueError(f"response {i}: {len(s)} sampler log-probs for {len(o)} trainer log-probs")
    if not lengths:
        return []
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    log_ratio = torch.cat([o.double() for o in old_logprobs]) - torch.cat([s.double() for s in sampler_logprobs])
    whole = correction(config, log_ratio, seq_ids, len(lengths))
    masks = whole.mask.split(lengths)
    weights = whole.weights.split(lengths) if whole.weights is not None else [None] * len(lengths)
    return [Correction(w, m) for w, m in zip(weights, masks)]
