"""The selection of ``dler merge``: which entries of delta = tuned - base are kept (the top k of |delta|, per
tensor or over the whole model), as a threshold on |delta|; the global one found exactly in two streaming
passes of a radix selection over float32 bit patterns (see ``trainer.commands.merge``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator


def magnitudes(base, tuned):
    """(delta = tuned - base in the compute dtype, |delta| as float32)."""
    import torch

    # float32 weights are subtracted in float64, 16-bit ones in float32 (memory: a few copies of the largest
    # tensor in that dtype); the merged value is rounded once, into the tuned model's dtype.
    wide = torch.float64 if {base.dtype, tuned.dtype} & {torch.float32, torch.float64} else torch.float32
    delta = tuned.to(wide) - base.to(wide)
    return delta, delta.abs().to(torch.float32)


def keep_count(top_k: float, n: int) -> int:
    """m = round(k * n), half up (so that k = 0.5 of 3 entries keeps 2)."""
    return min(n, math.floor(top_k * n + 0.5))


def tensor_threshold(magnitude, m: int) -> float:
    """The m-th largest value of ``magnitude`` (+inf for m = 0: nothing reaches it)."""
    import torch

    if m == 0:
        return math.inf
    flat = magnitude.reshape(-1)
    return float(torch.kthvalue(flat, flat.numel() - m + 1).values)


def global_threshold(pairs: Callable[[str], Iterator[tuple]], m: int, n: int) -> float:
    """The m-th largest |delta| over every pair of (base, tuned) tensors that ``pairs(label)`` yields, in two
    streaming passes of a 16+16-bit radix selection over float32 bit patterns."""
    import torch

    if m == 0:
        return math.inf
    if m == n:
        return 0.0

    def bits_of(base, tuned):
        return magnitudes(base, tuned)[1].reshape(-1).view(torch.int32)

    high = torch.zeros(1 << 16, dtype=torch.int64)
    for base, tuned in pairs("threshold 1/2"):
        high += torch.bincount(bits_of(base, tuned) >> 16, minlength=1 << 16)
    # The bin holding the m-th largest: walk down from the top until m values are covered.
    above = torch.flip(torch.cumsum(torch.flip(high, [0]), 0), [0])  # above[b] = count of values in bins >= b
    b = int(torch.nonzero(above >= m).max())
    m_in_bin = m - (int(above[b + 1]) if b + 1 < (1 << 16) else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for base, tuned in pairs("threshold 2/2"):
        bits = bits_of(base, tuned)
        low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
    low_above = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0])
    lo = int(torch.nonzero(low_above >= m_in_bin).max())
    return float(torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32))
