"""The objectives without a fused kernel (the sequence-level ones, and any with OPSM's sequence mask), on every
backend, in two passes over the logits.

1. The backend's log-prob kernel gives each row's log-prob and entropy (and, from them, its log-sum-exp).
2. The objective (``dler_kernels.objectives``: the same function the reference differentiates through the
   logits) runs on those [N] vectors; autograd gives d(loss)/d(log-prob) and d(loss)/d(entropy) per row.
3. The backend's slab kernel turns them into d(loss)/d(logits): [dlogp (onehot - p) - dent p (log p + H)] / T.

Against the fused kernel this costs one more read of the logits (the logits path) or one more LM-head
matmul (the fused-linear path, ``linear_policy_loss.objective_linear``), the price of a sequence-level objective,
which needs every token's log-prob before any gradient. Memory is the fused kernel's: the gradient buffer (or the
logits themselves with ``inplace_grad``) and O(N) vectors.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .loss_inputs import LossOptions, TokenData
from .stored_grad import StoredGradLoss, tracing


def objective_terms(logp, entropy, data: TokenData, options: LossOptions, weights, want_grad: bool):
    """``(per_token, kl, dlogp, dent)`` of the objective on the rows' log-probs and entropies (float32/64 [N]):
    d(sum(weights * per_token))/d(logp) and /d(entropy), None without ``want_grad``."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(want_grad)
        ent = entropy.detach().requires_grad_(want_grad)
        loss, per_token, _, _, kl = objective_loss(lp, ent, data, options, weights)
        dlogp = dent = None
        if want_grad:
            dlogp, dent = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
    return per_token, kl, dlogp, dent


def row_statistics(backend, z, targets, valid, temperature, dtype):
    """(logp, entropy, lse) of the rows of ``z`` in ``dtype``, 0 on invalid rows, from the backend's log-prob kernel.
    The log-sum-exp of z / T comes from the kernel's own log-prob, lse = z[target] / T - logp (exact up to one
    rounding of |lse| in ``dtype``), so no kernel needs a third output."""
    safe = torch.where(valid, targets, 0)
    logp, entropy = backend.token_logprobs(z, torch.where(valid, targets, -1), temperature, True)
    logp, entropy = logp.to(dtype), entropy.to(dtype)
    z_target = z.gather(1, safe[:, None].long())[:, 0].to(dtype) * (1.0 / temperature)
    lse = torch.where(valid, z_target - logp, 0.0)
    return logp, entropy, lse


class RowLogprobs(torch.autograd.Function):
    """Differentiable ``row_statistics``: (logp, entropy, lse) of the rows, whose backward is the backend's slab
    kernel. The two-pass path while torch.compile traces: its graph cannot hold the eager path's
    torch.autograd.grad inside a forward, so autograd chains the objective's backward into this one instead. The
    same kernels and the same objective function as the eager path, so the same result."""

    @staticmethod
    def forward(ctx, z, backend, targets, valid, temperature, dtype):
        logp, entropy, lse = row_statistics(backend, z, targets, valid, temperature, dtype)
        ctx.save_for_backward(z, targets, valid, lse, entropy)
        ctx.backend, ctx.temperature = backend, temperature
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, dlogp, dent, _):
        z, targets, valid, lse, entropy = ctx.saved_tensors
        grad = z.clone()
        ctx.backend.slab_grad_(grad, targets, valid, lse, entropy, dlogp.contiguous(), dent.contiguous(), 0,
                               ctx.temperature)  # fmt: skip
        return grad, None, None, None, None, None


def objective_loss(logp, entropy, data: TokenData, options: LossOptions, weights):
    """``(loss, per_token, logp, entropy, kl)`` of the objective on differentiable log-probs and entropies, all but
    the loss detached. The eager two-pass paths differentiate the loss inside their forward (``objective_terms``);
    while torch.compile traces, whose graph cannot hold that torch.autograd.grad, autograd chains the objective's
    backward into the log-probs' own (``RowLogprobs``; ``linear_policy_loss``'s differentiable log-probs)."""
    per_token, kl = ref.per_token_loss_from_logprobs(
        logp, entropy, data.old_logprobs, data.advantages, data.valid, ref_logprobs=data.ref_logprobs,
        seq_ids=data.seq_ids, **options.per_token(),
    )  # fmt: skip
    loss = (per_token * weights.to(per_token.dtype)).sum()
    return loss, per_token.detach(), logp.detach(), entropy.detach(), None if kl is None else kl.detach()


def policy_loss_two_pass(backend, logits, data: TokenData, options: LossOptions, inplace_grad: bool):
    """The logits path of an objective without a fused kernel: ``Backend.policy_loss``'s outputs."""
    dtype = ref.accumulation_dtype(logits)
    weights = data.aggregation_weights(options, dtype)
    valid, temperature = data.valid, options.temperature
    targets = torch.where(valid, data.targets, 0).contiguous()
    want_grad = inplace_grad or (torch.is_grad_enabled() and logits.requires_grad)

    def kernel(z, grad):
        with torch.no_grad():
            logp, entropy, lse = row_statistics(backend, z, targets, valid, temperature, dtype)
        per_token, kl, dlogp, dent = objective_terms(logp, entropy, data, options, weights, grad is not None)
        if grad is not None:
            with torch.no_grad():
                if grad is not z:
                    grad.copy_(z)
                backend.slab_grad_(grad, targets, valid, lse, entropy, dlogp.contiguous(), dent.contiguous(), 0,
                                   temperature)  # fmt: skip
        return per_token, logp, entropy, kl

    if want_grad:
        if not logits.is_contiguous():
            raise ValueError("logits must be contiguous for objectives without a fused kernel; call .contiguous()")
        if tracing(logits):
            if inplace_grad:
                raise ValueError(
                    f"inplace_grad=True under torch.compile is supported by objective='ppo_clip' only (its fused "
                    f"kernel), not objective={options.objective!r}: pass inplace_grad=False"
                )
            logp, entropy, _ = RowLogprobs.apply(logits, backend, targets, valid, temperature, dtype)
            return objective_loss(logp, entropy, data, options, weights)
        return StoredGradLoss.apply(logits, weights, kernel, inplace_grad)
    per_token, logp, entropy, kl = kernel(logits, None)
    return (per_token * weights).sum(), per_token, logp, entropy, kl
