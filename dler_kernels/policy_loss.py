"""Public API of the logits path: ``policy_loss`` and ``token_logprobs``.

Semantics: ``dler_kernels.reference`` (module docstring). These functions check their
arguments (the one validator of every backend), then dispatch (``dler_kernels._backend``): the
fused Triton kernel, the C++/CUDA kernels of the extension ``dler_kernels._C``, or the plain-torch
reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ext
from . import reference as ref
from ._backend import backend_for
from ._validate import (
    check_choice,
    check_mask,
    check_no_grad,
    check_number,
    check_targets,
    check_tensor,
    check_valid_rows,
)


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logits
    per_token_loss: torch.Tensor  # [N] float32, 0 on masked rows (detached)
    logprobs: torch.Tensor  # [N] float32 log-prob of each target at the temperature (detached)
    entropy: torch.Tensor  # [N] float32 entropy of each row's distribution (detached)
    metrics: dict[str, torch.Tensor]  # 0-d tensors; see reference.policy_metrics_ref


def _check_logits(logits) -> int:
    check_tensor("logits", logits, ndim=2, kind="float")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column (the vocab size V), got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocab dimension (stride(-1) == 1); call .contiguous()")
    return logits.shape[0]


def _check_loss_options(
    n, vocab, dev, targets, old_logprobs, advantages, mask, *, ref_logprobs, seq_ids, eps_low, eps_high, clip_c,
    beta, kl_type, entropy_coef, temperature, loss_agg, normalizer, norm_length, token_weights=None, what="logits",
) -> torch.Tensor:  # fmt: skip
    """The checks shared by ``policy_loss`` and ``linear_policy_loss``; returns the bool mask. The rules
    (the same for every backend, checked before any kernel runs): data arguments do not require grad
    (``_validate.check_no_grad``), the mask holds only 0 and 1, targets lie in [0, V) and the float
    data are finite on valid rows."""
    like = dict(device=dev, length=n, like=what)
    check_tensor("targets", targets, ndim=1, kind="int", **like)
    check_tensor("old_logprobs", old_logprobs, ndim=1, kind="float", **like)
    check_tensor("advantages", advantages, ndim=1, kind="float", **like)
    check_tensor("mask", mask, ndim=1, kind="mask", **like)
    check_choice("loss_agg", loss_agg, ref.LOSS_AGGS)
    check_choice("kl_type", kl_type, ref.KL_TYPES)
    check_number("eps_low", eps_low, low=0.0, high=1.0)
    check_number("eps_high", eps_high, low=0.0)
    check_number("clip_c", clip_c, low=1.0, low_open=True, allow_none=True)
    check_number("beta", beta, low=0.0)
    check_number("entropy_coef", entropy_coef)
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_number("normalizer", normalizer, low=0.0, low_open=True, allow_none=True)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when beta != 0 (the KL term needs the reference log-probs)")
        check_tensor("ref_logprobs", ref_logprobs, ndim=1, kind="float", **like)
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, kind="float", **like)
    if loss_agg != "token-mean":
        if seq_ids is None:
            raise ValueError(f"seq_ids is required for loss_agg={loss_agg!r} (one sequence id per token)")
        check_tensor("seq_ids", seq_ids, ndim=1, kind="int", **like)
    if loss_agg == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("norm_length is required for loss_agg='seq-mean-token-sum-norm' (the max response length)")
        check_number("norm_length", norm_length, low=0.0, low_open=True)
    data = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask, token_weights=token_weights)
    if beta != 0.0:
        data["ref_logprobs"] = ref_logprobs
    for name, t in data.items():
        check_no_grad(name, t)
    valid = check_mask(mask)
    finite = {k: t for k, t in data.items() if k != "mask"}
    check_valid_rows(targets, valid, vocab, "weight" if what == "hidden" else what, finite)
    return valid


def _tracing(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return torch.compiler.is_compiling() or type(t) is not torch.Tensor or is_in_torch_dispatch_mode()


def scale_stored_grads(grad_loss: torch.Tensor, *grads):
    """Gradients the forward already computed (None for those not needed), times the incoming
    d(output)/d(loss). loss.backward() (an incoming 1) needs no extra pass over them; under tracing
    (torch.compile, AOTAutograd: fake or functional tensors, a dispatch mode) the value is unknown,
    so they are always scaled."""
    if not _tracing(grad_loss) and grad_loss.item() == 1.0:
        return grads
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


class _StoredGradLoss(torch.autograd.Function):
    """A fused kernel that writes d(loss)/d(logits) while it computes the loss (``kernel(logits, grad)
    -> (per_token, logp, entropy, kl)``, grad the logits themselves when ``inplace``); backward only
    scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, weights, kernel, inplace):
        grad = logits if inplace else torch.empty_like(logits)
        per_token, logp, entropy, kl = kernel(logits, grad)
        loss = (per_token * weights.to(per_token.dtype)).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_token, logp, entropy, *([kl] if kl is not None else []))
        ctx.set_materialize_grads(False)
        return loss, per_token, logp, entropy, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return None, None, None, None
        (grad,) = ctx.saved_tensors
        return (*scale_stored_grads(grad_loss, grad), None, None, None)


class _ReferenceInplaceLoss(torch.autograd.Function):
    """``inplace_grad`` on the reference backend: the reference's loss, whose gradient (autograd's, on a
    copy of the logits) the caller has already written into the logits; backward scales it, as
    ``_StoredGradLoss`` does for the fused kernels."""

    @staticmethod
    def forward(ctx, logits, loss):
        ctx.save_for_backward(logits)
        ctx.set_materialize_grads(False)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None
        (grad,) = ctx.saved_tensors
        return (*scale_stored_grads(grad_loss, grad), None)


def _reference_inplace(logits, targets, old_logprobs, advantages, valid, options):
    """The reference backend with ``inplace_grad``: the same outputs as without it, and the logits
    overwritten by the gradient (through one N x V copy: the reference is not memory-lean)."""
    x = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, per_token, logp, entropy, metrics = ref.policy_loss_ref(x, targets, old_logprobs, advantages, valid,
                                                                      **options)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        logits.copy_(grad)
    return _ReferenceInplaceLoss.apply(logits, loss.detach()), per_token, logp, entropy, metrics


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """Log-prob of each target under ``softmax(logits / temperature)``, in float32, without gradient.

    ``logits`` [N, V], ``targets`` [N]; a negative target marks a padding row (log-prob 0).
    Returns ``logprobs`` [N], or ``(logprobs, entropy)`` with ``return_entropy``. ``backend``:
    ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see ``dler_kernels._backend``).
    """
    n = _check_logits(logits)
    check_tensor("targets", targets, ndim=1, kind="int", device=logits.device, length=n)
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_targets(targets, targets >= 0, logits.shape[1])
    logp, entropy = _token_logprobs(logits, targets, temperature, return_entropy, backend_for(logits, backend))
    return (logp.float(), entropy.float()) if return_entropy else logp.float()


@torch.no_grad()
def _token_logprobs(logits, targets, temperature, return_entropy, backend):
    """``token_logprobs`` on checked arguments: (logp, entropy or None) in the backend's dtype."""
    if backend == "triton":
        from .triton_policy_loss import triton_token_logprobs

        return triton_token_logprobs(logits, targets, temperature)
    if backend in ("cpu", "cuda"):
        return _ext.token_logprobs(logits, targets, temperature)
    if return_entropy:
        return ref.token_logprobs_ref(logits, targets, temperature=temperature, return_entropy=True)
    # the reference's entropy is another pass over N x V: skip it when not asked for
    return ref.token_logprobs_ref(logits, targets, temperature=temperature), None


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = 10.0,
    beta: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    normalizer: float | None = None,
    norm_length: float | None = None,
    token_weights: torch.Tensor | None = None,
    inplace_grad: bool = False,
    backend: str | None = None,
) -> PolicyLossOutput:
    """Clipped policy-gradient loss with dual clip, KL to a reference and an entropy bonus.

    Packed inputs: ``logits`` [N, V]; ``targets``, ``old_logprobs``, ``advantages``, ``mask``
    (and ``ref_logprobs``, ``seq_ids``) [N]. ``normalizer`` replaces the local denominator
    (token count for ``token-mean``, sequence count for ``seq-mean-*``) with a global one, so
    that gradient accumulation and data parallelism equal one big batch. ``norm_length`` is the
    constant of ``seq-mean-token-sum-norm`` (Dr.GRPO's max response length). ``token_weights`` [N]
    (float, no gradient) multiply each token's loss before the aggregation, e.g. truncated
    importance-sampling weights of a rollout engine; ``per_token_loss`` is returned without them. ``inplace_grad``:
    the gradient overwrites the logits on every backend (saves an N x V buffer, except on the reference,
    which works on a copy; the logits are lost). ``backend``:
    ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see ``dler_kernels._backend``).

    Input rules, the same on every backend (the reference included), each a ``ValueError`` naming the
    argument before any kernel runs:

    * Only ``logits`` are differentiated. ``old_logprobs``, ``advantages``, ``ref_logprobs``,
      ``token_weights`` and ``mask`` are data: one that requires grad (with grad mode on) is refused, not
      silently left without a gradient. The clipped surrogate treats the old policy's log-probs and the
      advantages as constants (PPO, GRPO, verl and TRL all detach them); a graph-attached advantage is
      almost always a forgotten ``.detach()`` (e.g. a critic's baseline), and letting the actor loss
      push gradient into it would be wrong, so the fix is the caller's ``.detach()``.
    * ``mask``: bool, or numbers exactly 0 or 1 (0.5, 2 or NaN are refused; weights go in
      ``token_weights``). ``targets``: integers in [0, V) on valid rows. ``logits``: V >= 1 columns.
    * ``old_logprobs``, ``advantages``, ``token_weights`` (and ``ref_logprobs`` when ``beta != 0``)
      are finite on valid rows; masked rows may hold anything.
    * N = 0 tokens: empty per-token outputs, loss 0, an empty gradient.
    """
    n = _check_logits(logits)
    valid = _check_loss_options(
        n, logits.shape[1], logits.device, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
        seq_ids=seq_ids, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, beta=beta, kl_type=kl_type,
        entropy_coef=entropy_coef, temperature=temperature, loss_agg=loss_agg, normalizer=normalizer,
        norm_length=norm_length, token_weights=token_weights,
    )  # fmt: skip

    options = dict(
        ref_logprobs=ref_logprobs,
        seq_ids=seq_ids,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_c=clip_c,
        beta=beta,
        kl_type=kl_type,
        entropy_coef=entropy_coef,
        temperature=temperature,
        loss_agg=loss_agg,
        normalizer=normalizer,
        norm_length=norm_length,
        token_weights=token_weights,
    )
    backend = backend_for(logits, backend)
    if backend == "reference":
        if inplace_grad:
            loss, per_token, logp, entropy, metrics = _reference_inplace(
                logits, targets, old_logprobs, advantages, valid, options
            )
        else:
            loss, per_token, logp, entropy, metrics = ref.policy_loss_ref(
                logits, targets, old_logprobs, advantages, valid, **options
            )
        return PolicyLossOutput(loss.float(), per_token.float(), logp.float(), entropy.float(), metrics)
    if backend == "triton":
        from .triton_policy_loss import triton_policy_loss

        loss, per_token, logp, entropy, kl = triton_policy_loss(
            logits, targets, old_logprobs, advantages, valid, inplace_grad=inplace_grad, **options
        )
    else:
        weights = ref.aggregation_weights(
            valid, loss_agg, seq_ids, normalizer, norm_length, ref._compute_dtype(logits), token_weights
        )
        args = _ext.loss_args(
            targets, valid, old_logprobs, advantages, ref_logprobs, weights, temperature=temperature, eps_low=eps_low,
            eps_high=eps_high, clip_c=clip_c, beta=beta, kl_type=kl_type, entropy_coef=entropy_coef,
        )  # fmt: skip
        loss, per_token, logp, entropy, kl = _ext.policy_loss(logits, args, weights, inplace_grad=inplace_grad)
        kl = kl if beta != 0.0 else None  # the extension returns zeros without a KL term
    with torch.no_grad():
        metrics = ref.policy_metrics_ref(
            logp, old_logprobs, advantages, entropy, valid, eps_low, eps_high, clip_c, kl, per_token
        )
    return PolicyLossOutput(loss.float(), per_token.float(), logp.float(), entropy.float(), metrics)
