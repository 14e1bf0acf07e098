r"""GMPO, Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673): the geometric mean of the
token ratios per sequence, each token's log-ratio clipped in a sign-aware way first, so that outlier tokens
weigh less than in GRPO's arithmetic mean.

.. math::
    \tilde\ell_t = \operatorname{sgn}(A) \min(\operatorname{sgn}(A) \log r_t,\;
    \operatorname{sgn}(A) \operatorname{clip}(\log r_t, -\epsilon_{low}, \epsilon_{high})), \quad
    \ell_i = -\bar A_i \exp\Big(\frac{1}{|y_i|}\sum_t \tilde\ell_t\Big)

:math:`\bar A_i` is the mean advantage over the sequence's tokens. As in verl ``compute_policy_loss_geo_mean``
(adapted from the authors' ``train_zero_math_gmpo.py``) the bounds clip the log-ratio itself, not the ratio, and
the log-ratio is not clamped to +-20. Every token of a sequence carries that sequence's loss, so
``loss_agg="seq-mean-token-mean"`` gives verl's mean over sequences (verl ignores ``loss_agg_mode`` for GMPO and
averages over every sequence of the micro-batch, an empty one included; here a sequence without a valid token
counts for nothing, as in every aggregation). Default bounds: 0.4 on each side of the log-ratio, the paper's
clip range (e^-0.4, e^0.4).
"""

from __future__ import annotations

import torch

from .base import Objective


def pg(logp, old, adv, valid, seqs, p):
    log_ratio = logp - old
    sign = torch.sign(adv)
    clipped = torch.clamp(log_ratio, -p["eps_low"], p["eps_high"])
    log_ratio = sign * torch.minimum(sign * log_ratio, sign * clipped)
    ratio = torch.exp(seqs.mean(log_ratio))
    return seqs.per_token(-seqs.mean(adv) * ratio)


GMPO = Objective("gmpo", pg, defaults={"eps_low": 0.4, "eps_high": 0.4}, sequence_level=True, paper="arXiv 2507.20673")
