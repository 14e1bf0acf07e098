"""Public API of the advantage computation (GRPO, Dr.GRPO, DLER batch normalisation) and the
dynamic-sampling keep-mask: the arguments checked, then handed to the backend ``dispatch`` chooses.
Semantics: ``reference.compute_advantages_ref``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference as ref
from .dispatch import ADVANTAGES_BACKENDS, select_backend
from .validate import check_choice, check_no_grad, check_number, check_tensor


class Advantages(NamedTuple):
    values: torch.Tensor  # [B] float32, one advantage per response (0 where not kept)
    keep: torch.Tensor  # [B] bool, the dynamic-sampling mask
    stats: dict[str, torch.Tensor]


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    method: str = "dler",
    correctness: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    weighting: str = "token",
    eps: float = 1e-6,
    dynamic_sampling: bool = True,
) -> Advantages:
    """Advantages of B responses grouped by prompt (``group_ids`` [B]).

    ``rewards`` [B] are the penalised rewards R'; ``correctness`` [B] (default ``rewards``) decides
    which groups dynamic sampling keeps (those with spread); ``token_counts`` [B] are response
    lengths, needed for DLER's token-weighted batch statistics. All three are data: finite, and (with
    grad mode on) not requiring grad, on every backend (advantages are the policy loss's constants).
    """
    check_tensor("rewards", rewards, ndim=1, kind="float")
    b, dev = rewards.shape[0], rewards.device
    check_tensor("group_ids", group_ids, ndim=1, kind="int", device=dev, length=b)
    check_choice("method", method, ref.ADVANTAGE_METHODS)
    check_choice("weighting", weighting, ref.WEIGHTINGS)
    check_number("eps", eps, low=0.0)
    if correctness is not None:
        check_tensor("correctness", correctness, ndim=1, kind="mask", device=dev, length=b)
    if method == "dler" and weighting == "token":
        if token_counts is None:
            raise ValueError("token_counts is required for method='dler' with weighting='token' (response lengths)")
    if token_counts is not None:
        check_tensor("token_counts", token_counts, ndim=1, kind="mask", device=dev, length=b)
        if token_counts.numel() and not bool(torch.isfinite(token_counts).all()):
            raise ValueError("token_counts must be finite (response lengths in tokens)")
        if token_counts.numel() and bool((token_counts < 0).any()):
            raise ValueError("token_counts must be >= 0 (response lengths in tokens)")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    if correctness is not None and correctness.numel() and not bool(torch.isfinite(correctness).all()):
        raise ValueError("correctness must be finite (it decides which groups dynamic sampling keeps)")
    for name, t in (("rewards", rewards), ("correctness", correctness), ("token_counts", token_counts)):
        check_no_grad(name, t)
    options = dict(
        method=method,
        correctness=correctness,
        token_counts=token_counts,
        weighting=weighting,
        eps=eps,
        dynamic_sampling=dynamic_sampling,
    )
    backend = select_backend(rewards, supported=ADVANTAGES_BACKENDS)
    values, keep, stats = backend.advantages(rewards, group_ids, **options)
    return Advantages(values.float(), keep, stats)
