r"""DPPO, Divergence-based PPO with a binary divergence mask (arXiv 2602.04879; prime-rl's default loss, verl
``dppo_tv`` / ``dppo_kl``): REINFORCE weighted by the truncated importance ratio, on the tokens whose
probability has not moved too far from the old policy's in the direction the advantage pushes.

.. math::
    \ell = -A\, \operatorname{sg}(\min(r, C))\, \log\pi\; m, \quad
    r = \exp(\operatorname{clamp}(\log\pi - \log\pi_{old}, -20, 20))

with the mask m (no gradient) from p = pi(token), q = pi_old(token):

* ``dppo_tv`` (total variation of the two-point distribution): m = [p - q <= eps_high] if A > 0,
  [p - q >= -eps_low] otherwise.
* ``dppo_kl`` (binary KL, D = q log(q/p) + (1-q) log((1-q+1e-8)/(1-p+1e-8))): m = [D <= eps_high or p <= q]
  if A > 0, [D <= eps_low or p >= q] otherwise.

``ratio_cap`` is C, the truncation (verl reads it from ``clip_ratio_c`` with 20 as its fallback: the default
here). Both masks are verl's expressions, term for term.
"""

from __future__ import annotations

import torch

from .base import LOG_RATIO_CLAMP, Objective

BINARY_KL_EPS = 1e-8  # verl's guard inside log((1 - q) / (1 - p)) for probabilities of 1


def _loss(logp, old, adv, mask, p):
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weight = torch.clamp(ratio, max=p["ratio_cap"]).detach()
    return -adv * weight * logp * mask.detach().to(logp.dtype)


def pg_tv(logp, old, adv, valid, seqs, p):
    moved = torch.exp(logp) - torch.exp(old)
    mask = torch.where(adv > 0, moved <= p["eps_high"], moved >= -p["eps_low"])
    return _loss(logp, old, adv, mask, p)


def pg_kl(logp, old, adv, valid, seqs, p):
    prob, old_prob = torch.exp(logp), torch.exp(old)
    kl = old_prob * (old - logp) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + BINARY_KL_EPS) / (1.0 - prob + BINARY_KL_EPS)
    )
    mask = torch.where(adv > 0, (kl <= p["eps_high"]) | (prob <= old_prob), (kl <= p["eps_low"]) | (prob >= old_prob))
    return _loss(logp, old, adv, mask, p)


_DEFAULTS = {"eps_low": 0.2, "eps_high": 0.2, "ratio_cap": 20.0}
DPPO_TV = Objective("dppo_tv", pg_tv, defaults=_DEFAULTS, kernel_code=3, paper="arXiv 2602.04879")
DPPO_KL = Objective("dppo_kl", pg_kl, defaults=_DEFAULTS, kernel_code=4, paper="arXiv 2602.04879")
