"""Wall-clock seconds of a step's phases, measured around them, for the step's metrics record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """``with timer.phase("update_s"): ...`` adds the block's seconds under that key; ``seconds`` holds
    them in the order the phases first ran, and :meth:`start` begins a new step (and its ``step_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._step_started = time.perf_counter()

    def start(self) -> None:
        self.seconds = {}
        self._step_started = time.perf_counter()

    @contextmanager
    def phase(self, key: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - started)

    def add(self, key: str, seconds: float) -> None:
        """Seconds measured elsewhere (the sampler times generation and scoring inside its rounds)."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def step_seconds(self) -> float:
        """Seconds since :meth:`start`: the whole step so far."""
        return time.perf_counter() - self._step_started
