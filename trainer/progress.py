"""Progress of a long phase: a live tqdm bar on a terminal, one summary line when the phase ends elsewhere.

A bar redraws itself with carriage returns; in a file or a pipe (a CI log, ``make demo > log``) every
redraw is kept, thousands per phase. Off a terminal the phase therefore prints one line when it closes,
with the last values the bar showed: ``warm start (SFT): 1000 batches in 31.2 s, loss 0.120``.
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
    **bar_options: Any,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PhaseSummary`; silent
    when not ``enabled`` (``--no-progress``). Both iterate ``iterable`` and take ``update``,
    ``set_postfix``, ``set_postfix_str`` and ``close``. ``bar_options`` go to tqdm only."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=stream, **bar_options)
    return PhaseSummary(iterable, desc=desc, unit=unit, initial=initial, stream=stream)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PhaseSummary:
    """The bar's stand-in off a terminal: counts and times the phase, prints one line at :meth:`close`."""

    def __init__(self, iterable: Iterable | None, *, desc: str, unit: str, initial: int, stream: IO[str]):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        self.initial = self.n = initial
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()  # a for loop over a tqdm bar ends it too

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def set_postfix_str(self, text: str) -> None:
        """A free-text status (what the phase is on now): it says nothing about the finished phase."""

    def line(self) -> str:
        done = self.n - self.initial
        plural = "es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s"
        unit = self.unit if done == 1 else self.unit + plural
        text = f"{self.desc}: {done} {unit} in {time.perf_counter() - self.started:.1f} s"
        return text + "".join(f", {key} {value}" for key, value in self.postfix.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        print(self.line(), file=self.stream, flush=True)


def library_bars(*, enabled: bool = True, stream: IO[str] | None = None) -> None:
    """Turn off the bars transformers and huggingface_hub draw themselves (a model's "Loading weights")
    unless ``enabled`` and ``stream`` (default stderr) is a terminal: they have no summary line to give.
    Never turns them on (``HF_HUB_DISABLE_PROGRESS_BARS=1`` keeps them off)."""
    if not (enabled and _is_terminal(sys.stderr if stream is None else stream)):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
