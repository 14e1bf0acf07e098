"""Median time of a CUDA call with enough timed calls: ``triton.testing.do_bench`` with a repetition time
stretched so that even a slow call is timed at least ``MIN_TIMED_CALLS`` times.

do_bench times ``max(1, int(rep / estimate))`` calls, ``estimate`` being one call's time: with its usual
``rep`` of 100-200 ms a call of 100 ms or more is timed once or twice, and the "median" is one noisy sample.
"""

from __future__ import annotations

import time

import torch

MIN_TIMED_CALLS = 5
# do_bench's estimate flushes the L2 cache before each call and truncates rep / estimate: a margin over it.
ESTIMATE_MARGIN = 1.5


def repetition_ms(once_ms: float, rep_ms: float) -> float:
    """The ``rep`` to give do_bench: ``rep_ms``, or enough for MIN_TIMED_CALLS calls of ``once_ms``."""
    return max(rep_ms, ESTIMATE_MARGIN * MIN_TIMED_CALLS * once_ms)


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device over at least MIN_TIMED_CALLS timed calls.
    The first call (compilation, autotuning, allocator growth) and the estimate's call are not timed."""
    import triton.testing

    for timed in (False, True):
        for x in grad_to_none or ():
            x.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - start) * 1e3 if timed else None
    rep = repetition_ms(once_ms, rep_ms)
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, grad_to_none=grad_to_none, return_mode="median")
