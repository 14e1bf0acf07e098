r"""VESPO (arXiv 2602.10693), as TRL (``loss_type="vespo"``) and Liger implement it: REINFORCE weighted per
sequence by a smooth, stop-gradient function of the sequence's importance weight, which damps both very
off-policy sequences and those that barely moved.

.. math::
    \log w_i = \operatorname{clamp}\Big(\sum_t \operatorname{clamp}(\log\pi_{i,t} - \log\pi_{old,i,t}, -20, 20),
    \ln 10^{-8}, 20\Big), \quad
    \phi_i = \exp(\lambda + k \log w_i - \lambda w_i), \quad \ell_{i,t} = -\operatorname{sg}(\phi_i)\, A\, \log\pi_{i,t}

:math:`w_i` is the product of the token ratios (not their geometric mean); :math:`\phi(1) = 1`. (k, lambda) are
``vespo_k_pos``, ``vespo_lambda_pos`` for A >= 0 and the ``_neg`` pair otherwise (TRL's defaults 2, 3, 3, 2);
lambda is floored at 1e-4 and a non-finite phi becomes 0, as in TRL. TRL also folds vLLM's importance ratio into
log w; here a rollout correction enters as ``token_weights`` instead, multiplying the loss (the trainer's
rollout corrections compose that way with every objective).
"""

from __future__ import annotations

import math

import torch

from .base import LOG_RATIO_CLAMP, Objective

LOG_W_MIN = math.log(1e-8)  # TRL's floor of the sequence's log-weight
LAMBDA_MIN = 1e-4  # TRL's floor of lambda


def pg(logp, old, adv, valid, seqs, p):
    with torch.no_grad():
        log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        log_w = seqs.per_token(torch.clamp(seqs.sum(log_ratio), LOG_W_MIN, LOG_RATIO_CLAMP))
        positive = adv >= 0
        k = torch.full_like(logp, p["vespo_k_neg"]).masked_fill(positive, p["vespo_k_pos"])
        lam = torch.full_like(logp, max(p["vespo_lambda_neg"], LAMBDA_MIN))
        lam = lam.masked_fill(positive, max(p["vespo_lambda_pos"], LAMBDA_MIN))
        phi = torch.nan_to_num(torch.exp(lam + k * log_w - lam * torch.exp(log_w)), nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * adv * logp


VESPO = Objective(
    "vespo", pg, sequence_level=True, paper="arXiv 2602.10693",
    defaults={"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
)  # fmt: skip
