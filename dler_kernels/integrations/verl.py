r"""verl integration: a policy loss for each of the kernels' objectives, and the ``"dler"`` fused-kernel backend of
verl's actor.

Installed as a verl plugin (entry point ``verl.plugins: dler``), so that ``import verl`` in every Ray worker
registers them; set in the config::

    actor_rollout_ref.actor.policy_loss.loss_mode=dler                   # or dler_gspo, dler_cispo, ... (VERL_LOSSES)
    actor_rollout_ref.model.use_fused_kernels=True
    +actor_rollout_ref.model.fused_kernel_options.impl_backend=dler      # log-probs/entropy without logits

(or ``VERL_USE_EXTERNAL_MODULES=dler_kernels.integrations.verl`` where the package is not pip-installed).

* **Policy losses** (``VERL_LOSSES``, each registered under its name): ``"dler"`` (alias ``"dler_vanilla"``) is
  verl's vanilla PPO loss, ``"dler_<name>"`` verl's loss ``<name>`` (``gspo``, ``cispo``, ``sapo``, ``geo_mean``,
  ``dppo_tv``, ``dppo_kl``), and ``"dler_gspo_sequence"``, ``"dler_vespo"``, ``"dler_luspo"`` objectives verl
  lacks. Each takes verl's arguments and config (``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` as
  ``eps_low`` / ``eps_high``; ``clip_ratio_c`` as the dual clip ``clip_c`` of vanilla and the ratio cap of DPPO;
  ``tau_pos`` / ``tau_neg`` of SAPO; ``loss_agg_mode`` with ``config.global_batch_info``; ``rollout_is_weights``)
  and computes the kernels' specification (``reference.per_token_loss_from_logprobs`` and its aggregation
  weights). Under a verl name it does what verl's function does, its aggregation quirks included: SAPO's
  ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says; GMPO's mean over the micro-batch's rows without
  ``loss_agg_mode`` or ``global_batch_info``, the IS weights entering as each row's geometric mean. verl's
  registry hands a policy loss only the log-probs, so these are elementwise; the fused work is in the backend
  below. Differences: where verl divides by a token count + 1e-8 (``seq-mean-token-mean``, GMPO's means) these
  divide by the count (relative 1e-8 / count); ``actor/ppo_kl`` is the mean of old - new log-prob without
  verl's +-20 clamp.
* **Fused backend** ``forward_with_dler_backend``: the causal LM's forward for ``use_fused_kernels`` that
  returns ``log_probs`` and ``entropy`` from the last hidden states and ``lm_head.weight`` through the
  differentiable ``linear_token_logprobs`` (one ``chunk_size x V`` buffer; the backward recomputes the logits
  chunk by chunk), in place of verl's ``FusedLinearForPPO``. Dense text models only.
* **Fused loss from hidden states** ``linear_policy_loss_verl``: ``linear_policy_loss`` with verl's names and
  padded ``(batch, response_length)`` layout, for actors that hand the loss the hidden states; ``loss_mode``
  picks the loss of ``VERL_LOSSES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import verl
from verl.models.transformers import monkey_patch
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

from .. import linear_policy_loss, linear_token_logprobs, objectives
from .. import reference as ref
from ..loss_inputs import loss_options as checked_loss_options
from ..objectives.dppo import BINARY_KL_EPS
from ..objectives.gspo import GSPO_TOKEN_LOG_RATIO_MAX
from ..validate import check_name
from . import warn_if_untested

TESTED_VERL = ("0.9.1", "0.10.0")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's own per-model forwards for these (vision-language) model types; ours is the dense text one.
_VLM_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")
GEO_MEAN_LOG_EPS = 1e-10  # verl's guard in GMPO's log(IS weight): a zero weight gives its row (1e-10)^(1/|y|), not 0
DPPO_RATIO_CAP = 20.0  # verl's DPPO cap when the config has no clip_ratio_c

warn_if_untested("verl", verl.__version__, TESTED_VERL)


@dataclass(frozen=True)
class VerlLoss:
    """A policy loss verl selects by name (``actor.policy_loss.loss_mode``): the objective it runs and how verl's
    arguments reach it."""

    objective: str
    """The objective (``dler_kernels.objectives``)."""
    verl_name: str | None = None
    """verl's own loss of the same math, whose behaviour this one reproduces (None: verl has none)."""
    aggregation: str = "loss_agg_mode"
    """``loss_agg_mode``: verl's argument with ``global_batch_info``, as verl's ``agg_loss``;
    ``seq-mean-token-mean``: that mode whatever the argument says, with ``global_batch_info`` (verl's SAPO);
    ``rows``: the mean of the sequences' losses over the micro-batch's rows, empty ones included, neither read, the
    IS weights as each row's geometric mean (verl's GMPO)."""


VERL_LOSSES: dict[str, VerlLoss] = {
    "dler": VerlLoss("ppo_clip", "vanilla"),
    "dler_vanilla": VerlLoss("ppo_clip", "vanilla"),
    "dler_gspo": VerlLoss("gspo_token", "gspo"),
    "dler_gspo_sequence": VerlLoss("gspo"),
    "dler_cispo": VerlLoss("cispo", "cispo"),
    "dler_sapo": VerlLoss("sapo", "sapo", aggregation="seq-mean-token-mean"),
    "dler_geo_mean": VerlLoss("gmpo", "geo_mean", aggregation="rows"),
    "dler_dppo_tv": VerlLoss("dppo_tv", "dppo_tv"),
    "dler_dppo_kl": VerlLoss("dppo_kl", "dppo_kl"),
    "dler_vespo": VerlLoss("vespo"),
    "dler_luspo": VerlLoss("luspo"),
}


def verl_loss(loss_mode: str) -> VerlLoss:
    """The loss registered as ``loss_mode``; an unknown name is a ValueError listing the choices."""
    check_name("loss_mode", loss_mode, VERL_LOSSES)
    return VERL_LOSSES[loss_mode]


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _objective_params(objective: str, config) -> tuple[dict, dict]:
    """The objective's parameters read from verl's actor config, and the config key each came from."""
    reads = objectives.OBJECTIVES[objective].defaults
    clip_ratio = _get(config, "clip_ratio", 0.2)
    params, keys = {}, {}
    if "eps_low" in reads:
        params["eps_low"], keys["eps_low"] = float(_get(config, "clip_ratio_low", clip_ratio)), "clip_ratio_low"
    if "eps_high" in reads:
        params["eps_high"], keys["eps_high"] = float(_get(config, "clip_ratio_high", clip_ratio)), "clip_ratio_high"
    if "clip_c" in reads:
        clip_c = _get(config, "clip_ratio_c", 3.0)
        if not clip_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound), got {clip_c}")
        params["clip_c"], keys["clip_c"] = float(clip_c), "clip_ratio_c"
    else:
        params["clip_c"] = None  # PPO-clip's alone
    if "ratio_cap" in reads:
        params["ratio_cap"], keys["ratio_cap"] = float(_get(config, "clip_ratio_c", DPPO_RATIO_CAP)), "clip_ratio_c"
    for key in ("tau_pos", "tau_neg"):
        if key in reads:
            params[key], keys[key] = _get(config, key), key
    if "cispo_clip" in reads:
        params["cispo_clip"] = "both"  # verl's two-sided clip
    return params, keys


def loss_options(config, loss_agg_mode: str, response_mask: torch.Tensor, loss_mode: str = "dler") -> dict:
    """verl's actor config, ``loss_agg_mode`` and ``config.global_batch_info`` as keyword arguments of
    ``policy_loss`` / ``linear_policy_loss`` for the loss ``loss_mode`` (``objective`` and its parameters,
    ``loss_agg``, ``normalizer``, ``norm_length``): the aggregation of verl's loss of that name (``VerlLoss``)."""
    spec = verl_loss(loss_mode)
    if config is None:
        raise ValueError("config: the actor config (clip_ratio, clip_ratio_low/high, clip_ratio_c) is required")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    params, keys = _objective_params(spec.objective, config)
    options = dict(objective=spec.objective, **params)
    if spec.aggregation == "rows":
        options.update(loss_agg="seq-mean-token-mean", normalizer=float(max(response_mask.shape[0], 1)))
    else:
        options.update(_aggregation(config, loss_agg_mode if spec.aggregation == "loss_agg_mode"
                                    else spec.aggregation, response_mask))  # fmt: skip
    try:
        checked_loss_options(options)
    except ValueError as e:
        key = next((k for k in keys if str(e).startswith(f"{k} ")), None)
        if key is None:
            raise
        raise ValueError(f"{keys[key]} (the {key} of objective {spec.objective!r}): {e}") from None
    return options


def _aggregation(config, loss_agg_mode: str, response_mask: torch.Tensor) -> dict:
    """verl's ``agg_loss`` with ``config.global_batch_info`` as ``loss_agg`` / ``normalizer`` / ``norm_length``."""
    info = dict(_get(config, "global_batch_info", {}) or {})
    dp_size = info.get("dp_size") or 1
    if loss_agg_mode == "token-sum":
        return dict(loss_agg="token-mean", normalizer=1.0 / dp_size)
    if loss_agg_mode == "token-mean":
        normalizer = _global_normalizer(info.get("batch_num_tokens"), "batch_num_tokens", dp_size)
        return dict(loss_agg="token-mean", normalizer=normalizer)
    normalizer = _global_normalizer(info.get("global_batch_size"), "global_batch_size", dp_size)
    options = dict(loss_agg=loss_agg_mode, normalizer=normalizer)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        options["norm_length"] = float(info.get("loss_scale_factor") or response_mask.shape[-1])
    return options


def _global_normalizer(count, name: str, dp_size: int) -> float | None:
    """agg_loss divides by the global ``count`` and multiplies by dp_size (FSDP averages gradients over
    ranks): the kernels' normaliser count / dp_size; without a count, the local one (dp_size 1 only)."""
    if count is not None:
        return float(count) / dp_size
    if dp_size > 1:
        raise ValueError(f"global_batch_info: {name} is required when dp_size > 1")
    return None


def _is_weights(spec: VerlLoss, rollout_is_weights, response_mask):
    """The token weights of ``rollout_is_weights`` (no gradient): as given, or for GMPO each row's geometric mean
    of its valid tokens' weights on every token of the row (verl's ``geo_mean``)."""
    if rollout_is_weights is None:
        return None
    weights = rollout_is_weights.detach()
    if spec.aggregation != "rows":
        return weights
    valid = (response_mask > 0).expand_as(weights)
    log_w = torch.where(valid, torch.log(weights + GEO_MEAN_LOG_EPS), 0.0).sum(-1, keepdim=True)
    count = valid.sum(-1, keepdim=True).clamp(min=1).to(log_w.dtype)
    return torch.exp(log_w / count).expand_as(weights)


def _flat(response_mask, *tensors):
    """Padded (batch, response_length) tensors as the kernels' packed [N] layout (+ seq_ids)."""
    batch, length = response_mask.shape
    seq_ids = torch.arange(batch, device=response_mask.device).repeat_interleave(length)
    return seq_ids, [None if t is None else t.expand(batch, length).reshape(-1) for t in tensors]


def compute_policy_loss(
    loss_mode: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss registered as ``loss_mode`` (``VERL_LOSSES``; module docstring) on verl's arguments;
    returns ``(pg_loss, metrics)`` as verl's policy losses do, with verl's three metrics."""
    spec = verl_loss(loss_mode)
    opts = checked_loss_options(loss_options(config, loss_agg_mode, response_mask, loss_mode))
    weights = _is_weights(spec, rollout_is_weights, response_mask)
    seq_ids, (old, lp, adv, mask, weights) = _flat(
        response_mask, old_log_prob, log_prob, advantages, response_mask, weights
    )
    valid = mask > 0
    dtype = ref.accumulation_dtype(lp)
    per_token, _ = ref.per_token_loss_from_logprobs(
        lp.to(dtype), torch.zeros_like(lp, dtype=dtype), old, adv, valid, seq_ids=seq_ids, **opts.per_token()
    )
    agg = ref.aggregation_weights(valid, opts.loss_agg, seq_ids, opts.normalizer, opts.norm_length, dtype, weights)
    pg_loss = (per_token * agg).sum()
    with torch.no_grad():
        metrics = verl_metrics(opts, lp.detach().to(dtype), old.to(dtype), adv.to(dtype), valid, seq_ids)
    return pg_loss.to(log_prob.dtype), metrics


def verl_metrics(opts, logp, old, adv, valid, seq_ids) -> dict[str, float]:
    """verl's ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower`` and ``actor/ppo_kl`` of the objective, each a mean
    over the valid tokens, as verl's loss of the same math defines them (0 where verl's has none, and for SAPO and
    VESPO, which clip nothing); for the objectives verl lacks, those of their nearest verl loss (LUSPO and GSPO's
    sequence form: GSPO's)."""
    log_ratio = torch.where(valid, logp - old, 0.0)
    ratio = torch.exp(torch.clamp(log_ratio, -objectives.LOG_RATIO_CLAMP, objectives.LOG_RATIO_CLAMP))
    objective, none = opts.objective, torch.zeros_like(valid)
    clipped, lower = none, none
    if objective == "ppo_clip":
        loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high))
        clipped = -adv * torch.clamp(ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high) > -adv * ratio
        lower = (adv < 0) & (loss > -opts.clip_c * adv)
    elif objective in ("gspo", "gspo_token", "luspo"):
        seqs = objectives.Sequences(seq_ids, valid, logp.dtype)
        log_seq = seqs.per_token(seqs.mean(log_ratio))
        if objective == "gspo_token":
            log_seq = torch.clamp(log_seq, max=GSPO_TOKEN_LOG_RATIO_MAX)
        seq_ratio = torch.exp(log_seq)
        clipped = -adv * torch.clamp(seq_ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high) > -adv * seq_ratio
    elif objective == "cispo":
        clipped = (ratio < 1.0 - opts.eps_low) | (ratio > 1.0 + opts.eps_high)
    elif objective == "gmpo":
        out = (log_ratio < -opts.eps_low) | (log_ratio > opts.eps_high)
        clipped, lower = out & (adv > 0), out & (adv < 0)
    elif objective in ("dppo_tv", "dppo_kl"):
        kept = _dppo_kept(objective, logp, old, adv, opts)
        clipped, lower = ~kept, kept & (ratio > opts.ratio_cap)
    n = valid.sum().clamp(min=1)
    return {
        "actor/pg_clipfrac": ((clipped & valid).sum() / n).item(),
        "actor/ppo_kl": (-log_ratio.sum() / n).item(),
        "actor/pg_clipfrac_lower": ((lower & valid).sum() / n).item(),
    }


def _dppo_kept(objective, logp, old, adv, opts):
    """DPPO's binary divergence mask (``objectives.dppo``): the tokens whose gradient it keeps."""
    prob, old_prob = torch.exp(logp), torch.exp(old)
    if objective == "dppo_tv":
        return torch.where(adv > 0, prob - old_prob <= opts.eps_high, prob - old_prob >= -opts.eps_low)
    kl = old_prob * (old - logp) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + BINARY_KL_EPS) / (1.0 - prob + BINARY_KL_EPS)
    )
    return torch.where(adv > 0, (kl <= opts.eps_high) | (prob <= old_prob), (kl <= opts.eps_low) | (prob >= old_prob))


def _registered(loss_mode: str):
    """The function verl's registry holds for ``loss_mode``: verl's policy-loss signature."""
    spec = VERL_LOSSES[loss_mode]

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return compute_policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                   config, rollout_is_weights)  # fmt: skip

    loss_fn.__name__ = loss_fn.__qualname__ = f"compute_policy_loss_{loss_mode}"
    same = f"verl's {spec.verl_name!r}" if spec.verl_name else "(verl has none)"
    loss_fn.__doc__ = f"The objective {spec.objective!r} as verl's policy loss {same}: ``compute_policy_loss``."
    return loss_fn


def _register(loss_mode: str, fn) -> None:
    """``register_policy_loss(loss_mode)(fn)``, refusing to replace a loss that is not this module's (verl's own)."""
    held = POLICY_LOSS_REGISTRY.get(loss_mode)
    if held is not None and getattr(held, "__module__", None) != __name__:
        raise ValueError(
            f"verl already registers a policy loss {loss_mode!r} ({held.__module__}.{held.__qualname__}); "
            "the dler losses must not replace it"
        )
    register_policy_loss(loss_mode)(fn)


POLICY_LOSSES = {name: _registered(name) for name in VERL_LOSSES if name != "dler_vanilla"}
POLICY_LOSSES["dler_vanilla"] = POLICY_LOSSES["dler"]
compute_policy_loss_dler = POLICY_LOSSES["dler"]


def linear_policy_loss_verl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    responses: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config,
    loss_agg_mode: str = "token-mean",
    loss_mode: str = "dler",
    rollout_is_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """verl's policy loss ``loss_mode`` (``VERL_LOSSES``; default ``"dler"``, verl's vanilla) on
    ``log_softmax((hidden @ weight.T + bias) / temperature)`` without the logits: ``hidden`` (batch,
    response_length, H) are the hidden states that predict ``responses`` (batch, response_length); the other
    tensors as verl's policy losses take them. Returns the kernels' ``PolicyLossOutput`` (``.loss`` equals the
    registered loss's ``pg_loss``; per-token fields are flattened)."""
    if hidden.dim() != 3 or hidden.shape[:2] != response_mask.shape:
        raise ValueError(
            f"hidden must be (batch, response_length, H) = ({', '.join(map(str, response_mask.shape))}, H) "
            f"like response_mask, got shape {tuple(hidden.shape)}"
        )
    opts = loss_options(config, loss_agg_mode, response_mask, loss_mode)
    weights = _is_weights(VERL_LOSSES[loss_mode], rollout_is_weights, response_mask)
    seq_ids, (targets, old, adv, mask, weights) = _flat(
        response_mask, responses, old_log_prob, advantages, response_mask, weights
    )
    return linear_policy_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, old.float(), adv.float(), mask > 0, bias=bias,
        seq_ids=seq_ids, temperature=temperature, token_weights=None if weights is None else weights.float(),
        chunk_size=chunk_size, backend=backend, **opts,
    )  # fmt: skip


def forward_with_dler_backend(
    self,
    input_ids: torch.LongTensor = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    temperature: float = 1.0,
    shift_labels: torch.LongTensor | None = None,
    **loss_kwargs,
):
    """The causal LM's forward under ``fused_kernels_options.impl_backend=dler``: verl's
    ``forward_with_torch_backend`` with ``linear_token_logprobs`` in place of ``FusedLinearForPPO``."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if return_dict is False:
        raise NotImplementedError("forward_with_dler_backend has to return_dict")
    outputs = forward_base_model(
        self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, cache_position=cache_position,
    )  # fmt: skip
    hidden = outputs[0]
    if shift_labels is not None:  # already rolled by the engine (e.g. under Ulysses sequence parallelism)
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_dler_backend needs labels, shift_labels or input_ids")
    weight = self.lm_head.weight
    bias = self.lm_head.bias
    with torch.autocast(hidden.device.type, enabled=False):
        log_probs, entropy = linear_token_logprobs(
            hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, rolled.reshape(-1).long(),
            bias=bias, temperature=float(temperature), return_entropy=True,
        )  # fmt: skip
    return CausalLMOutputForPPO(
        log_probs=log_probs.view(rolled.shape), entropy=entropy.view(rolled.shape),
        past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
    )  # fmt: skip


_original_patch_forward_with_backends = monkey_patch.patch_forward_with_backends


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    """verl's ``patch_forward_with_backends``, plus the ``"dler"`` backend."""
    if not (use_fused_kernels and fused_kernels_backend == "dler"):
        return _original_patch_forward_with_backends(
            model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend
        )
    model_type = model.config.model_type
    if model_type in _VLM_TYPES:
        raise ValueError(
            f"fused_kernels_options.impl_backend='dler' supports dense text models; model_type={model_type!r} "
            "is a vision-language model (use impl_backend='torch' or 'triton' for it)"
        )
    model._verl_fused_kernels_backend = "dler"
    model.__class__.forward = forward_with_dler_backend


def install() -> None:
    """Make the policy losses of ``VERL_LOSSES`` and ``impl_backend='dler'`` known to verl (idempotent; done on
    import)."""
    for name, fn in POLICY_LOSSES.items():
        _register(name, fn)
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


install()
