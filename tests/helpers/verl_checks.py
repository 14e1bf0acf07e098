"""Runs in the verl venv (`make verl-env`): compares dler_kernels.integrations.verl, and dler train's rollout
correction, with verl's own functions and prints one JSON object of measured differences;
tests/integrations/test_verl.py asserts on it.

    .venv-verl/bin/python tests/helpers/verl_checks.py                      # the integration's checks
    .venv-verl/bin/python tests/helpers/verl_checks.py rollout_correction   # one section of SECTIONS only
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from functools import partial

import torch

warnings.simplefilter("ignore")
import verl  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

from dler_kernels import reference as ref  # noqa: E402
from dler_kernels.integrations import verl as dler_verl  # noqa: E402

B, T, H, V = 5, 7, 16, 97


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def actor_config(global_batch_info=None, clip_ratio_c=3.0, clip_ratios=(0.2, 0.28), **extra):
    low, high = clip_ratios
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                          clip_ratio_c=clip_ratio_c, ppo_micro_batch_size_per_gpu=1, **extra)  # fmt: skip
    if global_batch_info is not None:
        cfg.global_batch_info.update(global_batch_info)  # as verl's ppo_loss fills it
    return cfg


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, :] = 0  # an empty response
    mask[4, 2:] = 0
    advantages = torch.randn(B, 1, generator=g).expand(B, T).clone()
    advantages[0] = -1.3  # negative advantages with large ratios below: the dual clip acts
    return g, mask, advantages


def is_weights(g):
    weights = torch.rand(B, T, generator=g) * 2.0
    weights[2, 1] = 0.0  # a rejected token: verl's GMPO takes log(0 + 1e-10) into its row's geometric mean
    return weights


GLOBAL_INFOS = {
    "local": None,
    "dp2": dict(dp_size=2, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=11),
}
# Each registered loss's verl config: clip_ratio_low / clip_ratio_high that make its clip or mask act on the batches
# below (log-probs about -3 +- 1 or log(1/V), log-ratios of 0.5 sigma, three of +2.5 at a negative advantage); SAPO's
# tau_pos / tau_neg other than the defaults, so that the config is seen to reach the objective.
LOSS_CONFIGS = {
    "dler_gspo": dict(clip_ratios=(0.05, 0.1)),
    "dler_gspo_sequence": dict(clip_ratios=(0.05, 0.1)),
    "dler_luspo": dict(clip_ratios=(0.05, 0.1)),
    "dler_geo_mean": dict(clip_ratios=(0.4, 0.4)),
    "dler_dppo_tv": dict(clip_ratios=(0.01, 0.02)),
    "dler_dppo_kl": dict(clip_ratios=(0.002, 0.004)),
    "dler_sapo": dict(tau_pos=1.2, tau_neg=2.0),
}
LOSSES = [name for name in dler_verl.VERL_LOSSES if name != "dler_vanilla"]  # dler_vanilla is dler, by identity
# The losses verl lacks, against the reference's per-token loss: (objective, its parameters as the config sets them)
REFERENCE_OBJECTIVES = {
    "dler_gspo_sequence": ("gspo", dict(eps_low=0.05, eps_high=0.1)),
    "dler_luspo": ("luspo", dict(eps_low=0.05, eps_high=0.1)),
    "dler_vespo": ("vespo", {}),
}


def verl_policy_loss(name, logits=None, targets=None, temperature=1.0, **kwargs):
    """verl's loss of the same math as ``name``; for a loss verl lacks, the loss verl would compute had it the
    objective: the reference's per-token loss (dler_kernels.reference, the kernels' specification; from ``logits``
    when given, else from ``log_prob``) times the IS weights, aggregated by verl's agg_loss with global_batch_info."""
    spec = dler_verl.VERL_LOSSES[name]
    if spec.verl_name is not None:
        return core_algos.get_policy_loss_fn(spec.verl_name)(**kwargs)
    objective, params = REFERENCE_OBJECTIVES[name]
    mask = kwargs["response_mask"]
    valid = mask.reshape(-1) > 0
    seq_ids = torch.arange(B).repeat_interleave(T)
    common = dict(seq_ids=seq_ids, objective=objective, **params)
    old, adv = kwargs["old_log_prob"].reshape(-1), kwargs["advantages"].reshape(-1)
    if logits is None:
        logp = kwargs["log_prob"].reshape(-1)
        per_token, _ = ref.per_token_loss_from_logprobs(logp, torch.zeros_like(logp), old, adv, valid, **common)
    else:
        per_token = ref.per_token_loss_ref(logits.reshape(B * T, -1), targets.reshape(-1), old, adv, valid,
                                           temperature=temperature, **common)[0]  # fmt: skip
    loss_mat = per_token.view(B, T)
    if kwargs["rollout_is_weights"] is not None:
        loss_mat = loss_mat * kwargs["rollout_is_weights"]
    cfg = kwargs["config"]
    return core_algos.agg_loss(loss_mat, mask, kwargs["loss_agg_mode"], **cfg.global_batch_info), {}


def registered_loss_cases():
    """Each registered loss against verl's loss of the same math (or the reference, ``verl_policy_loss``): every
    loss_agg_mode (those verl's SAPO and GMPO ignore included), local and dp2 global_batch_info, with and without
    rollout IS weights: loss, d(loss)/d(log_prob) and verl's metrics."""
    out = []
    for name in LOSSES:
        for mode in dler_verl.LOSS_AGG_MODES:
            for info_name, info in GLOBAL_INFOS.items():
                for with_is in (False, True):
                    g, mask, adv = batch(len(out))
                    old = -3.0 + torch.randn(B, T, generator=g)
                    shift = 0.5 * torch.randn(B, T, generator=g)
                    shift[0, :3] = 2.5  # ratio e^2.5 > clip_ratio_c = 3 with A < 0
                    weights = is_weights(g) if with_is else None
                    cfg = actor_config(info, **LOSS_CONFIGS.get(name, {}))
                    results = []
                    for fn in (partial(verl_policy_loss, name), core_algos.get_policy_loss_fn(name)):
                        logp = (old + shift).requires_grad_(True)
                        loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                           loss_agg_mode=mode, config=cfg, rollout_is_weights=weights)  # fmt: skip
                        loss.backward()
                        results.append((loss, logp.grad, metrics))
                    (l0, g0, m0), (l1, g1, m1) = results
                    out.append(dict(
                        name=name, case=f"{name}/{mode}/{info_name}/{'is' if with_is else 'no_is'}",
                        loss_verl=l0.item(), loss_dler=l1.item(),
                        loss_rel=abs(l1.item() - l0.item()) / max(abs(l0.item()), 1e-30), grad_rel=rel(g1, g0),
                        grad_norm=g0.norm().item(), metrics_verl=m0, metrics_dler=m1,
                    ))  # fmt: skip
    return out


def loss_scale(name, cfg, mode, mask, per_token, weights) -> float:
    """The loss's aggregation of |per-token loss| (times the IS weights as the loss applies them): the scale of its
    float32 rounding, the loss being a sum of signed terms (a near-cancelling batch makes |loss| itself tiny)."""
    opts = dler_verl.loss_options(cfg, mode, mask, name)
    token_weights = dler_verl._is_weights(dler_verl.VERL_LOSSES[name], weights, mask)
    agg = ref.aggregation_weights(
        mask.reshape(-1) > 0, opts["loss_agg"], torch.arange(B).repeat_interleave(T), opts["normalizer"],
        opts.get("norm_length"), torch.float64, None if token_weights is None else token_weights.reshape(-1),
    )  # fmt: skip
    return (per_token.double().abs() * agg).sum().item()


def fused_loss_cases():
    """linear_policy_loss_verl (hidden states, no logits) of each registered loss against verl's loss of the same
    math (or the reference, ``verl_policy_loss``) on log_softmax(hidden @ W.T / T), with rollout IS weights."""
    out = []
    for name in LOSSES:
        for mode in dler_verl.LOSS_AGG_MODES:
            for info_name, info in GLOBAL_INFOS.items():
                g, mask, adv = batch(100 + len(out))
                hidden = torch.randn(B, T, H, generator=g)
                weight = torch.randn(V, H, generator=g) * 0.5
                responses = torch.randint(0, V, (B, T), generator=g)
                temperature = 0.8
                with torch.no_grad():
                    logp_all = torch.log_softmax(hidden @ weight.t() / temperature, -1)
                    current = logp_all.gather(-1, responses[..., None])[..., 0]
                old = current + 0.5 * torch.randn(B, T, generator=g)
                old[0, :3] = current[0, :3] - 2.5  # dual clip
                weights = is_weights(g)
                cfg = actor_config(info, **LOSS_CONFIGS.get(name, {}))
                grads = []
                for path in ("verl", "dler"):
                    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
                    if path == "verl":
                        logits = h @ w.t()
                        logp = torch.log_softmax(logits / temperature, -1).gather(-1, responses[..., None])[..., 0]
                        loss, metrics = verl_policy_loss(
                            name, logits, responses, temperature, old_log_prob=old, log_prob=logp, advantages=adv,
                            response_mask=mask, loss_agg_mode=mode, config=cfg, rollout_is_weights=weights,
                        )  # fmt: skip
                    else:
                        fused = dler_verl.linear_policy_loss_verl(
                            h, w, responses, old, adv, mask, config=cfg, loss_agg_mode=mode, loss_mode=name,
                            rollout_is_weights=weights, temperature=temperature, chunk_size=4,
                        )  # fmt: skip
                        loss = fused.loss
                    loss.backward()
                    grads.append((loss, h.grad, w.grad))
                (l0, h0, w0), (l1, h1, w1) = grads
                scale = loss_scale(name, cfg, mode, mask, fused.per_token_loss, weights)
                out.append(dict(
                    name=name, case=f"{name}/{mode}/{info_name}", loss_verl=l0.item(), loss_dler=l1.item(),
                    loss_rel=abs(l1.item() - l0.item()) / max(abs(l0.item()), 1e-30),
                    loss_scaled_err=abs(l1.item() - l0.item()) / max(scale, 1e-30), dhidden_rel=rel(h1, h0),
                    dweight_rel=rel(w1, w0), dhidden_norm=h0.norm().item(),
                    dual_clip_active=metrics.get("actor/pg_clipfrac_lower", 0.0) > 0,
                ))  # fmt: skip
    return out


def legacy_compute_policy_loss_case():
    """verl's deprecated compute_policy_loss (4-tuple, explicit cliprange arguments) + the registered loss."""
    g, mask, adv = batch(7)
    old = -3.0 + torch.randn(B, T, generator=g)
    logp = old + 0.5 * torch.randn(B, T, generator=g)
    logp[0, :3] = old[0, :3] + 2.5
    out = {}
    for mode in dler_verl.LOSS_AGG_MODES:
        legacy = core_algos.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, cliprange_low=0.2,
                                                cliprange_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)  # fmt: skip
        ours, metrics = dler_verl.compute_policy_loss_dler(old, logp, adv, mask, mode, config=actor_config())
        out[mode] = dict(loss_verl=legacy[0].item(), loss_dler=ours.item(), clipfrac_verl=legacy[1].item(),
                         clipfrac_dler=metrics["actor/pg_clipfrac"], clipfrac_lower_verl=legacy[3].item(),
                         clipfrac_lower_dler=metrics["actor/pg_clipfrac_lower"])  # fmt: skip
    return out


def fused_backend_cases():
    """verl's own fused forward (impl_backend='torch', FusedLinearForPPO) against impl_backend='dler', applied by
    verl's apply_monkey_patch on two copies of one tiny Llama: log-probs, entropies and all gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)
    g = torch.Generator().manual_seed(3)
    out = []
    for layout in ("padded", "rmpad"):
        if layout == "padded":
            input_ids = torch.randint(0, V, (2, 12), generator=g)
            kwargs = dict(attention_mask=torch.ones(2, 12, dtype=torch.long),
                          position_ids=torch.arange(12).expand(2, 12))  # fmt: skip
        else:  # verl's remove-padding layout: one packed row, positions restarting per sequence
            input_ids = torch.randint(0, V, (1, 15), generator=g)
            kwargs = dict(position_ids=torch.cat([torch.arange(9), torch.arange(6)])[None])
        a = torch.randn(input_ids.shape, generator=g)
        b = torch.randn(input_ids.shape, generator=g)
        results = {}
        for backend in ("torch", "dler"):
            model = copy.deepcopy(base)
            apply_monkey_patch(model, ulysses_sp_size=1, use_remove_padding=False, use_fused_kernels=True,
                               fused_kernels_backend=backend)  # fmt: skip
            output = model(input_ids=input_ids, temperature=0.7, return_dict=True, use_cache=False, **kwargs)
            ((a * output.log_probs).sum() + (b * output.entropy).sum()).backward()
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            results[backend] = (output.log_probs.detach(), output.entropy.detach(), grads,
                                type(model).forward.__name__)  # fmt: skip
        (lp0, ent0, g0, f0), (lp1, ent1, g1, f1) = results["torch"], results["dler"]
        out.append(dict(
            case=layout, forward_torch=f0, forward_dler=f1, logp_max_abs=(lp1 - lp0).abs().max().item(),
            entropy_max_abs=(ent1 - ent0).abs().max().item(), grad_rel=rel(g1, g0), grad_norm=g0.norm().item(),
        ))  # fmt: skip
    try:
        vlm = copy.deepcopy(base)
        vlm.config.model_type = "qwen2_vl"
        apply_monkey_patch(vlm, use_fused_kernels=True, fused_kernels_backend="dler")
        vlm_error = ""
    except ValueError as e:
        vlm_error = str(e)
    return out, vlm_error


# ------------------------------------------------------------------ dler train's rollout correction

# Each trainer mode and the verl 0.9.1 RolloutCorrectionConfig that does the same, with verl's defaults. seq_mis is
# compared on a band [b, 1/b]: verl's seq_mean_k1 bounds the k1 statistic -mean_t log rho, i.e. 1 / (geometric
# mean), where the trainer bounds the geometric mean; on a band symmetric under 1/x the two keep the same responses.
CORRECTION_MODES = {
    "token_tis": ({}, "decoupled_token_is", {}),
    "seq_tis": ({}, "decoupled_seq_is", {}),
    "token_mis": ({}, None, dict(rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold=2.0)),
    "seq_mis": (dict(low=0.5, high=2.0), "decoupled_geo_rs", dict(rs_threshold="0.5_2.0")),
    "icepop": ({}, "decoupled_token_icepop", {}),
}


def _verl_correction(preset, kwargs, old, sampler, mask):
    """verl's (weights or None, response mask) of one preset on padded [B, T] log-probs."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    cfg = getattr(RolloutCorrectionConfig, preset)(**kwargs) if preset else RolloutCorrectionConfig(**kwargs)
    proto, new_mask, _ = compute_rollout_correction_and_rejection_mask(
        old, sampler, mask, rollout_is=cfg.rollout_is, rollout_is_threshold=cfg.rollout_is_threshold,
        rollout_is_batch_normalize=cfg.rollout_is_batch_normalize, rollout_rs=cfg.rollout_rs,
        rollout_rs_threshold=cfg.rollout_rs_threshold,
    )  # fmt: skip
    return (None if proto is None else proto.batch["rollout_is_weights"]), new_mask


def _dler_correction(mode, settings, old, sampler, mask):
    """dler train's (weights, mask) of one mode, padded back to [B, T] (weight 1 where the mode has none)."""
    from trainer.rollout.correction import RolloutCorrectionConfig, correct_rows

    lengths = mask.sum(-1).long().tolist()
    fixes = correct_rows(RolloutCorrectionConfig(mode, **settings), [o[:n] for o, n in zip(old, lengths)],
                         [s[:n] for s, n in zip(sampler, lengths)])  # fmt: skip
    weights, keep = torch.zeros_like(old), torch.zeros_like(mask, dtype=torch.bool)
    for i, (fix, n) in enumerate(zip(fixes, lengths)):
        weights[i, :n] = fix.weights.double() if fix.weights is not None else 1.0
        keep[i, :n] = fix.mask
    return fixes, weights, keep


def _dler_loss(fixes, logits, targets, old, adv, mask, loss_agg, clip_c):
    """dler train's corrected loss: the rows' corrections through trainer.update.policy.correction_inputs into
    dk.policy_loss, normalised as accumulate_gradients does (every token, or every non-empty response)."""
    import dler_kernels as dk
    from trainer.update.packing import UpdateRow
    from trainer.update.policy import correction_inputs

    lengths = mask.sum(-1).long().tolist()
    rows = [
        UpdateRow([1], targets[i, :n].tolist(), float(adv[i, 0]), old_logprobs=old[i, :n].float(),
                  token_weights=f.weights, loss_mask=f.mask)
        for i, (f, n) in enumerate(zip(fixes, lengths))
    ]  # fmt: skip
    keep, weights = correction_inputs(rows, torch.device("cpu"))
    valid = mask.bool()
    normalizer = sum(lengths) if loss_agg == "token-mean" else sum(n > 0 for n in lengths)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    out = dk.policy_loss(logits[valid], targets[valid], old[valid].float(), adv[valid].float(), keep,
                         token_weights=weights, seq_ids=seq_ids, loss_agg=loss_agg, normalizer=float(normalizer),
                         norm_length=float(mask.shape[-1]), eps_low=0.2, eps_high=0.28, clip_c=clip_c)  # fmt: skip
    return out.loss.item()


def _verl_loss(weights, new_mask, logits, targets, old, adv, loss_agg):
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    weights = None if weights is None else weights.float()
    loss, _ = core_algos.compute_policy_loss_vanilla(old_log_prob=old.float(), log_prob=logp, advantages=adv,
                                                     response_mask=new_mask.float(), loss_agg_mode=loss_agg,
                                                     config=actor_config(), rollout_is_weights=weights)  # fmt: skip
    return loss.item()


def rollout_correction_cases():
    """trainer.rollout.correction against verl.trainer.ppo.rollout_corr_helper on the same log-probs: each mode's
    weights and mask on a batch with wide ratios, the corrected loss of icepop under each aggregation, and the
    sequence modes on one response whose token log-ratios (+25, -24) each pass the +-20 clamp; and the
    perplexity figures of trainer.update.mismatch_metrics against verl's compute_offpolicy_metrics on that batch."""
    from dler_kernels.reference import LOSS_AGGS

    out = {"modes": {}, "icepop_loss": {}, "example_loss": {}, "sequence_clamp": {}, "perplexity": {}}
    g = torch.Generator().manual_seed(21)
    b, t = 6, 7
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    sampler = -2.0 + torch.randn(b, t, generator=g, dtype=torch.float64)
    log_ratio = 1.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    log_ratio[4] = torch.tensor([15.0, 12.0, -3.0, 0.5, 0.2, -0.1, 0.3])  # a product beyond exp(20)
    log_ratio[5] = torch.tensor([25.0, -24.0, 0.1, -0.2, 0.05, 0.0, 0.1])  # tokens beyond the clamp, sum 1.05
    old = sampler + log_ratio
    for mode, (settings, preset, kwargs) in CORRECTION_MODES.items():
        verl_w, verl_mask = _verl_correction(preset, kwargs, old, sampler, mask)
        _, dler_w, dler_keep = _dler_correction(mode, settings, old, sampler, mask)
        verl_w = torch.ones_like(old) if verl_w is None else verl_w
        valid = mask.bool()
        out["modes"][mode] = dict(
            weight_max_rel=((dler_w - verl_w).abs() / verl_w.abs().clamp_min(1e-30))[valid].max().item(),
            masks_equal=bool(torch.equal(dler_keep[valid], verl_mask.bool()[valid])),
            masked=int((~verl_mask.bool() & valid).sum()), zero_weights=int(((verl_w == 0) & valid).sum()),
        )  # fmt: skip

    # the perplexity figures: per response (every one non-empty: verl counts an empty one as ratio 1), then averaged
    from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics

    from trainer.update.mismatch_metrics import MismatchSums
    from trainer.update.packing import UpdateRow

    lengths = mask.sum(-1).long().tolist()
    rows = [UpdateRow([1], list(range(n)), 0.0, old_logprobs=old[i, :n], sampler_logprobs=sampler[i, :n])
            for i, n in enumerate(lengths)]  # fmt: skip
    ours = MismatchSums.of(rows, corrected=False).as_record()
    verls = compute_offpolicy_metrics(old, sampler, mask)
    for key in ("ppl_ratio", "log_ppl_diff"):
        out["perplexity"][key] = dict(verl=verls[key], dler=ours[f"mismatch_{key}"])

    # icepop's loss: random logits whose PPO ratios sit near 1, the batch's wide pi_old / pi_sampler above
    v = 11
    logits = torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t).clone()
    current = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].double()
    old_loss = current + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    sampler_loss = old_loss - log_ratio.clamp(-3.0, 3.0)  # some tokens off [0.5, 5], most on it
    verl_w, verl_mask = _verl_correction("decoupled_token_icepop", {}, old_loss, sampler_loss, mask)
    fixes = _dler_correction("icepop", {}, old_loss, sampler_loss, mask)[0]
    for loss_agg in LOSS_AGGS:
        out["icepop_loss"][loss_agg] = dict(
            verl=_verl_loss(verl_w, verl_mask, logits, targets, old_loss, adv, loss_agg),
            dler=_dler_loss(fixes, logits, targets, old_loss, adv, mask, loss_agg, clip_c=3.0),
            off_band=int(((verl_w == 0) & mask.bool()).sum()),
        )  # fmt: skip

    # one response of 4 tokens, ratios 1, 1, 1, 10, advantage 1, the policy unchanged: IcePop gives -3/4
    logits1 = torch.randn(1, 4, v, generator=g)
    targets1 = torch.randint(0, v, (1, 4), generator=g)
    old1 = torch.log_softmax(logits1, -1).gather(-1, targets1[..., None])[..., 0].double()
    sampler1 = old1 - torch.tensor([[1.0, 1.0, 1.0, 10.0]], dtype=torch.float64).log()
    mask1, adv1 = torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 4)
    verl_w, verl_mask = _verl_correction("decoupled_token_icepop", {}, old1, sampler1, mask1)
    fixes = _dler_correction("icepop", {}, old1, sampler1, mask1)[0]
    for loss_agg in LOSS_AGGS:
        out["example_loss"][loss_agg] = dict(
            verl=_verl_loss(verl_w, verl_mask, logits1, targets1, old1, adv1, loss_agg),
            dler=_dler_loss(fixes, logits1, targets1, old1, adv1, mask1, loss_agg, clip_c=3.0),
        )  # fmt: skip

    # token log-ratios +25 and -24: each beyond +-20, their sum 1 inside it
    old2 = torch.tensor([[-1.0, -30.0]], dtype=torch.float64)
    sampler2 = torch.tensor([[-26.0, -6.0]], dtype=torch.float64)
    mask2 = torch.ones(1, 2, dtype=torch.float64)
    for mode, preset in (("seq_tis", "decoupled_seq_is"), ("seq_mis", "decoupled_geo_rs")):
        verl_w, verl_mask = _verl_correction(preset, {}, old2, sampler2, mask2)
        _, dler_w, dler_keep = _dler_correction(mode, {}, old2, sampler2, mask2)
        out["sequence_clamp"][mode] = dict(
            verl_weights=None if verl_w is None else verl_w[0].tolist(), dler_weights=dler_w[0].tolist(),
            verl_mask=verl_mask[0].bool().tolist(), dler_mask=dler_keep[0].tolist(),
        )  # fmt: skip
    return out


SECTIONS = {"rollout_correction": rollout_correction_cases}


def main():
    only = sys.argv[1:]
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}: expected some of {sorted(SECTIONS)}")
    with contextlib.redirect_stdout(sys.stderr):  # verl prints its patching steps
        result = {name: SECTIONS[name]() for name in only} if only else checks()
    json.dump(result, sys.stdout)


def replace_verls_vanilla():
    """Register a dler loss under verl's own name "vanilla" (refused; verl's entry is put back if it was not)."""
    held = core_algos.POLICY_LOSS_REGISTRY["vanilla"]
    try:
        dler_verl._register("vanilla", dler_verl.compute_policy_loss_dler)
    finally:
        core_algos.POLICY_LOSS_REGISTRY["vanilla"] = held


def error_messages():
    """The ValueError of each bad input, and the warning of an untested verl version."""
    from dler_kernels.integrations import warn_if_untested

    mask = torch.ones(2, 3)
    bad = {
        "loss_agg_mode": lambda: dler_verl.loss_options(actor_config(), "seq-mean", mask),
        "clip_ratio_c": lambda: dler_verl.loss_options(actor_config(clip_ratio_c=1.0), "token-mean", mask),
        "batch_num_tokens": lambda: dler_verl.loss_options(actor_config(dict(dp_size=2)), "token-mean", mask),
        "global_batch_size": lambda: dler_verl.loss_options(actor_config(dict(dp_size=2)), "seq-mean-token-sum", mask),
        "config": lambda: dler_verl.loss_options(None, "token-mean", mask),
        "loss_mode": lambda: dler_verl.linear_policy_loss_verl(torch.zeros(2, 3, 8), torch.zeros(5, 8), mask.long(),
                                                               mask, mask, mask, config=actor_config(),
                                                               loss_mode="dler_gmpo"),
        "ratio_cap": lambda: dler_verl.loss_options(actor_config(clip_ratio_c=0.0), "token-mean", mask, "dler_dppo_tv"),
        "clip_ratio_low": lambda: dler_verl.loss_options(actor_config(clip_ratios=(1.5, 0.28)), "token-mean", mask,
                                                         "dler_cispo"),
        "verl_name_taken": replace_verls_vanilla,
        "hidden": lambda: dler_verl.linear_policy_loss_verl(torch.zeros(2, 4, 8), torch.zeros(5, 8), mask.long(), mask,
                                                            mask, mask, config=actor_config()),
    }  # fmt: skip
    out = {}
    for name, call in bad.items():
        try:
            call()
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside = warn_if_untested("verl", "0.8.0", dler_verl.TESTED_VERL)
    out["untested_version_warning"] = "" if inside else "; ".join(str(w.message) for w in caught)
    return out


def checks():
    fused_backend, vlm_error = fused_backend_cases()
    return dict(
        errors=error_messages(),
        verl_version=verl.__version__,
        registered={name: core_algos.get_policy_loss_fn(name) is fn for name, fn in dler_verl.POLICY_LOSSES.items()},
        vanilla_alias=core_algos.get_policy_loss_fn("dler_vanilla") is core_algos.get_policy_loss_fn("dler"),
        registered_loss=registered_loss_cases(),
        fused_loss=fused_loss_cases(),
        legacy=legacy_compute_policy_loss_case(),
        fused_backend=fused_backend,
        vlm_error=vlm_error,
    )


if __name__ == "__main__":
    main()
