"""Progress of a long phase: a live tqdm bar on a terminal, one summary line when the phase ends elsewhere.

A bar redraws itself with carriage returns; in a file or a pipe (a CI log, ``make demo > log``) every
redraw is kept, thousands per phase. Off a terminal the phase therefore prints one line when it closes,
with the last values the bar showed: ``warm start (SFT): 1000 batches in 31.2 s, loss 0.120``. A phase
long enough to leave a log silent for minutes (the demo's warm start) asks for ``heartbeat_s``: off a terminal
it then also prints where it stands at most that often, ``warm start (SFT): 300/1000 batches, 95 s, ETA 221 s,
loss 0.231``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    enabled: bool = True,
    stream: IO[str] | None = None,
    heartbeat_s: float | None = None,
    **bar_options: Any,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PhaseSummary`; silent
    when not ``enabled`` (``--no-progress``). Both iterate ``iterable`` and take ``update``,
    ``set_postfix``, ``set_postfix_str`` and ``close``. ``bar_options`` go to tqdm only; ``heartbeat_s``
    to the summary only (a bar shows its ETA anyway)."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=stream, **bar_options)
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)
    return PhaseSummary(
        iterable, desc=desc, unit=unit, initial=initial, stream=stream, total=total, heartbeat_s=heartbeat_s
    )


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PhaseSummary:
    """The bar's stand-in off a terminal: counts and times the phase, prints one line at :meth:`close`."""

    def __init__(
        self, iterable: Iterable | None, *, desc: str, unit: str, initial: int, stream: IO[str],
        total: int | None = None, heartbeat_s: float | None = None,
    ):  # fmt: skip
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        self.initial = self.n = initial
        self.total, self.heartbeat_s = total, heartbeat_s
        self.postfix: dict[str, Any] = {}
        self.started = self._last_beat = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()  # a for loop over a tqdm bar ends it too

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.heartbeat_s is not None and now - self._last_beat >= self.heartbeat_s and not self.closed:
            self._last_beat = now
            print(self.beat(now), file=self.stream, flush=True)

    def beat(self, now: float) -> str:
        """Where the phase stands: done (of total), seconds so far, the ETA at the rate so far, the postfix."""
        done, elapsed = self.n - self.initial, now - self.started
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "")
        text += f" {_plural(self.unit, 2)}, {elapsed:.0f} s"
        if self.total is not None and done > 0:
            text += f", ETA {elapsed / done * (self.total - self.n):.0f} s"
        return text + "".join(f", {key} {value}" for key, value in self.postfix.items())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def set_postfix_str(self, text: str) -> None:
        """A free-text status (what the phase is on now): it says nothing about the finished phase."""

    def line(self) -> str:
        done = self.n - self.initial
        text = f"{self.desc}: {done} {_plural(self.unit, done)} in {time.perf_counter() - self.started:.1f} s"
        return text + "".join(f", {key} {value}" for key, value in self.postfix.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        print(self.line(), file=self.stream, flush=True)


def _plural(unit: str, count: int) -> str:
    return unit if count == 1 else unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def library_bars(*, enabled: bool = True, stream: IO[str] | None = None) -> None:
    """Turn off the bars transformers and huggingface_hub draw themselves (a model's "Loading weights")
    unless ``enabled`` and ``stream`` (default stderr) is a terminal: they have no summary line to give.
    Never turns them on (``HF_HUB_DISABLE_PROGRESS_BARS=1`` keeps them off)."""
    if not (enabled and _is_terminal(sys.stderr if stream is None else stream)):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
