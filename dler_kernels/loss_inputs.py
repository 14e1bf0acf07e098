"""What a policy-loss call is given, and its rules: the options (``LossOptions``, a frozen dataclass
checked once when it is made), the per-token data (``TokenData``) and ``check_token_data``, shared by
``policy_loss`` and ``linear_policy_loss``. The rules are the same for every backend and are checked
before any kernel runs; semantics of the options: ``dler_kernels.reference``."""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from . import objectives
from . import reference as ref
from .validate import (
    check_choice,
    check_mask,
    check_no_grad,
    check_number,
    check_tensor,
    check_valid_rows,
    token_ids,
)


@dataclass(frozen=True)
class LossSettings:
    """The policy loss's settings, as a caller chooses them (defaults: DLER's), each checked when made. This is their
    one declaration: ``policy_loss`` and ``linear_policy_loss`` take them as keywords (``LossOptions``), and the
    trainer's ``algorithm`` config section is this class plus the trainer's own fields."""

    objective: str = "ppo_clip"
    """The policy objective, a name of ``dler_kernels.objectives.OBJECTIVES``."""
    eps_low: float | None = None
    """Lower clip bound (PPO-clip: the ratio's 1 - eps_low); None: the objective's default (PPO-clip 0.2)."""
    eps_high: float | None = None
    """Upper clip bound (PPO-clip: the ratio's 1 + eps_high); None: the objective's default (PPO-clip 0.28)."""
    clip_c: float | None = objectives.CLIP_C_DEFAULT
    """PPO-clip's dual-clip constant for negative advantages (None: no dual clip)."""
    ratio_cap: float | None = None
    """DPPO: the cap C of the stop-gradient ratio min(r, C); None: 20."""
    tau_pos: float | None = None
    """SAPO: the gate's temperature for positive advantages; None: 1.0."""
    tau_neg: float | None = None
    """SAPO: the gate's temperature for negative advantages; None: 1.05."""
    cispo_clip: str | None = None
    """CISPO: ``both`` (verl: clip(r, 1 - eps_low, 1 + eps_high)) or ``upper`` (TRL: min(r, 1 + eps_high)); None:
    both."""
    vespo_k_pos: float | None = None
    """VESPO: k of the weight's shape for A >= 0; None: 2."""
    vespo_lambda_pos: float | None = None
    """VESPO: lambda of the weight's shape for A >= 0; None: 3."""
    vespo_k_neg: float | None = None
    """VESPO: k for A < 0; None: 3."""
    vespo_lambda_neg: float | None = None
    """VESPO: lambda for A < 0; None: 2."""
    opsm_threshold: float | None = None
    """OPSM, any objective: drop a sequence with A < 0 whose mean log(pi_old / pi) exceeds this (None: off)."""
    beta: float = 0.0
    """KL coefficient to the reference policy (0: no KL term)."""
    kl_type: str = "k3"
    """The KL estimator (``reference.KL_TYPES``)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    temperature: float = 1.0
    """Divides the logits before the softmax (equal to the sampler's)."""
    loss_agg: str = "token-mean"
    """How token losses reduce to the loss (``reference.LOSS_AGGS``)."""
    norm_length: float | None = None
    """The constant divisor of ``seq-mean-token-sum-norm`` (Dr.GRPO's max response length)."""

    def __post_init__(self):
        check_choice("loss_agg", self.loss_agg, ref.LOSS_AGGS)
        check_choice("kl_type", self.kl_type, ref.KL_TYPES)
        check_number("beta", self.beta, low=0.0)
        check_number("entropy_coef", self.entropy_coef)
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("norm_length", self.norm_length, low=0.0, low_open=True, allow_none=True)
        check_number("opsm_threshold", self.opsm_threshold, allow_none=True)
        self.objective_params()  # the objective's name and parameters, checked

    def objective_params(self) -> dict:
        """The parameters the objective reads, defaults filled in (``objectives.resolve``)."""
        return objectives.resolve(self.objective, {key: getattr(self, key) for key in objectives.PARAMETERS})


@dataclass(frozen=True)
class LossOptions(LossSettings):
    """The settings of one call, with the objective's defaults filled in, and the call's global normaliser."""

    normalizer: float | None = None
    """Replaces the local denominator (token or sequence count) with the global one (accumulation, data parallel)."""

    def __post_init__(self):
        super().__post_init__()
        check_number("normalizer", self.normalizer, low=0.0, low_open=True, allow_none=True)
        if self.loss_agg == "seq-mean-token-sum-norm" and self.norm_length is None:
            raise ValueError("norm_length is required for loss_agg='seq-mean-token-sum-norm' (the max response length)")
        for key, value in self.objective_params().items():
            object.__setattr__(self, key, value)  # resolved once: the kernels read plain numbers

    @property
    def objective_spec(self) -> objectives.Objective:
        return objectives.OBJECTIVES[self.objective]

    @property
    def fused(self) -> bool:
        """Whether the fused one-pass kernels compute this loss (a token-local objective with a kernel code,
        without OPSM's sequence mask)."""
        return self.objective_spec.fused and self.opsm_threshold is None

    @property
    def kl_code(self) -> int:
        """kl_type as the fused kernels take it: 0 without a KL term (beta == 0)."""
        return ref.KL_CODES[self.kl_type] if self.beta != 0.0 else 0

    def per_token(self) -> dict:
        """The keyword arguments of ``reference.per_token_loss_from_logprobs`` (the per-token loss)."""
        return dict(objective=self.objective, **self.objective_params(), opsm_threshold=self.opsm_threshold,
                    beta=self.beta, kl_type=self.kl_type, entropy_coef=self.entropy_coef)  # fmt: skip

    def fused_args(self) -> dict:
        """The per-token options of the fused kernels (``fused``): the objective's code and parameters, each one
        it does not read at a value the kernels ignore; CISPO's upper-only clip as eps_low = inf (its lower bound
        1 - eps_low = -inf)."""
        reads = self.objective_spec.defaults
        eps_low = 0.0 if self.eps_low is None else self.eps_low
        if self.objective == "cispo" and self.cispo_clip == "upper":
            eps_low = math.inf
        return dict(
            objective_code=self.objective_spec.kernel_code, eps_low=eps_low,
            eps_high=0.0 if self.eps_high is None else self.eps_high,
            clip_c=self.clip_c if "clip_c" in reads else None,
            ratio_cap=self.ratio_cap if "ratio_cap" in reads else 20.0,
            tau_pos=self.tau_pos if "tau_pos" in reads else 1.0, tau_neg=self.tau_neg if "tau_neg" in reads else 1.05,
            beta=self.beta, kl_type=self.kl_type, entropy_coef=self.entropy_coef,
        )  # fmt: skip

    def aggregation(self) -> dict:
        """The keyword arguments of ``reference.aggregate_ref`` besides the sequence ids."""
        return dict(loss_agg=self.loss_agg, normalizer=self.normalizer, norm_length=self.norm_length)


LOSS_OPTION_NAMES = tuple(f.name for f in fields(LossOptions))


def loss_options(given: Mapping[str, object]) -> LossOptions:
    """``LossOptions(**given)``; a name that is not an option is a ValueError naming the closest one."""
    for name in given:
        if name not in LOSS_OPTION_NAMES:
            close = difflib.get_close_matches(name, LOSS_OPTION_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown loss option {name!r}{hint}; the options are {', '.join(LOSS_OPTION_NAMES)}")
    return LossOptions(**given)


def with_loss_options(fn):
    """Give ``fn(..., **options)`` the signature that lists every loss option (``LossOptions``' fields, keyword
    only, with their defaults), so that ``help()`` and ``inspect.signature`` show them: declared once, here."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(LossOptions)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
             for f in fields(LossOptions)]  # fmt: skip
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


class TokenData(NamedTuple):
    """The per-token data of a policy-loss call, checked: [N] each; ``valid`` the bool mask;
    ``ref_logprobs`` None without a KL term; ``seq_ids`` and ``token_weights`` None when not given."""

    targets: torch.Tensor
    valid: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    seq_ids: torch.Tensor | None
    token_weights: torch.Tensor | None

    def aggregation_weights(self, options: LossOptions, dtype=torch.float32) -> torch.Tensor:
        """d(loss)/d(per-token loss) of each token (``reference.aggregation_weights``), in ``dtype``."""
        return ref.aggregation_weights(self.valid, options.loss_agg, self.seq_ids, options.normalizer,
                                       options.norm_length, dtype, self.token_weights)  # fmt: skip

    def rows(self, rows: slice) -> TokenData:
        """The data of the tokens ``rows`` (views)."""
        return TokenData(*(None if t is None else t[rows] for t in self))

    def contiguous(self) -> TokenData:
        """The same data, each tensor contiguous (what the kernels of the fused-linear path index)."""
        return TokenData(*(None if t is None else t.contiguous() for t in self))


def check_token_data(
    n, vocab, dev, targets, old_logprobs, advantages, mask, options: LossOptions, *, ref_logprobs=None, seq_ids=None,
    token_weights=None, what="logits",
) -> TokenData:  # fmt: skip
    """The per-token data of ``policy_loss`` / ``linear_policy_loss`` after their rules: data arguments do
    not require grad (``validate.check_no_grad``), the mask holds only 0 and 1, targets (of any integer dtype,
    returned as int64: ``validate.token_ids``) lie in [0, V) and the float data are finite on valid rows.
    ``what``: the argument whose rows the tokens are."""
    like = dict(device=dev, length=n, like=what)
    check_tensor("targets", targets, ndim=1, kind="int", **like)
    targets = token_ids(targets)
    check_tensor("old_logprobs", old_logprobs, ndim=1, kind="float", **like)
    check_tensor("advantages", advantages, ndim=1, kind="float", **like)
    check_tensor("mask", mask, ndim=1, kind="mask", **like)
    if options.beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when beta != 0 (the KL term needs the reference log-probs)")
        check_tensor("ref_logprobs", ref_logprobs, ndim=1, kind="float", **like)
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, kind="float", **like)
    per_sequence = options.objective_spec.sequence_level or options.opsm_threshold is not None
    if options.loss_agg != "token-mean" or per_sequence:
        if seq_ids is None:
            needs = (f"objective={options.objective!r}" if options.objective_spec.sequence_level
                     else "opsm_threshold" if options.opsm_threshold is not None
                     else f"loss_agg={options.loss_agg!r}")  # fmt: skip
            raise ValueError(f"seq_ids is required for {needs} (one sequence id per token)")
        check_tensor("seq_ids", seq_ids, ndim=1, kind="int", **like)
    data = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask, token_weights=token_weights)
    if options.beta != 0.0:
        data["ref_logprobs"] = ref_logprobs
    for name, t in data.items():
        check_no_grad(name, t)
    valid = check_mask(mask)
    finite = {k: t for k, t in data.items() if k != "mask"}
    check_valid_rows(targets, valid, vocab, "weight" if what == "hidden" else what, finite)
    return TokenData(targets, valid, old_logprobs, advantages, ref_logprobs if options.beta != 0.0 else None, seq_ids,
                     token_weights)  # fmt: skip
