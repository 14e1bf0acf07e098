r"""SAPO, Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347; Qwen3-VL): a smooth gate in place
of the hard clip, with a sharper one for negative advantages.

.. math::
    \ell = -A\, \frac{4}{\tau}\, \sigma(\tau (r - 1)), \quad \tau = \tau_{pos} \text{ if } A > 0 \text{ else }
    \tau_{neg}, \quad r = \exp(\operatorname{clamp}(\log\pi - \log\pi_{old}, -20, 20))

Defaults: verl's ``tau_pos`` 1.0, ``tau_neg`` 1.05. At r = 1 the gradient w.r.t. log pi is -A, PPO's. verl
aggregates SAPO with ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says; here ``loss_agg`` applies (the verl
drop-in passes ``seq-mean-token-mean``).
"""

from __future__ import annotations

import torch

from .base import LOG_RATIO_CLAMP, Objective


def pg(logp, old, adv, valid, seqs, p):
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    tau = torch.full_like(logp, p["tau_neg"]).masked_fill(adv > 0, p["tau_pos"])
    return -adv * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))


SAPO = Objective("sapo", pg, defaults={"tau_pos": 1.0, "tau_neg": 1.05}, kernel_code=2, paper="arXiv 2511.20347")
