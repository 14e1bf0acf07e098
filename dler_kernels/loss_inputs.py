"""What a policy-loss call is given, and its rules: the options (``LossOptions``, a frozen dataclass
checked once when it is made), the per-token data (``TokenData``) and ``check_token_data``, shared by
``policy_loss`` and ``linear_policy_loss``. The rules are the same for every backend and are checked
before any kernel runs; semantics of the options: ``dler_kernels.reference``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

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
class LossOptions:
    """The scalar options of the policy loss (defaults: DLER's), each checked here."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float | None = 10.0
    beta: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    loss_agg: str = "token-mean"
    normalizer: float | None = None
    norm_length: float | None = None

    def __post_init__(self):
        check_choice("loss_agg", self.loss_agg, ref.LOSS_AGGS)
        check_choice("kl_type", self.kl_type, ref.KL_TYPES)
        check_number("eps_low", self.eps_low, low=0.0, high=1.0)
        check_number("eps_high", self.eps_high, low=0.0)
        check_number("clip_c", self.clip_c, low=1.0, low_open=True, allow_none=True)
        check_number("beta", self.beta, low=0.0)
        check_number("entropy_coef", self.entropy_coef)
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("normalizer", self.normalizer, low=0.0, low_open=True, allow_none=True)
        if self.loss_agg == "seq-mean-token-sum-norm":
            if self.norm_length is None:
                raise ValueError(
                    "norm_length is required for loss_agg='seq-mean-token-sum-norm' (the max response length)"
                )
            check_number("norm_length", self.norm_length, low=0.0, low_open=True)

    @property
    def kl_code(self) -> int:
        """kl_type as the fused kernels take it: 0 without a KL term (beta == 0)."""
        return ref.KL_CODES[self.kl_type] if self.beta != 0.0 else 0

    def per_token(self) -> dict:
        """The keyword arguments of ``reference.per_token_loss_from_logprobs`` (the per-token loss)."""
        return dict(eps_low=self.eps_low, eps_high=self.eps_high, clip_c=self.clip_c, beta=self.beta,
                    kl_type=self.kl_type, entropy_coef=self.entropy_coef)  # fmt: skip

    def aggregation(self) -> dict:
        """The keyword arguments of ``reference.aggregate_ref`` besides the sequence ids."""
        return dict(loss_agg=self.loss_agg, normalizer=self.normalizer, norm_length=self.norm_length)


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
    if options.loss_agg != "token-mean":
        if seq_ids is None:
            raise ValueError(f"seq_ids is required for loss_agg={options.loss_agg!r} (one sequence id per token)")
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
