"""Autograd for losses whose forward already computed their gradients: backward only scales them.

Backend-neutral (every fused kernel and the reference's ``inplace_grad`` use it) and a leaf: it
imports torch only, no other module of the package.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is traced (torch.compile, AOTAutograd: fake or functional tensors, a dispatch mode)
    rather than a real tensor whose value can be read."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor or is_in_torch_dispatch_mode()


def scale_stored_grads(grad_loss: torch.Tensor, *grads):
    """Gradients the forward already computed (None for those not needed), times the incoming
    d(output)/d(loss). loss.backward() (an incoming 1) needs no extra pass over them; under tracing
    the value is unknown, so they are always scaled."""
    if not tracing(grad_loss) and grad_loss.item() == 1.0:
        return grads
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


class StoredGradFunction(torch.autograd.Function):
    """Base of the autograd functions whose forward saves (``save_for_backward``) the gradients of its
    first inputs, in input order, None for one not needed; every later input gets no gradient."""

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        n_inputs = len(ctx.needs_input_grad)
        if grad_loss is None:
            return (None,) * n_inputs
        stored = ctx.saved_tensors
        return (*scale_stored_grads(grad_loss, *stored), *([None] * (n_inputs - len(stored))))


class StoredGradLoss(StoredGradFunction):
    """A fused kernel that writes d(loss)/d(logits) while it computes the loss (``kernel(logits, grad)
    -> (per_token, logp, entropy, kl)``, grad the logits themselves when ``inplace``); the loss is the
    per-token loss weighted by the aggregation ``weights``."""

    @staticmethod
    def forward(ctx, logits, weights, kernel, inplace):
        grad = logits if inplace else torch.empty_like(logits)
        per_token, logp, entropy, kl = kernel(logits, grad)
        loss = (per_token * weights.to(per_token.dtype)).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_token, logp, entropy, *([kl] if kl is not None else []))
        ctx.set_materialize_grads(False)
        return loss, per_token, logp, entropy, kl


class PrecomputedGradLoss(StoredGradFunction):
    """A loss computed elsewhere whose gradient w.r.t. ``logits`` the caller has already written into
    ``logits`` (the reference backend's ``inplace_grad``)."""

    @staticmethod
    def forward(ctx, logits, loss):
        ctx.save_for_backward(logits)
        ctx.set_materialize_grads(False)
        return loss.clone()
