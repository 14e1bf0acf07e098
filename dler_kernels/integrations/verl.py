r"""verl integration: the ``"dler"`` policy loss and the ``"dler"`` fused-kernel backend of verl's actor.

Installed as a verl plugin (entry point ``verl.plugins: dler``), so that ``import verl`` in every Ray worker
registers both; set in the config::

    actor_rollout_ref.actor.policy_loss.loss_mode=dler                   # the registered policy loss
    actor_rollout_ref.model.use_fused_kernels=True
    +actor_rollout_ref.model.fused_kernel_options.impl_backend=dler      # log-probs/entropy without logits

(or ``VERL_USE_EXTERNAL_MODULES=dler_kernels.integrations.verl`` where the package is not pip-installed).

* **Policy loss** ``compute_policy_loss_dler`` (registered as ``"dler"``): verl's vanilla PPO loss with
  verl's argument names (``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, ``clip_ratio_c`` of dual
  clip, ``loss_agg_mode`` with ``config.global_batch_info``, ``rollout_is_weights``) computed by the
  kernels' specification (``reference.per_token_loss_from_logprobs`` and its aggregation weights). verl's
  registry hands a policy loss only the log-probs, so this one is elementwise; the fused work is in the
  backend below. Differences: ``seq-mean-token-mean`` divides by the token count where verl divides by
  count + 1e-8 (relative 1e-8 / count).
* **Fused backend** ``forward_with_dler_backend``: the causal LM's forward for ``use_fused_kernels`` that
  returns ``log_probs`` and ``entropy`` from the last hidden states and ``lm_head.weight`` through the
  differentiable ``linear_token_logprobs`` (one ``chunk_size x V`` buffer; the backward recomputes the logits
  chunk by chunk), in place of verl's ``FusedLinearForPPO``. Dense text models only.
* **Fused loss from hidden states** ``linear_policy_loss_verl``: ``linear_policy_loss`` with verl's names and
  padded ``(batch, response_length)`` layout, for actors that hand the loss the hidden states.
"""

from __future__ import annotations

import torch
import verl
from verl.models.transformers import monkey_patch
from verl.trainer.ppo.core_algos import register_policy_loss

from .. import linear_policy_loss, linear_token_logprobs
from .. import reference as ref
from . import warn_if_untested

TESTED_VERL = ("0.9.1", "0.10.0")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's own per-model forwards for these (vision-language) model types; ours is the dense text one.
_VLM_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")

warn_if_untested("verl", verl.__version__, TESTED_VERL)


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def loss_options(config, loss_agg_mode: str, response_mask: torch.Tensor) -> dict:
    """verl's actor config, ``loss_agg_mode`` and ``config.global_batch_info`` as keyword arguments of
    ``policy_loss`` / ``linear_policy_loss`` (``eps_low``, ``eps_high``, ``clip_c``, ``loss_agg``,
    ``normalizer``, ``norm_length``): the same aggregation as verl's ``agg_loss``."""
    if config is None:
        raise ValueError("config: the actor config (clip_ratio, clip_ratio_low/high, clip_ratio_c) is required")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    clip_ratio = _get(config, "clip_ratio", 0.2)
    clip_c = _get(config, "clip_ratio_c", 3.0)
    if not clip_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound), got {clip_c}")
    info = dict(_get(config, "global_batch_info", {}) or {})
    dp_size = info.get("dp_size") or 1
    options = dict(eps_low=float(_get(config, "clip_ratio_low", clip_ratio)),
                   eps_high=float(_get(config, "clip_ratio_high", clip_ratio)), clip_c=float(clip_c))  # fmt: skip
    if loss_agg_mode == "token-sum":
        return dict(options, loss_agg="token-mean", normalizer=1.0 / dp_size)
    if loss_agg_mode == "token-mean":
        normalizer = _global_normalizer(info.get("batch_num_tokens"), "batch_num_tokens", dp_size)
        return dict(options, loss_agg="token-mean", normalizer=normalizer)
    normalizer = _global_normalizer(info.get("global_batch_size"), "global_batch_size", dp_size)
    options.update(loss_agg=loss_agg_mode, normalizer=normalizer)
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


def _flat(response_mask, *tensors):
    """Padded (batch, response_length) tensors as the kernels' packed [N] layout (+ seq_ids)."""
    batch, length = response_mask.shape
    seq_ids = torch.arange(batch, device=response_mask.device).repeat_interleave(length)
    return seq_ids, [None if t is None else t.expand(batch, length).reshape(-1) for t in tensors]


@register_policy_loss("dler")
def compute_policy_loss_dler(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``vanilla`` policy loss (see the module docstring); returns ``(pg_loss, metrics)`` as verl's."""
    opts = loss_options(config, loss_agg_mode, response_mask)
    seq_ids, (old, lp, adv, mask, weights) = _flat(
        response_mask, old_log_prob, log_prob, advantages, response_mask, rollout_is_weights
    )
    valid = mask > 0
    dtype = ref.accumulation_dtype(lp)
    per_token, _ = ref.per_token_loss_from_logprobs(
        lp.to(dtype), torch.zeros_like(lp, dtype=dtype), old, adv, valid,
        eps_low=opts["eps_low"], eps_high=opts["eps_high"], clip_c=opts["clip_c"],
    )  # fmt: skip
    agg = ref.aggregation_weights(
        valid, opts["loss_agg"], seq_ids, opts["normalizer"], opts.get("norm_length"), dtype,
        None if weights is None else weights.detach(),
    )  # fmt: skip
    pg_loss = (per_token * agg).sum()
    with torch.no_grad():
        metrics = ref.policy_metrics_ref(
            lp.detach().to(dtype), old, adv, torch.zeros_like(per_token), valid, opts["eps_low"], opts["eps_high"],
            opts["clip_c"], None, per_token.detach(),
        )  # fmt: skip
    return pg_loss.to(log_prob.dtype), {
        "actor/pg_clipfrac": (metrics["clip_frac_low"] + metrics["clip_frac_high"]).item(),
        "actor/ppo_kl": metrics["approx_kl"].item(),
        "actor/pg_clipfrac_lower": metrics["clip_frac_dual"].item(),
    }


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
    rollout_is_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """verl's vanilla policy loss on ``log_softmax((hidden @ weight.T + bias) / temperature)`` without the
    logits: ``hidden`` (batch, response_length, H) are the hidden states that predict ``responses``
    (batch, response_length); the other tensors as verl's policy losses take them. Returns the kernels'
    ``PolicyLossOutput`` (``.loss`` equals verl's ``pg_loss``; per-token fields are flattened)."""
    if hidden.dim() != 3 or hidden.shape[:2] != response_mask.shape:
        raise ValueError(
            f"hidden must be (batch, response_length, H) = ({', '.join(map(str, response_mask.shape))}, H) "
            f"like response_mask, got shape {tuple(hidden.shape)}"
        )
    opts = loss_options(config, loss_agg_mode, response_mask)
    seq_ids, (targets, old, adv, mask, weights) = _flat(
        response_mask, responses, old_log_prob, advantages, response_mask, rollout_is_weights
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
    """Make ``impl_backend='dler'`` known to verl (idempotent; done on import)."""
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


install()
