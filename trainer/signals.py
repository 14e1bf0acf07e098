"""Catching SIGINT and SIGTERM for a while: the one mechanism behind a run's stop request
(``run.schedule.StopRequest``) and a study's (``commands.study.StopSignals``), which differ only in what a
signal does (``_handle``)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class CatchStopSignals:
    """While active (a context manager), SIGINT and SIGTERM call ``self._handle(signum, frame)`` instead of their
    previous handlers, which are put back on exit. Only the main thread may install handlers; elsewhere it does
    nothing."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
