"""Processes, devices and the FSDP2-sharded policy (and reference) model.

One process per device, launched by ``torchrun`` (or ``python -m trainer`` for one process).
:func:`init_distributed` reads torchrun's environment and joins the default process group;
:func:`load_policy` loads a Hugging Face causal LM and, when FSDP is active, shards every decoder
layer and then the root with ``fully_shard`` (FSDP2: parameters become DTensors sharded on dim 0).

**Why gradients are summed.** :func:`trainer.policy.accumulate_gradients` already divides the loss
by the *global* normaliser (tokens or sequences of the whole mini-batch, over all ranks), so the
exact gradient of the big batch is the *sum* of the ranks' gradients. FSDP2 averages by default
(divides by the world size), which would shrink every update by that factor; here its divide
factor is set to 1 and its collectives to plain sums.

**One process with FSDP** (``fsdp.enabled: true`` without torchrun) needs a process group too:
:func:`load_policy` creates a one-process group in memory for it (no port, no rendezvous), which
:func:`destroy_distributed` removes like any other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import collective
from .chunking import chunks_by_size, nbytes
from .config import DEVICES, FSDPConfig, ModelConfig
from .devices import can_pin_host_memory
from .fsutil import UserError
from .weights import check_safetensors_folder

logger = logging.getLogger("trainer.fsdp")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: its global rank, the number of processes, its rank on this
    node (which CUDA device it owns), and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes files and talks to the user."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}; got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "device 'cuda' was asked for but this torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use run.device=cpu or auto"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); "
            "start at most one process per device (torchrun --nproc-per-node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (all absent: one process) and pick
    the device: ``auto`` is CUDA when available, else the CPU; each process owns the CUDA device of
    its local rank. With more than one process, join the default process group (NCCL on CUDA, gloo
    on the CPU) unless one is already initialised; with one process, create none.
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    torch_device = _pick_device(device, local_rank)
    if collective.is_distributed() and (collective.rank(), collective.world_size()) != (rank, world_size):
        raise RuntimeError(
            f"the process group is rank {collective.rank()} of {collective.world_size()}, "
            f"the environment says RANK={rank} of WORLD_SIZE={world_size}"
        )
    if world_size > 1 and not collective.is_distributed():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UserError(
                f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: launch the trainer with torchrun"
            )
        dist.init_process_group(
            process_group_backend(torch_device),
            rank=rank,
            world_size=world_size,
            device_id=torch_device if torch_device.type != "cpu" else None,
        )
        _OWNED_GROUP[0] = True
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


# Whether this module created the default process group. An in-process vLLM engine creates one of its
# own (world size 1) and destroys it at exit: destroying it first would make that exit fail.
_OWNED_GROUP = [False]


def process_group_backend(device: torch.device) -> str:
    """The process group's backends for a job computing on ``device``: gloo on the CPU; on a GPU NCCL for
    its tensors *and* gloo for CPU tensors, which reach collectives too (FSDP2 ``cpu_offload`` shards:
    the gradient norm, the weight gather for the engine and the checkpoint's state dicts; and
    ``all_gather_object``'s pickles)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "gloo"
    accelerator = {"cuda": "nccl", "xpu": "xccl"}.get(device.type)
    if accelerator is None:
        raise UserError(f"no process group backend known for device type {device.type!r} (cpu, cuda, xpu are)")
    return f"cpu:gloo,{device.type}:{accelerator}"


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


def destroy_distributed() -> None:
    """Leave the default process group if this module created it; a no-op otherwise (safe in ``finally``)."""
    if _OWNED_GROUP[0] and collective.is_distributed():
        dist.destroy_process_group()
    _OWNED_GROUP[0] = False


def _ensure_process_group(env: DistEnv) -> None:
    """FSDP2 shards over a process group; one process gets an in-memory one (a HashStore needs no
    address or port), several must have joined theirs with :func:`init_distributed`."""
    if collective.is_distributed():
        if collective.world_size() != env.world_size:
            raise RuntimeError(
                f"the process group has {collective.world_size()} ranks but env.world_size is {env.world_size}"
            )
        return
    if env.world_size > 1:
        raise RuntimeError("no process group: call init_distributed() before load_policy() with several processes")
    dist.init_process_group(process_group_backend(env.device), store=dist.HashStore(), rank=0, world_size=1)
    _OWNED_GROUP[0] = True


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def check_weights(model_dir: Path) -> None:
    """Fail with one line naming the folder before transformers tries (and fails obscurely, silently
    builds random weights, or unpickles) to load a folder without usable weights: no config.json, no
    safetensors (pickled weights are refused, with how to convert them), a truncated or damaged file
    (``trainer.weights``: only the headers are read)."""
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
            use_safetensors=True,  # never a pickle next to them (trainer.weights)
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

    _ensure_process_group(env)
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
