"""Rank 0 does, every rank agrees: the few collectives the trainer needs outside the update itself.

Without a process group each function is its single-process meaning (rank 0 of 1, broadcast is the
identity), so the same code serves one process and many.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from .fsutil import UserError
from .storage_errors import storage_error

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


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
    (``fsutil.storage_error``; ``path``: the folder being written or read, for errors that name no file).
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
