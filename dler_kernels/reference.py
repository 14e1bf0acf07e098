r"""Plain-torch reference implementations: the specification, the CPU fallback and the test oracle.

Everything is computed in float32 (or float64 when the inputs are float64), written
for clarity, and differentiable by autograd. The fused kernels must agree with these
functions; where they differ, these are right.

Packed layout: ``N`` tokens in one dimension, ``logits`` ``[N, V]``, every
per-token tensor ``[N]``; ``seq_ids`` ``[N]`` says which response each token
belongs to (needed only by the sequence-level aggregations).

Policy loss, per valid token (``mask`` true), with :math:`z = \text{logits} / T`:

.. math::
    \log p &= \log\operatorname{softmax}(z)[\text{target}] \\
    \ell &= \ell_{pg} + \beta\,\mathrm{KL}(\log p, \log p_{ref}) - \eta\, H(\operatorname{softmax}(z))

:math:`\ell_{pg}` is the objective's (``dler_kernels.objectives``, one file each), a function of the [N] vectors
log p, log p_old, A, the mask and the sequence ids. The default, ``ppo_clip``:

.. math::
    r &= \exp(\operatorname{clamp}(\log p - \log p_{old}, -20, 20)) \\
    \ell_{pg} &= \max(-A r,\; -A \operatorname{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high})) \\
    \ell_{pg} &\leftarrow \min(\ell_{pg}, -c A) \quad \text{if } A < 0 \text{ and dual clip } c \text{ is set}

KL estimators (``kl_type``): ``k1`` = logp - ref; ``k2``/``mse`` = 0.5 (logp - ref)^2;
``k3``/``low_var_kl`` = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), clamped to [-10, 10]
(the inner clamp keeps exp finite so that the outer clamp's zero gradient never meets an inf);
``k3_ratio`` = k3 * r with r the (clamped) importance ratio of the policy-gradient term, differentiated
through both factors: the importance-sampled k3 of DeepSeek-V3.2, TRL's ``use_bias_correction_kl``.

Probability 0 (a -inf logit: a padded vocabulary, a logits processor's mask, a -inf ``bias`` of the
fused-linear path). The entropy is :math:`H = -\sum_{j: p_j > 0} p_j \log p_j`, i.e. ``p log p = 0`` at
``p = 0``: a -inf logit adds nothing to the entropy, and its gradient (of the loss and of the log-probs) is
exactly 0. A valid row whose target has probability 0 (its target's logit is -inf, or every logit of the
row is: no distribution at all) is a ``ValueError`` naming ``logits`` and the first such row, on every
entry point (``policy_loss``, ``token_logprobs`` and their fused-linear twins; ``policy_loss_ref`` and
``token_logprobs_ref`` here). Why an error and not a -inf log-prob: a token the policy cannot emit was not
sampled from it, so such a row means a wrong mask (of the row or of the vocabulary), and its loss has no
meaning: the importance ratio's clamp silently gives it no gradient, while ``k1``/``k2`` and ``approx_kl``
become infinite. The check reads the log-probs the kernels return anyway (a valid row's log-prob is
exactly -inf then): one comparison over [N] and one device sync, no pass over the logits (left out, with every
check that reads values, while torch.compile traces: ``validate.values_readable``). Underneath it, the kernels
(and ``token_logprobs_terms_ref``) return log-prob -inf for such a row, entropy 0 for a row of only -inf
logits, and gradient 0 for every -inf logit (the reference's autograd gives a row of only -inf NaN: refused,
it is never read). A NaN or +inf logit is another matter: no distribution either, but a NaN log-prob and a
non-finite loss, counted by the ``num_nonfinite`` metric, not refused.

``targets``: token ids of any integer dtype; the public ops use them as int64, so they refuse uint64 (which
int64 does not hold) and accept every other one, on every backend.
"""

from __future__ import annotations

import torch

from . import objectives
from .objectives import LOG_RATIO_CLAMP
from .validate import check_mask, check_no_grad, check_target_probability

KL_CLAMP = 10.0
# Where the entropy's p log p floors log p (p log p = 0 at p = 0): exp of it is 0 in float32 and float64,
# and any factor below 1e18 times it stays finite (the C++ kernels' kLogProbFloor).
LOGP_FLOOR = -1e20
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "mse", "k3", "low_var_kl", "k3_ratio")
# kl_type as the fused kernels take it (0: no KL term); equal names share a code.
KL_CODES = {None: 0, "k1": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3, "k3_ratio": 4}
ADVANTAGE_METHODS = ("grpo", "dr_grpo", "dler")
WEIGHTINGS = ("token", "sample")


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every implementation accumulates ``t``'s arithmetic in: float64 for float64 inputs,
    float32 for every other dtype (half inputs included)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logprobs_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
):
    """Log-prob of each target under ``softmax(logits / temperature)`` (and the entropy of that distribution).

    Rows whose target is negative (padding, e.g. -100) get log-prob 0 and entropy 0. A valid row whose
    target has probability 0 is a ValueError (module docstring)."""
    logp, entropy = token_logprobs_terms_ref(logits, targets, temperature=temperature, return_entropy=True)
    check_target_probability(logp, targets >= 0, targets)
    return (logp, entropy) if return_entropy else logp


def token_logprobs_terms_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
):
    """``token_logprobs_ref`` without the check: ``(logp, entropy or None)``, where a valid row whose target
    has probability 0 gets log-prob -inf (and entropy 0 when every logit of its row is -inf)."""
    z = logits.to(accumulation_dtype(logits)) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets >= 0
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets.long().unsqueeze(-1)).squeeze(-1)
    # A row of only -inf has no distribution (log_softmax makes it NaN): its target's probability is 0, its
    # entropy 0. (amax is NaN on a row holding a NaN, which stays NaN; the gradient of such a row is NaN
    # here, where the kernels give 0: the public ops refuse the row before anyone reads it.)
    no_mass = z.amax(-1) == -float("inf") if z.shape[-1] else torch.zeros_like(valid)
    logp = torch.where(no_mass, -float("inf"), logp)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp, None
    # p log p = 0 at p = 0: log p floored at LOGP_FLOOR, so that neither the value nor the gradient of a -inf
    # logit meets 0 * -inf (every log p above the floor is kept: below it p is 0 already)
    entropy = -(logp_all.exp() * logp_all.clamp_min(LOGP_FLOOR)).sum(-1)
    entropy = torch.where(valid & ~no_mass, entropy, torch.zeros_like(entropy))
    return logp, entropy


def kl_penalty_ref(
    logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str, ratio: torch.Tensor | None = None
) -> torch.Tensor:
    """The KL estimator ``kl_type`` per token; ``k3_ratio`` also needs the importance ``ratio``."""
    if kl_type == "k3_ratio":
        if ratio is None:
            raise ValueError("kl_type='k3_ratio' needs the importance ratio")
        return kl_penalty_ref(logp, ref_logp, "k3") * ratio
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type in ("k2", "mse"):
        return 0.5 * (logp - ref_logp) ** 2
    if kl_type in ("k3", "low_var_kl"):
        d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


def _denominator(count: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    """The count itself (at least 1, so that an empty batch gives loss 0), or the caller's global one."""
    if normalizer is None:
        return torch.clamp(count, min=1.0)
    return torch.full_like(count, float(normalizer))


def aggregate_ref(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str,
    *,
    seq_ids: torch.Tensor | None = None,
    normalizer: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (already zero where ``mask`` is false) to a scalar.

    ``token-mean``: sum / (``normalizer`` or the number of valid tokens).
    ``seq-mean-*``: per sequence (by ``seq_ids``, counting only sequences with a valid token) the
    token mean, the token sum, or the token sum / ``norm_length``; then the mean over sequences,
    whose count ``normalizer`` overrides (the global count under accumulation / data parallelism).
    No valid token at all gives 0.
    """
    dtype = per_token.dtype
    maskf = mask.to(dtype)
    if loss_agg == "token-mean":
        return per_token.sum() / _denominator(maskf.sum(), normalizer)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if seq_ids is None:
        raise ValueError(f"loss_agg={loss_agg!r} needs seq_ids (one sequence id per token)")
    seq = objectives.dense_ids(seq_ids)
    seq_sum = per_token.new_zeros(seq.numel()).index_add(0, seq, per_token)  # slots without a sequence stay empty
    seq_count = per_token.new_zeros(seq.numel()).index_add(0, seq, maskf)
    has_tokens = seq_count > 0
    if loss_agg == "seq-mean-token-mean":
        seq_loss = seq_sum / torch.clamp(seq_count, min=1.0)
    elif loss_agg == "seq-mean-token-sum":
        seq_loss = seq_sum
    else:
        if norm_length is None:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' needs norm_length (the constant max response length)")
        seq_loss = seq_sum / norm_length
    n_valid_seq = has_tokens.to(dtype).sum()
    return torch.where(has_tokens, seq_loss, torch.zeros_like(seq_loss)).sum() / _denominator(n_valid_seq, normalizer)


def aggregation_weights(valid, loss_agg, seq_ids, normalizer, norm_length, dtype=torch.float32, token_weights=None):
    """d(loss)/d(per-token loss) for each token: ``aggregate_ref`` as a weighted sum over [N] (what the
    fused kernels use, so that they need not know N or the sequences); ``dtype``: float64 for float64
    inputs, whose kernels accumulate in float64. ``token_weights`` [N] multiply each token's weight."""
    if token_weights is not None:
        plain = aggregation_weights(valid, loss_agg, seq_ids, normalizer, norm_length, dtype)
        return plain * torch.where(valid, token_weights.to(dtype), 0.0)  # a masked row's weight is never read
    vf = valid.to(dtype)
    if loss_agg == "token-mean":
        denom = torch.clamp(vf.sum(), min=1.0) if normalizer is None else float(normalizer)
        return vf / denom
    seq = objectives.dense_ids(seq_ids)
    counts = vf.new_zeros(seq.numel()).index_add(0, seq, vf)  # slots without a sequence count 0
    n_seq = torch.clamp((counts > 0).to(dtype).sum(), min=1.0) if normalizer is None else float(normalizer)
    if loss_agg == "seq-mean-token-mean":
        per_token = 1.0 / torch.clamp(counts[seq], min=1.0)
    elif loss_agg == "seq-mean-token-sum":
        per_token = torch.ones_like(vf)
    else:
        per_token = torch.full_like(vf, 1.0 / norm_length)
    return vf * per_token / n_seq


def per_token_loss_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
    **options,
):
    """The per-token loss of the module docstring before aggregation: ``(per_token, logp, entropy, kl)``,
    0 on rows where ``valid`` (bool) is false; ``kl`` is None when ``beta == 0``. Differentiable
    w.r.t. ``logits``. ``options``: those of ``per_token_loss_from_logprobs``."""
    # Masked rows are replaced by zeros so that their content (even inf/nan) cannot leak into
    # the loss or the gradient.
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp, entropy = token_logprobs_terms_ref(logits, targets, temperature=temperature, return_entropy=True)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    per_token, kl = per_token_loss_from_logprobs(logp, entropy, old_logprobs, advantages, valid, **options)
    return per_token, logp, entropy, kl


def per_token_loss_from_logprobs(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    objective: str = "ppo_clip",
    opsm_threshold: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    **params,
):
    """``(per_token, kl)`` from each token's log-prob and entropy ([N] vectors): the loss depends on
    the logits only through these two, which is what lets the fused kernels differentiate it row
    by row (d loss / d logits = d loss / d logp * d logp / d logits + d loss / d H * d H / d logits).
    ``objective`` and its ``params`` (eps_low, eps_high, clip_c, ...; None or absent: the objective's default):
    ``dler_kernels.objectives``; a sequence-level objective needs ``seq_ids``.

    OPSM, the off-policy sequence mask (``opsm_threshold`` = delta; TRL ``off_policy_mask_threshold``, slime
    ``--use-opsm``), composes with every objective: a sequence with a negative advantage whose mean
    log(pi_old / pi), with pi detached, exceeds delta loses its policy-gradient term (not its KL or entropy terms,
    as in TRL, which also decides per token: where advantages differ within a sequence, only its tokens with A < 0
    lose it). pi_old is ``old_logprobs``: with the sampler's log-probs as the old ones (the bypass) it is TRL's
    choice of the behaviour policy."""
    dtype = logp.dtype
    # Masked rows may hold anything (inf, nan): zeros keep them out of every value and gradient, sequence sums included.
    old = torch.where(valid, old_logprobs.to(dtype), 0.0)
    adv = torch.where(valid, advantages.to(dtype), 0.0)
    spec = objectives.get_objective(objective)
    seqs = None
    if spec.sequence_level:
        if seq_ids is None:
            raise ValueError(
                f"objective={objective!r} needs seq_ids (one sequence id per token): its loss is per sequence"
            )
        seqs = objectives.Sequences(seq_ids, valid, dtype)
    per_token = spec.pg(logp, old, adv, valid, seqs, objectives.resolve(objective, params))
    if opsm_threshold is not None:
        if seq_ids is None:
            raise ValueError("opsm_threshold needs seq_ids (one sequence id per token): its mask is per sequence")
        seqs = seqs if seqs is not None else objectives.Sequences(seq_ids, valid, dtype)
        drift = seqs.per_token(seqs.mean(old - logp.detach()))
        per_token = torch.where((adv >= 0) | (drift <= opsm_threshold), per_token, torch.zeros_like(per_token))
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        kl = kl_penalty_ref(logp, torch.where(valid, ref_logprobs.to(dtype), 0.0), kl_type, ratio)
        per_token = per_token + beta * kl
    if entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return per_token, kl


def policy_loss_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    objective: str = "ppo_clip",
    opsm_threshold: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    normalizer: float | None = None,
    norm_length: float | None = None,
    token_weights: torch.Tensor | None = None,
    **params,
):
    """The policy loss of module docstring. Returns ``(loss, per_token_loss, logprobs, entropy, metrics)``.
    ``objective`` and its ``params`` (eps_low, eps_high, clip_c, ...; absent or None: the objective's default):
    ``dler_kernels.objectives``.

    ``loss`` is differentiable w.r.t. ``logits``; the other outputs are detached. Masked rows
    contribute nothing, whatever their logits and targets hold; their log-prob and entropy are 0.
    ``token_weights`` [N] (no gradient) multiply each token's loss before the aggregation (e.g.
    truncated importance-sampling weights); ``per_token_loss`` is returned without them.

    Only ``logits`` are differentiated: the other tensors are data (the clipped surrogate's constants),
    and one that requires grad while grad mode is on is a ValueError, as on every fused backend.
    ``mask`` is bool or holds only 0 and 1.
    """
    for name, t in dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask, token_weights=token_weights,
                        ref_logprobs=ref_logprobs if beta != 0.0 else None).items():  # fmt: skip
        check_no_grad(name, t)
    valid = check_mask(mask)
    params = objectives.resolve(objective, params)
    loss, per_token, logp, entropy, kl = policy_loss_terms_ref(
        logits, targets, old_logprobs, advantages, valid, ref_logprobs=ref_logprobs, seq_ids=seq_ids,
        objective=objective, opsm_threshold=opsm_threshold, beta=beta, kl_type=kl_type, entropy_coef=entropy_coef,
        temperature=temperature,
        loss_agg=loss_agg, normalizer=normalizer, norm_length=norm_length, token_weights=token_weights, **params,
    )  # fmt: skip
    check_target_probability(logp, valid, targets)
    dtype = per_token.dtype
    old = old_logprobs.to(dtype)
    adv = advantages.to(dtype)
    with torch.no_grad():
        metrics = policy_metrics_ref(logp, old, adv, entropy, valid, params.get("eps_low"), params.get("eps_high"),
                                     params.get("clip_c"), kl, per_token)  # fmt: skip
    return loss, per_token.detach(), logp.detach(), entropy.detach(), metrics


def policy_loss_terms_ref(
    logits, targets, old_logprobs, advantages, valid, *, seq_ids, loss_agg, normalizer, norm_length, token_weights,
    **options,
):  # fmt: skip
    """``policy_loss_ref`` on checked inputs (``valid`` bool), without the metrics: ``(loss, per_token, logp,
    entropy, kl)``, all differentiable w.r.t. ``logits``; ``kl`` is None when ``beta == 0``. ``options``:
    those of ``per_token_loss_ref``."""
    per_token, logp, entropy, kl = per_token_loss_ref(
        logits, targets, old_logprobs, advantages, valid, seq_ids=seq_ids, **options
    )
    dtype = per_token.dtype
    weighted = per_token if token_weights is None else per_token * torch.where(valid, token_weights.to(dtype), 0.0)
    loss = aggregate_ref(weighted, valid, loss_agg, seq_ids=seq_ids, normalizer=normalizer, norm_length=norm_length)
    return loss, per_token, logp, entropy, kl


def policy_metrics_ref(logp, old, adv, entropy, valid, eps_low, eps_high, clip_c, kl, per_token):
    """Token means over valid tokens of: clip fractions, approx KL to old (mean of old - logp, as
    verl's ppo_kl), entropy; ratio min / max; counts of valid and of non-finite tokens. ``old`` and
    ``adv`` may have any float dtype: they are compared in the dtype of ``logp``."""
    dtype = logp.dtype
    old, adv = old.to(dtype), adv.to(dtype)
    n = valid.sum()
    nf = torch.clamp(n.to(dtype), min=1.0)
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    # An objective without clip bounds (SAPO) clips nothing: its fractions are 0.
    low = valid & (adv < 0) & (ratio < 1.0 - eps_low) if eps_low is not None else torch.zeros_like(valid)
    high = valid & (adv > 0) & (ratio > 1.0 + eps_high) if eps_high is not None else torch.zeros_like(valid)
    if clip_c is not None and eps_low is not None and eps_high is not None:
        pg_clip = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
        dual = valid & (adv < 0) & (pg_clip > -clip_c * adv)
    else:
        dual = torch.zeros_like(valid)
    inf = logp.new_tensor(float("inf"))
    metrics = {
        "clip_frac_low": low.to(dtype).sum() / nf,
        "clip_frac_high": high.to(dtype).sum() / nf,
        "clip_frac_dual": dual.to(dtype).sum() / nf,
        "approx_kl": torch.where(valid, old - logp, 0.0).sum() / nf,
        "entropy": torch.where(valid, entropy, 0.0).sum() / nf,
        "ratio_min": torch.where(valid, ratio, inf).min() if ratio.numel() else inf,
        "ratio_max": torch.where(valid, ratio, -inf).max() if ratio.numel() else -inf,
        "num_tokens": n.to(dtype),
        "num_nonfinite": (valid & ~torch.isfinite(per_token)).to(dtype).sum(),
    }
    if kl is not None:
        metrics["kl_ref"] = torch.where(valid, kl, 0.0).sum() / nf
    return metrics


def compute_advantages_ref(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    method: str = "dler",
    correctness: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    weighting: str = "token",
    eps: float = 1e-6,
    dynamic_sampling: bool = True,
):
    """Per-response advantages. Returns ``(values, keep, stats)``.

    ``keep``: with ``dynamic_sampling`` the responses of groups whose ``correctness`` (default:
    ``rewards``) has zero spread are dropped (False); values of dropped responses are 0 and
    every statistic is computed over kept groups only.

    * ``grpo``: (R - mean_g R) / (std_g R + eps), std unbiased (0 for a group of one).
    * ``dr_grpo``: R - mean_g R.
    * ``dler``: A = R - mean_g R, then (A - mean_b A) / (std_b A + eps) over the kept batch,
      weighted by ``token_counts`` (``weighting='token'``: every response token counts once) or
      per response (``'sample'``); the variance carries Bessel's correction (weights summing to W
      are treated as W observations), as the released code's whitening does.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"method must be one of {ADVANTAGE_METHODS}, got {method!r}")
    for name, t in (("rewards", rewards), ("correctness", correctness), ("token_counts", token_counts)):
        check_no_grad(name, t)  # data, as on every backend: the advantages are the policy loss's constants
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    dtype = accumulation_dtype(rewards)
    r = rewards.to(dtype)
    c = (correctness if correctness is not None else rewards).to(dtype)
    _, g = torch.unique(group_ids, return_inverse=True)
    n_groups = int(g.max().item()) + 1 if g.numel() else 0

    def group_sum(x):
        return x.new_zeros(n_groups).index_add(0, g, x)

    size = group_sum(torch.ones_like(r))
    c_max = c.new_full((n_groups,), -float("inf")).scatter_reduce(0, g, c, "amax")
    c_min = c.new_full((n_groups,), float("inf")).scatter_reduce(0, g, c, "amin")
    group_keep = (c_max > c_min) if dynamic_sampling else torch.ones_like(c_max, dtype=torch.bool)
    keep = group_keep[g]

    mean_g = group_sum(r) / size
    centered = r - mean_g[g]
    if method == "grpo":
        var_g = group_sum(centered**2) / torch.clamp(size - 1.0, min=1.0)
        values = centered / (var_g.sqrt()[g] + eps)
    elif method == "dr_grpo":
        values = centered
    else:
        if weighting == "token":
            if token_counts is None:
                raise ValueError("weighting='token' needs token_counts (response lengths)")
            w = token_counts.to(dtype)
        else:
            w = torch.ones_like(r)
        w = torch.where(keep, w, torch.zeros_like(w))
        total = w.sum()
        mean_b = (w * centered).sum() / torch.clamp(total, min=1.0)
        var_b = (w * (centered - mean_b) ** 2).sum() / torch.clamp(total - 1.0, min=1.0)
        values = (centered - mean_b) / (var_b.sqrt() + eps)
    values = torch.where(keep, values, torch.zeros_like(values))

    stats = advantage_stats(r, values, keep, group_keep)
    if method == "dler":
        stats["batch_mean"] = mean_b
        stats["batch_std"] = var_b.sqrt()
    return values, keep, stats


def advantage_stats(rewards, values, keep, group_keep):
    """Summary of an advantage computation: groups, kept groups and responses, mean reward and
    mean advantage over the kept responses."""
    keptf = keep.to(values.dtype)
    n_kept = keptf.sum()
    return {
        "num_groups": values.new_tensor(float(group_keep.numel())),
        "num_kept_groups": group_keep.to(values.dtype).sum(),
        "num_kept": n_kept,
        "reward_mean": (rewards.to(values.dtype) * keptf).sum() / torch.clamp(n_kept, min=1.0),
        "advantage_mean": (values * keptf).sum() / torch.clamp(n_kept, min=1.0),
    }


def linear_logits_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fp32_head: bool = False
) -> torch.Tensor:
    """The logits the fused-linear path never materialises: ``hidden @ weight.T (+ bias)``, [N, V],
    in the inputs' dtype (as an ``nn.Linear`` LM head produces them); with ``fp32_head`` (an fp32 LM head)
    in float32 at least: hidden, weight and bias upcast before the matmul."""
    if fp32_head:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return torch.nn.functional.linear(hidden, weight, bias)


def linear_policy_loss_ref(
    hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None, fp32_head=False, **options
):  # fmt: skip
    """``policy_loss_ref`` on ``linear_logits_ref(hidden, weight, bias, fp32_head=...)``: the specification
    of ``dler_kernels.linear_policy_loss``. Differentiable w.r.t. hidden, weight and bias."""
    logits = linear_logits_ref(hidden, weight, bias, fp32_head=fp32_head)
    return policy_loss_ref(logits, targets, old_logprobs, advantages, mask, **options)


def linear_token_logprobs_ref(
    hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False, fp32_head=False
):  # fmt: skip
    """``token_logprobs_ref`` on ``linear_logits_ref(hidden, weight, bias, fp32_head=...)``."""
    logits = linear_logits_ref(hidden, weight, bias, fp32_head=fp32_head)
    return token_logprobs_ref(logits, targets, temperature=temperature, return_entropy=return_entropy)
