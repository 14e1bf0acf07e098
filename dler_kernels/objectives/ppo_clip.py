r"""PPO-clip with clip-higher and the dual clip: the default objective (DLER, DAPO, verl's ``vanilla``).

.. math::
    r = \exp(\operatorname{clamp}(\log\pi - \log\pi_{old}, -20, 20)), \quad
    \ell = \max(-A r,\; -A \operatorname{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high})),
    \quad \ell \leftarrow \min(\ell, -c A) \text{ if } A < 0

Schulman et al. 2017 (arXiv 1707.06347); the decoupled ``eps_low``/``eps_high`` (clip-higher) of DAPO
(arXiv 2503.14476, 0.2 / 0.28, DLER's setting); the dual clip ``clip_c`` of Ye et al. 2020 (arXiv 1912.09729)
as verl applies it (to negative advantages only; None turns it off; DLER: 10). The backends fuse it into one
pass over the logits.
"""

from __future__ import annotations

import torch

from .base import LOG_RATIO_CLAMP, Objective


def pg(logp, old, adv, valid, seqs, p):
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - p["eps_low"], 1.0 + p["eps_high"]))
    if p["clip_c"] is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -p["clip_c"] * adv), loss)
    return loss


PPO_CLIP = Objective(
    "ppo_clip", pg, defaults={"eps_low": 0.2, "eps_high": 0.28, "clip_c": 10.0}, kernel_code=0, paper="arXiv 1707.06347"
)
