"""The ``reference`` backend: plain torch on any device, one object implementing ``Backend`` and
``AdvantagesBackend``. The logits path and the advantages are the reference itself
(``dler_kernels.reference``); the fused-linear row pass and slab gradient are the arithmetic of the
Triton kernels written in torch, around the reference's per-token loss."""

from __future__ import annotations

import torch

from . import reference as ref
from .backend import TORCH_SLAB_ELEMENTS, AdvantagesBackend, Backend
from .stored_grad import PrecomputedGradLoss


def _detached(t):
    return None if t is None else t.detach()


class TorchBackend(Backend, AdvantagesBackend):
    name = "reference"
    chunk_elements = TORCH_SLAB_ELEMENTS

    def token_logprobs(self, logits, targets, temperature, return_entropy):
        # the reference's entropy is another pass over N x V: skip it when not asked for
        return ref.token_logprobs_terms_ref(logits, targets, temperature=temperature, return_entropy=return_entropy)

    def policy_loss(self, logits, data, options, inplace_grad):
        """With ``inplace_grad``: the same outputs as without it, and the logits overwritten by autograd's
        gradient, through one N x V copy (the reference is not memory-lean)."""

        def terms(x):
            return ref.policy_loss_terms_ref(
                x, data.targets, data.old_logprobs, data.advantages, data.valid, ref_logprobs=data.ref_logprobs,
                seq_ids=data.seq_ids, token_weights=data.token_weights, temperature=options.temperature,
                **options.per_token(), **options.aggregation(),
            )  # fmt: skip

        if not inplace_grad:
            loss, per_token, logp, entropy, kl = terms(logits)
            return loss, per_token.detach(), logp.detach(), entropy.detach(), _detached(kl)
        x = logits.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss, per_token, logp, entropy, kl = terms(x)
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            logits.copy_(grad)
        loss = PrecomputedGradLoss.apply(logits, loss.detach())
        return loss, per_token.detach(), logp.detach(), entropy.detach(), _detached(kl)

    def rows(self, z, data, weights, options, want_grad, want_state):
        """The arithmetic of the Triton row kernel: log-softmax statistics, then the reference's per-token
        loss on the [rows] vectors (log-prob, entropy), differentiated by autograd there, then the gradient
        formula of ``_grad_tile`` over the chunk. Working memory: two float32 copies of the chunk and one
        temporary."""
        valid, temperature = data.valid, options.temperature
        dtype = ref.accumulation_dtype(z)
        logp_all = z.to(dtype, copy=True).masked_fill_(~valid.unsqueeze(-1), 0.0).mul_(1.0 / temperature)
        lse = _row_lse(logp_all)
        logp_all.sub_(lse.unsqueeze(-1))
        tgt = torch.where(valid, data.targets, 0).unsqueeze(-1)
        logp = torch.where(valid, logp_all.gather(1, tgt).squeeze(1), 0.0)  # -inf: a probability-0 target
        p = torch.exp(logp_all.clamp_min_(ref.LOGP_FLOOR))  # p log p = 0 at p = 0 (reference.LOGP_FLOOR)
        entropy = torch.where(valid, -(p * logp_all).sum(-1), 0.0)
        with torch.enable_grad():
            lp, ent = logp.requires_grad_(want_grad), entropy.requires_grad_(want_grad)
            per_token, kl = ref.per_token_loss_from_logprobs(
                lp, ent, data.old_logprobs, data.advantages, valid, ref_logprobs=data.ref_logprobs,
                **options.per_token(),
            )  # fmt: skip
            if want_grad:
                loss = (per_token * weights.to(dtype)).sum()
                dlogp, dent = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
        if not want_grad:
            return _detached(per_token), _detached(logp), _detached(entropy), _detached(kl), None
        _write_grad_(z, logp_all, p, data.targets, valid, entropy.detach(), dlogp, dent, 0, temperature)
        state = (lse, dlogp, dent) if want_state else None
        return _detached(per_token), _detached(logp), _detached(entropy), _detached(kl), state

    def slab_grad_(self, z, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
        logp_all = z.to(lse.dtype, copy=True).mul_(1.0 / temperature).sub_(lse.unsqueeze(-1))
        p = torch.exp(logp_all.clamp_min_(ref.LOGP_FLOOR))
        _write_grad_(z, logp_all, p, targets, valid, entropy, dlogp, dent, col0, temperature)

    def advantages(self, rewards, group_ids, **options):
        return ref.compute_advantages_ref(rewards, group_ids, **options)


def _row_lse(logp_all):
    """Each row's log-sum-exp as the kernels take it: NaN for a row holding +inf (torch's logsumexp says +inf,
    which would make every other log-prob -inf, the error of a probability-0 target), and 0 for a row of only
    -inf (no distribution: its logits minus 0 stay -inf, where -inf - -inf would be NaN; log-prob -inf,
    entropy 0, gradient 0)."""
    lse = torch.logsumexp(logp_all, dim=-1)
    lse.masked_fill_(lse == float("inf"), float("nan"))
    return lse.masked_fill_(lse == -float("inf"), 0.0)


def _write_grad_(z, logp_all, p, targets, valid, entropy, dlogp, dent, col0, temperature):
    """z <- d(loss)/d(z) for the vocab columns col0 .. col0 + width of each row, the formula of the
    Triton ``_grad_tile``: [dlogp (onehot - p) - dent p (log p + H)] / T. ``logp_all`` (log p, floored at
    ``reference.LOGP_FLOOR``: a -inf logit gets exactly 0, its p = 0 never meeting -inf) and ``p`` (float32
    [rows, width]) are used up as the buffers it is built in; masked rows get 0."""
    logp_all.add_(entropy.unsqueeze(-1)).mul_(p).mul_(dent.unsqueeze(-1))
    p.mul_(dlogp.unsqueeze(-1)).add_(logp_all).neg_()
    local = targets - col0
    hit = valid & (local >= 0) & (local < z.shape[1])
    # a scatter of 0 on the rows without their target here: no shape depends on the data (torch.compile)
    p.scatter_add_(1, torch.where(hit, local, 0).unsqueeze(-1), torch.where(hit, dlogp, 0.0).unsqueeze(-1).to(p.dtype))
    p.mul_(1.0 / temperature).masked_fill_(~valid.unsqueeze(-1), 0.0)
    z.copy_(p)
