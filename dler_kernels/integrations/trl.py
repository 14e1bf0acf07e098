r"""TRL's ``GRPOTrainer`` with its loss computed by ``dler_kernels.linear_policy_loss``.

Usage: replace the class, keep the config::

    from dler_kernels.integrations.trl import DLERGRPOTrainer
    trainer = DLERGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

TRL (1.16) already avoids the logits for the log-probs (``add_fused_lm_head``) but then computes the
clipped loss in PyTorch on ``[B, C]`` tensors, keeps the autograd graph of its chunked LM head, and
with ``old_per_token_logps`` absent needs the log-probs before the loss. Here one
``linear_policy_loss`` call takes the backbone's last hidden states and ``lm_head.weight`` and returns
the loss with its gradients already computed chunk by chunk (one ``chunk_size x V`` buffer).

Semantics: exactly TRL's ``_compute_loss`` for every ``loss_type`` of TRL 1.16, as these settings of
``linear_policy_loss`` (GA: the gradient accumulation steps in training, 1 in eval; B: the micro-batch's
completions)::

    loss_type   level      objective (its parameters from TRL's)              loss_agg, normalizer
    grpo        token      ppo_clip (eps_low=epsilon, eps_high=epsilon_high,  seq-mean-token-mean, B x GA
                           clip_c=delta)
    bnpo        token      ppo_clip                                           token-mean, valid tokens x GA
    dr_grpo     token      ppo_clip                                           token-mean,
                                                                              B x max_completion_length x GA
    dapo        token      ppo_clip                                           token-mean, num_items_in_batch /
                                                                              processes x GA / steps_per_generation
    (those 4)   sequence   gspo (eps_low=epsilon, eps_high=epsilon_high)      as at token level
    luspo       token      ppo_clip (clip_c=delta)                            seq-mean-token-sum, B x GA
    luspo       sequence   gspo                                               seq-mean-token-sum, B x GA
    cispo       token      cispo (cispo_clip="upper",                         as dapo
                           eps_high=epsilon_high - 1)
    sapo        token      sapo (tau_pos / tau_neg = sapo_temperature_*)      as grpo
    vespo       either     vespo (vespo_k_pos, ... = TRL's vespo_*)           as dapo

* ``importance_sampling_level="sequence"`` is GSPO's sequence ratio exp(mean log-ratio), the objective ``gspo``.
* ``cispo``: TRL caps the stop-gradient ratio at ``epsilon_high`` itself (an absolute cap; TRL recommends 5.0),
  the objective at 1 + eps_high, hence eps_high = epsilon_high - 1.
* ``luspo``: TRL sums each sequence's per-token losses, the KL term included, so it is the sum aggregation of
  the level's ratio. (The objective ``luspo`` with ``seq-mean-token-mean`` has the same policy term but would
  average the KL term over each sequence instead of summing it.)
* ``vespo``: TRL's VESPO loss reads only the token log-ratios, so the level changes nothing in it.
* ``delta`` (TRL's two-sided clip, min(r, delta) in the unclipped term) is PPO's dual clip ``clip_c`` when
  delta >= 1 + epsilon_high: then it caps the loss of A < 0 at -delta A and leaves A > 0 alone, as the dual clip
  does. Loss types without PPO's clip ignore it, as TRL does.
* ``off_policy_mask_threshold`` is ``opsm_threshold``, the drift measured from ``old_per_token_logps``.

Also computed: ``temperature``, ``beta`` with the k3 KL (times the importance ratio under TRL's default
``use_bias_correction_kl=True``: the kernels' ``kl_type="k3_ratio"``), vLLM's truncated/masked
importance-sampling ratio (``vllm_importance_sampling_correction``, the kernels' ``token_weights``),
``mask_truncated_completions``, ``tool_mask`` and per-token advantages. The metrics TRL logs (``entropy``,
``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``) are logged from the kernel's
log-probs and entropies, with TRL's reductions.

Two differences of the kernels' own definition, inactive in practice: token log-ratios are clamped to +-20
before exp (TRL clamps only VESPO's) and the k3 KL to [-10, 10], where TRL clamps neither.

Options the fused loss does not compute raise ``ValueError`` naming them: a loss type TRL 1.16 lacks;
``importance_sampling_level="sequence"`` with ``cispo`` or ``sapo`` (their objectives take token ratios, TRL
then the sequence ratio) or with ``beta != 0`` and ``use_bias_correction_kl`` (TRL weights the KL by the
sequence ratio, ``k3_ratio`` by the token ratio); ``cispo`` with ``epsilon_high < 1`` (a cap below 1 has no
eps_high >= 0); ``delta`` at sequence level, or below 1 + ``epsilon_high``; ``off_policy_mask_threshold``
with ``use_vllm`` or with ``sampling_per_token_logps`` in the inputs (TRL then measures the drift from the
sampler's log-probs, which are not the old ones of the ratio); ``vespo`` with vLLM's importance-sampling
correction (TRL folds that ratio into VESPO's weight); ``top_entropy_quantile < 1``; the entropy bonus
(``entropy_coef``, ``use_adaptive_entropy``); the MoE router aux loss; vision inputs; and ``beta != 0``
together with vLLM's importance-sampling correction (TRL weights only the policy term by that ratio).
"""

from __future__ import annotations

import torch
import trl
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from .. import linear_policy_loss, linear_token_logprobs
from . import warn_if_untested

TESTED_TRL = ("1.16.0", "1.17.0")
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""TRL's loss types with PPO's clipped ratio (and the ``clip_ratio/*`` metrics)."""
TOKEN_RATIO_LOSS_TYPES = ("cispo", "sapo")
"""Loss types whose objectives here take token ratios, where TRL's sequence level gives them the sequence ratio."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_VISION_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip

warn_if_untested("trl", trl.__version__, TESTED_TRL)


def check_grpo_options(trainer) -> None:
    """Raise ``ValueError`` naming the first option of ``trainer`` (a ``GRPOTrainer``) that the fused loss
    does not compute."""
    args = trainer.args
    loss_type, level = trainer.loss_type, trainer.importance_sampling_level
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported by DLERGRPOTrainer "
            f"(supported: {', '.join(SUPPORTED_LOSS_TYPES)}); use trl.GRPOTrainer for it"
        )
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence'; got {level!r}")
    if level == "sequence" and loss_type in TOKEN_RATIO_LOSS_TYPES:
        raise ValueError(
            f"importance_sampling_level='sequence' with loss_type={loss_type!r} is not supported by DLERGRPOTrainer "
            f"(its {loss_type} objective takes token ratios, TRL's the sequence ratio); "
            "use importance_sampling_level='token'"
        )
    if level == "sequence" and trainer.beta != 0.0 and args.use_bias_correction_kl:
        raise ValueError(
            "importance_sampling_level='sequence' with beta != 0 and use_bias_correction_kl=True is not supported by "
            "DLERGRPOTrainer (TRL weights the KL by the sequence ratio, the fused loss by the token ratio); set "
            "use_bias_correction_kl=False"
        )
    if loss_type == "cispo" and trainer.epsilon_high < 1.0:
        raise ValueError(
            f"epsilon_high={trainer.epsilon_high!r}: loss_type='cispo' caps the ratio at epsilon_high itself and "
            "DLERGRPOTrainer computes caps >= 1 only (1 + eps_high); set epsilon_high >= 1 (TRL recommends 5.0)"
        )
    delta = args.delta
    if delta is not None and loss_type in CLIPPED_LOSS_TYPES:
        if level == "sequence" or delta <= 1.0 or delta < 1.0 + trainer.epsilon_high:
            raise ValueError(
                f"delta={delta!r}: DLERGRPOTrainer computes TRL's two-sided clip as the dual clip, which needs "
                "importance_sampling_level='token', delta > 1 and delta >= 1 + epsilon_high; unset delta or "
                "use trl.GRPOTrainer"
            )
    if trainer.off_policy_mask_threshold is not None and trainer.use_vllm:
        raise ValueError(
            "off_policy_mask_threshold with use_vllm=True is not supported by DLERGRPOTrainer (TRL measures the "
            "drift from vLLM's log-probs, the fused loss from old_per_token_logps); unset off_policy_mask_threshold"
        )
    vllm_is = trainer.use_vllm and trainer.vllm_importance_sampling_correction
    if loss_type == "vespo" and vllm_is:
        raise ValueError(
            "loss_type='vespo' with vllm_importance_sampling_correction=True is not supported by DLERGRPOTrainer "
            "(TRL folds the ratio into VESPO's sequence weight, the fused loss would weight each token's loss); "
            "set vllm_importance_sampling_correction=False"
        )
    unsupported = [
        ("top_entropy_quantile", trainer.top_entropy_quantile < 1.0, "the high-entropy token mask"),
        ("entropy_coef / use_adaptive_entropy", getattr(trainer, "_entropy_bonus_enabled", False),
         "TRL's entropy bonus (a token mean independent of loss_type)"),
        ("router_aux_loss_coef / output_router_logits", trainer.aux_loss_enabled, "the MoE load-balancing loss"),
    ]  # fmt: skip
    for name, active, what in unsupported:
        if active:
            raise ValueError(f"{name}: {what} is not supported by DLERGRPOTrainer; unset it or use trl.GRPOTrainer")
    if trainer.beta != 0.0 and vllm_is:
        raise ValueError(
            "beta != 0 together with vllm_importance_sampling_correction=True is not supported by DLERGRPOTrainer: "
            "TRL weights only the policy term by the importance-sampling ratio, the fused loss weights each "
            "token's whole loss; set beta=0 or vllm_importance_sampling_correction=False"
        )


def objective_settings(trainer) -> dict:
    """The objective of ``linear_policy_loss`` and its parameters that give TRL's per-token policy loss for
    ``trainer``'s ``loss_type`` and ``importance_sampling_level`` (the table of the module docstring), OPSM's
    threshold included; ``trainer``'s options checked by ``check_grpo_options``."""
    args, loss_type = trainer.args, trainer.loss_type
    settings = dict(opsm_threshold=trainer.off_policy_mask_threshold)
    if loss_type == "cispo":
        return dict(settings, objective="cispo", cispo_clip="upper", eps_high=trainer.epsilon_high - 1.0)
    if loss_type == "sapo":
        return dict(settings, objective="sapo", tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
    if loss_type == "vespo":
        return dict(settings, objective="vespo", vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                    vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)  # fmt: skip
    bounds = dict(eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high)
    if trainer.importance_sampling_level == "sequence":
        return dict(settings, objective="gspo", **bounds)
    return dict(settings, objective="ppo_clip", clip_c=args.delta, **bounds)


def _add_policy_loss_forward(model) -> None:
    """Let ``model(input_ids, attention_mask, dler_policy_loss=fn)`` run the backbone and return
    ``fn(last_hidden_state, lm_head)``. The loss is computed inside the model's forward, so that the
    hooks of FSDP / ZeRO-3 / PEFT wrappers around it fire (as for TRL's own ``fused_lm_head``)."""
    if getattr(model, "_dler_policy_loss_forward", False):
        return
    previous_forward = model.forward

    def forward(*args, dler_policy_loss=None, **kwargs):
        if dler_policy_loss is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        return dler_policy_loss(hidden, model.get_output_embeddings())

    model.forward = forward
    model._dler_policy_loss_forward = True


def _lm_head_tensors(lm_head):
    weight, bias = lm_head.weight, lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):  # FSDP2 shards the head; the loss needs all of its rows
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


class DLERGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is ``dler_kernels.linear_policy_loss`` (see the module docstring).

    ``dler_chunk_size``: rows per chunk of the fused LM head (default: the kernels' own);
    ``dler_backend``: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (default: the best available).
    """

    def __init__(self, *args, dler_chunk_size: int | None = None, dler_backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_grpo_options(self)
        self.dler_chunk_size = dler_chunk_size
        self.dler_backend = dler_backend
        _add_policy_loss_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def _compute_loss(self, model, inputs):
        check_grpo_options(self)  # again: attributes may have been changed since __init__
        for key in _VISION_KEYS:
            if inputs.get(key) is not None:
                raise ValueError(f"inputs[{key!r}]: vision inputs are not supported by DLERGRPOTrainer")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        batch, width = completion_ids.shape
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        if self.off_policy_mask_threshold is not None and inputs.get("sampling_per_token_logps") is not None:
            raise ValueError(
                "off_policy_mask_threshold with inputs['sampling_per_token_logps'] is not supported by "
                "DLERGRPOTrainer (TRL measures the drift from the sampler's log-probs, the fused loss from "
                "old_per_token_logps); unset off_policy_mask_threshold"
            )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # TRL's [B, 1] or [B, C]
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        token_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            token_weights = inputs["importance_sampling_ratio"].expand(batch, width)
        mode = "train" if self.model.training else "eval"
        loss_agg, normalizer = self._aggregation(inputs, mask, batch, mode)
        settings = objective_settings(self)

        flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
        valid = flat(mask).bool()
        targets = flat(completion_ids)
        kl_type = "k3_ratio" if self.args.use_bias_correction_kl else "k3"

        def fused_loss(hidden, lm_head):
            # The hidden state before each completion token predicts it.
            hidden = hidden[:, -width - 1 : -1].reshape(-1, hidden.shape[-1])
            if self.args.cast_lm_head_to_fp32:
                dtype = torch.float32
            elif torch.is_autocast_enabled(hidden.device.type):
                dtype = torch.get_autocast_dtype(hidden.device.type)
            else:
                dtype = lm_head.weight.dtype
            # ZeRO-3 gathers the head only inside its own forward; this loss reads it directly.
            gather = maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias)
            with gather, torch.autocast(hidden.device.type, enabled=False):
                weight, bias = _lm_head_tensors(lm_head)
                hidden = hidden.to(weight.device, dtype)
                weight = weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
                old_lp = flat(old)
                if old_lp is None:  # on-policy: TRL takes the current log-probs, detached (ratio 1)
                    old_lp = linear_token_logprobs(
                        hidden.detach(), weight.detach(), targets, bias=None if bias is None else bias.detach(),
                        temperature=self.temperature, chunk_size=self.dler_chunk_size, backend=self.dler_backend,
                    )  # fmt: skip
                return linear_policy_loss(
                    hidden, weight, targets, old_lp.float(), flat(advantages.expand(batch, width)).float(), valid,
                    bias=bias, ref_logprobs=None if ref is None else flat(ref).float(),
                    seq_ids=torch.arange(batch, device=valid.device).repeat_interleave(width),
                    **settings, beta=self.beta, kl_type=kl_type,
                    temperature=self.temperature, loss_agg=loss_agg, normalizer=float(normalizer),
                    token_weights=None if token_weights is None else flat(token_weights).float(),
                    chunk_size=self.dler_chunk_size, backend=self.dler_backend,
                ), old_lp  # fmt: skip

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast():
            out, old_lp = model(input_ids=input_ids, attention_mask=attention_mask, dler_policy_loss=fused_loss)
        self._log_policy_metrics(mode, out, old_lp, ref, mask, advantages)
        return out.loss

    def _aggregation(self, inputs, mask, batch, mode):
        """(loss_agg, normalizer): each loss type's reduction and denominator of TRL, the denominator as the
        kernels' global normaliser."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "sapo"):  # the mean over all B rows of each row's token mean
            return "seq-mean-token-mean", batch * accumulation
        if self.loss_type == "luspo":  # the mean over all B rows of each row's token sum
            return "seq-mean-token-sum", batch * accumulation
        if self.loss_type == "bnpo":
            return "token-mean", mask.sum().clamp(min=1.0).item() * accumulation
        if self.loss_type == "dr_grpo":
            return "token-mean", batch * self.max_completion_length * accumulation
        # dapo, cispo, vespo: num_items_in_batch spans the generation batch; rescaled to one accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return "token-mean", normalizer

    def _log_policy_metrics(self, mode, out, old, ref, mask, advantages):
        """TRL's metrics of ``_compute_loss`` (same names, same reductions, ``advantages`` in TRL's shape), from
        the kernel's outputs. At sequence level TRL's ratio is one value per row: it then averages per row."""
        shape = mask.shape
        maskf = mask.float()
        logp = out.logprobs.view(shape)
        log_ratio = logp - old.view(shape).float()
        if self.importance_sampling_level == "sequence":
            coef_1 = torch.exp(((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1))
        else:
            coef_1 = torch.exp(log_ratio)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * maskf).sum(), maskf.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            diff = ref.float() - logp
            kl = torch.exp(diff) - diff - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(out.entropy.view(shape)))
        if self.loss_type in CLIPPED_LOSS_TYPES:
            if self.args.delta is not None:  # TRL's clip metrics read its ratio after the two-sided clip
                coef_1 = torch.clamp(coef_1, max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            region = ((low + high) > 0).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(region))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).float()
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped))
        elif self.loss_type == "vespo":
            args = self.args
            phi = self.get_gamma_weights(advantages, log_ratio, mask, None, args.vespo_k_pos, args.vespo_lambda_pos,
                                         args.vespo_k_neg, args.vespo_lambda_neg)  # fmt: skip
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
