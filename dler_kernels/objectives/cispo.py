r"""CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped,
stop-gradient importance weight, so every token keeps a gradient (PPO's clip zeroes the clipped tokens').

.. math::
    \ell = -\operatorname{sg}(\operatorname{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high}))\, A \log\pi,
    \quad r = \exp(\operatorname{clamp}(\log\pi - \log\pi_{old}, -20, 20))

The bounds differ by library, each reachable with ``cispo_clip``:

* ``"both"`` (the default; verl ``compute_policy_loss_cispo``): the two-sided clip above.
* ``"upper"`` (TRL ``loss_type="cispo"``): only the upper side, ``min(r, 1 + eps_high)``; ``eps_low`` is not read.

SkyRL's ratio anchored to the rollout policy is the same formula with the sampler's log-probs as
``old_logprobs`` (the bypass, ``algorithm.old_logprobs=sampler`` in the trainer).
"""

from __future__ import annotations

import torch

from .base import LOG_RATIO_CLAMP, Objective

CISPO_CLIPS = ("both", "upper")


def pg(logp, old, adv, valid, seqs, p):
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low = 1.0 - p["eps_low"] if p["cispo_clip"] == "both" else None
    weight = torch.clamp(ratio, low, 1.0 + p["eps_high"]).detach()
    return -weight * adv * logp


CISPO = Objective(
    "cispo",
    pg,
    defaults={"eps_low": 0.2, "eps_high": 0.28, "cispo_clip": "both"},
    kernel_code=1,
    paper="arXiv 2506.13585",
)
