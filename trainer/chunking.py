"""Grouping items in order under a size limit: micro-batches by tokens, weight buckets and
checkpoint shards by bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def chunks_by_size(items: Iterable[T], size: Callable[[T], int], limit: int) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` whose sizes add up to at most ``limit`` (an item bigger than
    ``limit`` gets a run of its own). Lazy, so a stream is never held whole; in order, so the
    grouping is deterministic."""
    run: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if run and used + n > limit:
            yield run
            run, used = [], 0
        run.append(item)
        used += n
    if run:
        yield run


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()
