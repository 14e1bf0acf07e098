r"""LUSPO, Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261): GSPO's clipped sequence ratio with each
sequence's loss scaled by its length, so that the sequence mean does not favour short responses.

.. math::
    \ell_{i,t} = |y_i| \max(-A s_i,\; -A \operatorname{clip}(s_i, 1-\epsilon_{low}, 1+\epsilon_{high})), \quad
    s_i = \exp\Big(\frac{1}{|y_i|}\sum_t \log r_{i,t}\Big)

With ``loss_agg="seq-mean-token-mean"`` this is the mean over sequences of |y_i| times GSPO's sequence loss,
TRL's ``loss_type="luspo"`` at ``importance_sampling_level="sequence"`` without a KL term. TRL sums the whole
per-token loss over each sequence, KL included, which is ``gspo`` with ``loss_agg="seq-mean-token-sum"``: the TRL
drop-in maps it so. (Liger's Triton kernel averages over B x L entries instead, which weighs each sequence by a
further |y_i| / L: a difference of Liger's.) The bounds default to GSPO's, 3e-4 / 4e-4.
"""

from __future__ import annotations

from .base import Objective
from .gspo import pg_sequence


def pg(logp, old, adv, valid, seqs, p):
    return seqs.per_token(seqs.count) * pg_sequence(logp, old, adv, valid, seqs, p)


LUSPO = Objective("luspo", pg, defaults={"eps_low": 3e-4, "eps_high": 4e-4}, sequence_level=True,
                  paper="arXiv 2602.05261")  # fmt: skip
