"""This process's place in the job: torchrun's environment read, its device chosen, and the default
process group joined and left.

One process per device, launched by ``torchrun`` (or ``python -m trainer`` for one process).
:func:`init_distributed` reads torchrun's environment and joins the default process group;
:func:`ensure_process_group` gives one process the in-memory group FSDP2 needs to shard over (``fsdp``);
:func:`destroy_distributed` leaves whichever of them this module created. Whether a group is up is
``collective``'s question.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import collective
from ..config import DEVICES
from ..fsutil import UserError


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


def destroy_distributed() -> None:
    """Leave the default process group if this module created it; a no-op otherwise (safe in ``finally``)."""
    if _OWNED_GROUP[0] and collective.is_distributed():
        dist.destroy_process_group()
    _OWNED_GROUP[0] = False


def ensure_process_group(env: DistEnv) -> None:
    """A process group for ``env``, as FSDP2 needs one to shard over: one process gets an in-memory one
    (a HashStore needs no address or port, no rendezvous), which :func:`destroy_distributed` removes like
    any other; several must have joined theirs with :func:`init_distributed`."""
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
