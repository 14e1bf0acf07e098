"""The distributed helpers: whether a process group is up, this rank's place, and the few collectives
the trainer needs outside FSDP's own (gather, vote, reduce, broadcast, rank 0 does and tells).

Without a process group each function is its single-process meaning (rank 0 of 1, a gather of one,
broadcast is the identity), so the same code serves one process and many. This is the one place that
asks ``torch.distributed`` whether a group is up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..fsutil import UserError
from ..storage_errors import storage_error

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group is up (created by ``torchrun``'s job, FSDP or an engine)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (pickled; a list of one without a group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank: a vote every rank reaches alike."""
    return any(gather(bool(flag)))


def reduce_values(xs: Sequence[float], device: torch.device, op: dist.ReduceOp | None = None) -> list[float]:
    """``xs`` reduced element-wise over the ranks with ``op`` (default: sum) in one collective, in float64
    on ``device`` (the process group's backend for that device carries it); ``xs`` itself without a group
    of several ranks. Every rank passes as many values, in the same order."""
    if world_size() == 1:
        return [float(x) for x in xs]
    t = torch.tensor(list(xs), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.tolist()


def reduce_scalar(x: float, device: torch.device, op: dist.ReduceOp | None = None) -> float:
    """``x`` reduced over the ranks with ``op`` (default: sum); see :func:`reduce_values`."""
    return reduce_values([x], device, op)[0]


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(os_error: str, fn: Callable[..., T], *args: Any, path: Path | None = None) -> T | None:
    """Run ``fn(*args)`` on rank 0 only (None elsewhere), and raise its failure on every rank.

    Without this, a rank-0 failure (full disk, corrupt file, a refused folder, a bug) would leave the other
    ranks blocked in the next collective forever. A storage failure (OSError, or torch's and safetensors'
    write and read errors) becomes a one-line UserError prefixed with ``os_error``
    (``storage_errors.storage_error``; ``path``: the folder being written or read, for errors that name no file).
    """
    result, failure = None, None
    if rank() == 0:
        try:
            result = fn(*args)
        except Exception as e:
            failure = storage_error(e, os_error, path) or e
            if failure is not e:
                failure.__cause__ = e
    outcome = broadcast(None if failure is None else (isinstance(failure, UserError), str(failure)))
    if failure is not None:
        raise failure
    if outcome is not None:
        user, message = outcome
        raise (UserError if user else RuntimeError)(f"rank 0: {message}")
    return result
