"""Start and end of a rank that a test helper runs with ``torch.multiprocessing.spawn`` (gloo on the CPU).

Under load (two xdist workers plus these ranks on 2 cores), a rank near its end has died of SIGABRT, "terminate
called without an active exception", with its work done or nearly: once in fsdp_update.py, then in
ckpt_fsdp.py in CI although both ranks had met in a barrier before destroying the group. Rare: 36 runs of
ckpt_fsdp.py, three at a time, did not repeat it. pytorch/pytorch#179291 describes that abort: gloo's threads
outliving the group into the interpreter's teardown. A rank here therefore leaves with ``os._exit`` once its
results are written, and reports the Python stack of every thread if it aborts anyway, so that the next failure
says where.
"""

import faulthandler
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist


def start() -> None:
    """A fatal signal (SIGABRT included) prints every thread's Python stack to stderr."""
    faulthandler.enable(all_threads=True)


def leave(destroy: Callable[[], None] = dist.destroy_process_group) -> NoReturn:
    """Meet the other ranks, destroy the group, flush and exit 0 without the interpreter's teardown."""
    dist.barrier()
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
