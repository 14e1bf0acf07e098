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

Semantics: exactly TRL's ``_compute_loss`` for ``loss_type`` ``grpo``, ``bnpo``, ``dr_grpo`` and
``dapo`` with token-level importance sampling, including ``epsilon`` / ``epsilon_high``,
``temperature``, ``beta`` with the k3 KL (times the importance ratio under TRL's default
``use_bias_correction_kl=True``: the kernels' ``kl_type="k3_ratio"``), vLLM's truncated/masked
importance-sampling ratio (``vllm_importance_sampling_correction``), ``mask_truncated_completions``,
``tool_mask``, gradient accumulation and the normalisers of each loss type. The metrics TRL logs
(``entropy``, ``kl``, ``clip_ratio/*``) are logged from the kernel's log-probs and entropies.

Two differences of the kernels' own definition, inactive in practice: the log-ratio is clamped to
+-20 and the k3 KL to [-10, 10] (as verl does), where TRL clamps neither.

Options the fused loss does not compute raise ``ValueError`` naming them: other loss types
(``cispo``, ``sapo``, ``luspo``, ``vespo``), ``importance_sampling_level="sequence"``, ``delta``,
``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, the entropy bonus (``entropy_coef``,
``use_adaptive_entropy``), the MoE router aux loss, vision inputs, and ``beta != 0`` together with
vLLM's importance-sampling correction (TRL weights only the clipped term by that ratio).
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
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_VISION_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip

warn_if_untested("trl", trl.__version__, TESTED_TRL)


def check_grpo_options(trainer) -> None:
    """Raise ``ValueError`` naming the first option of ``trainer`` (a ``GRPOTrainer``) that the fused loss
    does not compute."""
    args = trainer.args
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={trainer.loss_type!r} is not supported by DLERGRPOTrainer "
            f"(supported: {', '.join(SUPPORTED_LOSS_TYPES)}); use trl.GRPOTrainer for it"
        )
    if trainer.importance_sampling_level != "token":
        raise ValueError(
            f"importance_sampling_level={trainer.importance_sampling_level!r} is not supported by DLERGRPOTrainer "
            "(the fused loss has token-level ratios only); use importance_sampling_level='token'"
        )
    unsupported = [
        ("delta", args.delta is not None, "two-sided clipping"),
        ("top_entropy_quantile", trainer.top_entropy_quantile < 1.0, "the high-entropy token mask"),
        ("off_policy_mask_threshold", trainer.off_policy_mask_threshold is not None, "the off-policy sequence mask"),
        ("entropy_coef / use_adaptive_entropy", getattr(trainer, "_entropy_bonus_enabled", False),
         "TRL's entropy bonus (a token mean independent of loss_type)"),
        ("router_aux_loss_coef / output_router_logits", trainer.aux_loss_enabled, "the MoE load-balancing loss"),
    ]  # fmt: skip
    for name, active, what in unsupported:
        if active:
            raise ValueError(f"{name}: {what} is not supported by DLERGRPOTrainer; unset it or use trl.GRPOTrainer")
    if trainer.beta != 0.0 and trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        raise ValueError(
            "beta != 0 together with vllm_importance_sampling_correction=True is not supported by DLERGRPOTrainer: "
            "TRL weights only the clipped term by the importance-sampling ratio, the fused loss weights each "
            "token's whole loss; set beta=0 or vllm_importance_sampling_correction=False"
        )


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
        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(batch, width)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        token_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            token_weights = inputs["importance_sampling_ratio"].expand(batch, width)
        mode = "train" if self.model.training else "eval"

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # Each loss type's denominator of TRL, as the kernels' global normaliser.
        if self.loss_type == "grpo":
            loss_agg, normalizer = "seq-mean-token-mean", batch * accumulation  # a mean over all B rows
        elif self.loss_type == "bnpo":
            loss_agg, normalizer = "token-mean", mask.sum().clamp(min=1.0).item() * accumulation
        elif self.loss_type == "dr_grpo":
            loss_agg, normalizer = "token-mean", batch * self.max_completion_length * accumulation
        else:  # dapo: num_items_in_batch spans the generation batch; rescaled to one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss_agg = "token-mean"

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
                    hidden, weight, targets, old_lp.float(), flat(advantages).float(), valid, bias=bias,
                    ref_logprobs=None if ref is None else flat(ref).float(),
                    seq_ids=torch.arange(batch, device=valid.device).repeat_interleave(width),
                    eps_low=self.epsilon_low, eps_high=self.epsilon_high, clip_c=None, beta=self.beta, kl_type=kl_type,
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

    def _log_policy_metrics(self, mode, out, old, ref, mask, advantages):
        """TRL's metrics of ``_compute_loss`` (same names, same reductions), from the kernel's outputs."""
        shape = mask.shape
        maskf = mask.float()
        logp = out.logprobs.view(shape)
        coef_1 = torch.exp(logp - old.view(shape).float())

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * maskf).sum(), maskf.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return (x * maskf).sum(-1) / maskf.sum(-1)

        if self.beta != 0.0:
            diff = ref.float() - logp
            kl = torch.exp(diff) - diff - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            self._metrics[mode]["kl"].append(global_masked_mean(kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(out.entropy.view(shape)))
        low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
        region = ((low + high) > 0).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(region))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
