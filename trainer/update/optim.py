"""AdamW, its learning-rate schedule, and gradient clipping that is right under FSDP2.

The schedule counts *training steps* (one rollout batch each), not optimizer steps: a training step
may hold several mini-batches (``prompts_per_step / mini_batch_prompts * epochs_per_step`` optimizer
steps), and all of them use that step's learning rate. Call ``scheduler.step()`` once at the end of
every training step, after its last ``optimizer.step()``; training step ``s`` (0-based) then runs at
``lr * lr_factor(s)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dler_kernels.validate import check_number

from ..config import OptimConfig

# Device types whose fused AdamW kernel accepts plain tensors and FSDP2's DTensors alike.
_FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group (weight decay on every parameter, as verl does).
    The fused kernel (one launch for all parameters, DTensor shards included) is used where every
    parameter is a floating-point tensor on a device that has it; otherwise torch's default."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was it loaded with trainable=False?)")
    fused = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The multiplier of ``cfg.lr`` at training step ``step`` (0-based) of ``total_steps``.

    Warmup: step ``s < warmup_steps`` gives ``(s + 1) / warmup_steps``, so the first step already
    trains and step ``warmup_steps - 1`` reaches the full rate. Then ``schedule`` goes from 1 at step
    ``warmup_steps`` to ``min_lr_ratio`` at the last step ``total_steps - 1`` (``constant`` stays at 1)
    and holds there for any step beyond.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    span = total_steps - 1 - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR following :func:`lr_factor`; step it once per training step (see the module docstring)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def apply_config(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimConfig) -> None:
    """Set ``cfg``'s learning rate, weight decay, betas and eps on an optimizer and scheduler restored from a
    checkpoint, which bring back the values they were saved with: a resume with ``optim.lr=...`` (the way on
    from a diverged run) trains at that rate from its next step, on the same schedule. With the config the run
    was saved with, every value is the one restored, so an unchanged resume stays exact."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor(scheduler.last_epoch), weight_decay=cfg.weight_decay)
        group.update(betas=tuple(cfg.betas), eps=cfg.eps)
    # get_last_lr() reports the rate of the step to come, as scheduler.step() would have set it.
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """The L2 norm of all gradients of ``model``, then (``max_norm`` not None) gradients scaled down
    so that it is at most ``max_norm``.

    Under FSDP2 each rank holds DTensor shards of the gradients; the norm is of the full gradients
    (the shards' squared norms are summed over ranks), so every rank clips by the same factor. It is
    a collective then: every rank must call it. A non-finite norm is returned as it is and the
    gradients are left untouched: the caller skips the step (and zeroes the gradients).
    """
    if max_norm is not None:
        check_number("max_norm", max_norm, low=0.0, low_open=True)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor holding each rank's partial sum: reduce it
        norm = norm.full_tensor()
    if max_norm is not None and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def weight_norm(model: nn.Module) -> float:
    """The L2 norm of all the weights of ``model``. Under FSDP2 it is of the full weights (the shards' squared
    norms summed over ranks), as :func:`clip_gradients`' is of the full gradients: a collective then."""
    params = [p.detach() for p in model.parameters()]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm(params, norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor holding each rank's partial sum: reduce it
        norm = norm.full_tensor()
    return float(norm)
