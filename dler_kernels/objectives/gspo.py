r"""GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071; Qwen3's recipe), in its two
published forms.

The sequence ratio is the geometric mean of the token ratios, :math:`s_i = \exp(\frac{1}{|y_i|}\sum_t \log r_{i,t})`,
and the PPO clip acts on it with the paper's narrow bounds: ``eps_low`` 3e-4, ``eps_high`` 4e-4.

* ``gspo`` (the sequence form; TRL ``importance_sampling_level="sequence"``): every token of response i carries
  :math:`\max(-A s_i, -A \operatorname{clip}(s_i, 1-\epsilon_{low}, 1+\epsilon_{high}))`, its gradient flowing
  through :math:`s_i` to every token of the sequence.
* ``gspo_token`` (GSPO-token; verl ``compute_policy_loss_gspo``): :math:`\log s_{i,t} = \log\pi_{i,t} -
  \operatorname{sg}(\log\pi_{i,t}) + \operatorname{sg}(\log s_i)`, clamped above at 10 as verl does, then the
  same clip per token: the value of :math:`s_i`, and a gradient per token, so token-level advantages can differ.
  With equal advantages across a sequence and ``seq-mean-token-mean`` both forms have the same gradient (the
  paper's remark), which the tests check.

The paper aggregates per sequence (``loss_agg="seq-mean-token-mean"``); any ``loss_agg`` applies, as in verl.
No log-ratio clamp in the sequence mean (verl and TRL take the plain mean).
"""

from __future__ import annotations

import torch

from .base import Objective

GSPO_TOKEN_LOG_RATIO_MAX = 10.0  # verl's clamp of log s_{i,t} "for numerical stability"


def _clipped(ratio, adv, p):
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - p["eps_low"], 1.0 + p["eps_high"]))


def pg_sequence(logp, old, adv, valid, seqs, p):
    ratio = seqs.per_token(torch.exp(seqs.mean(logp - old)))
    return _clipped(ratio, adv, p)


def pg_token(logp, old, adv, valid, seqs, p):
    log_seq = seqs.per_token(seqs.mean(logp - old)).detach()
    log_ratio = torch.clamp(logp - logp.detach() + log_seq, max=GSPO_TOKEN_LOG_RATIO_MAX)
    return _clipped(torch.exp(log_ratio), adv, p)


_BOUNDS = {"eps_low": 3e-4, "eps_high": 4e-4}
GSPO = Objective("gspo", pg_sequence, defaults=_BOUNDS, sequence_level=True, paper="arXiv 2507.18071")
GSPO_TOKEN = Objective("gspo_token", pg_token, defaults=_BOUNDS, sequence_level=True, paper="arXiv 2507.18071")
