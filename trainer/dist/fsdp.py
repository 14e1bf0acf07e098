"""The policy (and reference) model over the ranks: loaded from its folder, sharded with FSDP2 or
replicated, and the two things that depend on that layout (summing a replicated model's gradients,
gathering a sharded model's full weights).

:func:`load_policy` loads a Hugging Face causal LM and, when FSDP is active, shards every decoder
layer and then the root with ``fully_shard`` (FSDP2: parameters become DTensors sharded on dim 0),
over the process group of ``distributed_env``.

**Why gradients are summed.** :func:`trainer.update.policy.accumulate_gradients` already divides the loss
by the *global* normaliser (tokens or sequences of the whole mini-batch, over all ranks), so the
exact gradient of the big batch is the *sum* of the ranks' gradients. FSDP2 averages by default
(divides by the world size), which would shrink every update by that factor; here its divide
factor is set to 1 and its collectives to plain sums.

**One process with FSDP** (``fsdp.enabled: true`` without torchrun) needs a process group too:
:func:`load_policy` has ``distributed_env.ensure_process_group`` create a one-process group in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import collective
from ..chunking import chunks_by_size, nbytes
from ..config import FSDPConfig, ModelConfig
from ..devices import can_pin_host_memory
from .distributed_env import DistEnv, ensure_process_group
from ..fsutil import UserError
from ..model_files.weights import check_safetensors_folder

logger = logging.getLogger("trainer.fsdp")


def sum_replicated_gradients(model: nn.Module) -> None:
    """Data parallelism without FSDP: every rank holds the whole model, so its gradients must be summed
    over the ranks (each rank's loss is already divided by the global normaliser: the sum is the
    gradient of the whole batch) before clipping and the optimizer step, or each rank would train its
    own copy on its share. A no-op for one process, and for FSDP2 modules, which reduce their own
    gradients in the backward."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or collective.world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # One flat all-reduce per bucket instead of one per tensor: fewer, larger messages.
    for bucket in chunks_by_size(grads, nbytes, _GRAD_BUCKET_BYTES):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


_GRAD_BUCKET_BYTES = 64 << 20


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def check_weights(model_dir: Path) -> None:
    """Fail with one line naming the folder before transformers tries (and fails obscurely, silently
    builds random weights, or unpickles) to load a folder without usable weights: no config.json, no
    safetensors (pickled weights are refused, with how to convert them), a truncated or damaged file
    (``trainer.model_files.weights``: only the headers are read)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model folder {model_dir} does not exist or has no config.json")
    check_safetensors_folder(model_dir)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, each its own FSDP unit: ``model.model.layers`` (Llama, Qwen2, Mistral, ...),
    else the largest ModuleList whose children are all of one class (the blocks of other layouts)."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1]
    if not candidates:
        return []
    return list(max(candidates, key=lambda m: sum(p.numel() for p in m.parameters())))


def load_policy(
    model_dir: Path, model_cfg: ModelConfig, fsdp_cfg: FSDPConfig, env: DistEnv, *, trainable: bool = True
) -> nn.Module:
    """The causal LM of ``model_dir`` on ``env.device``, sharded with FSDP2 when
    ``fsdp_cfg.active(env.world_size)``; every rank must call it (sharding is collective).

    Parameters keep ``model_cfg.dtype`` (the masters); under FSDP the forward and backward compute
    in ``fsdp_cfg.param_dtype`` and gradients are reduced in ``fsdp_cfg.reduce_dtype``, summed over
    ranks (see the module docstring). Without FSDP the model computes in ``model_cfg.dtype``.
    Tied input/output embeddings stay one parameter. ``trainable=False`` gives the reference model:
    same sharding, eval mode, no gradients and no activation checkpointing.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    check_weights(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=_dtype(model_cfg.dtype),
            attn_implementation=model_cfg.attn_implementation,
            use_safetensors=True,  # never a pickle next to them (trainer.model_files.weights)
        )
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        raise UserError(
            f"cannot load {model_dir} with attn_implementation={model_cfg.attn_implementation!r}: {e}; "
            "choose another model.attn_implementation (sdpa works everywhere)"
        ) from None
    if trainable:
        model.train()
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
        model.requires_grad_(False)
    if fsdp_cfg.active(env.world_size):
        _shard(model, fsdp_cfg, env)
    else:
        model.to(env.device)
    return model


def _shard(model: nn.Module, cfg: FSDPConfig, env: DistEnv) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    ensure_process_group(env)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # Pinned host memory needs an accelerator; on a CPU run the "offload" keeps the shards where they are.
    offload = CPUOffloadPolicy(pin_memory=can_pin_host_memory(env.device)) if cfg.cpu_offload else OffloadPolicy()
    options = dict(
        mesh=mesh,
        reshard_after_forward=cfg.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype)),
        offload_policy=offload,
    )
    layers = decoder_layers(model)
    if not layers:
        logger.warning("found no decoder layers in %s: sharding it as one unit", type(model).__name__)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # every FSDP unit has its own reduction settings
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling anyway
            module.set_force_sum_reduction_for_comms(True)


def full_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-named full tensors, one at a time (an all-gather each under FSDP2: every rank
    must iterate), for the rollout engine or a checkpoint."""
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        yield name, (t.detach().to(dtype) if dtype is not None else t.detach())
