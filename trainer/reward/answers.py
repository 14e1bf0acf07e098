"""Answer checking for RL rewards, never raising and never hanging: :class:`AnswerChecker` scores responses
against gold answers, with math-verify isolated in worker processes under a per-pair time limit.

A reward function sits inside the training loop, so it must never raise for anything a model writes and
must never hang. Both are real risks: responses are arbitrary text (megabytes of it, braces nested
thousands deep), and sympy, which math-verify uses to decide equivalence, runs for minutes or longer on
short answers such as ``9^{9^{9}}`` (an exact 370-million-digit power) or twenty nested braces (nested sets
whose numeric evaluation grows steeply with depth). math-verify's own guard is ``signal.alarm``, which works only
in the main thread, cannot interrupt a long C call, and does nothing about memory.

So the work is split:

* Extraction (:mod:`trainer.reward.answer_extraction`) runs in the calling process; it is linear-time string
  scanning, safe on any input.
* ``exact_match`` (:mod:`trainer.reward.answer_equality`; built-in tasks with exact answers) also runs in-process:
  it is linear string work plus ``fractions.Fraction`` on short numerals only.
* ``math_equal`` (math-verify) runs in a persistent worker process owned by ``AnswerChecker``. Each pair gets
  its own time budget; a worker that overruns it is killed (terminate, then kill), the pair scores 0 and a
  fresh worker is started when the next pair needs one.

The worker is a fresh interpreter (``sys.executable -c ...``, spawn semantics), never a fork: the trainer holds
threads and CUDA/torch state that a forked child must not inherit. It is launched with ``subprocess`` rather
than a ``multiprocessing`` "spawn"/"forkserver" context because those re-import the parent's ``__main__``
script in the child: an unguarded training script would run again inside the worker, and a guarded one would
still import torch there, turning a sub-second worker start into several seconds. Messages still travel as
``multiprocessing.connection`` objects over a socket pair, which gives pickled framing and ``wait()``.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import math
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from .answer_equality import MAX_ANSWER_CHARS, exact_match, math_equal
from .answer_extraction import extract_answer

__all__ = ["STARTUP_TIMEOUT_S", "AnswerChecker", "check_answer"]

STARTUP_TIMEOUT_S = 60.0
"""How long a worker may take to start (Python + math-verify import). Exceeding it is an environment failure
(overloaded or broken machine) and raises, rather than silently scoring everything 0."""

_STOP_GRACE_S = 1.0  # how long a stopping worker may take to exit by itself before it is killed
_MODES = ("math", "exact")


# ------------------------------------------------------------------------------------------- worker process


def _worker_entry(fd: int) -> None:
    """Entry point of the worker interpreter: serve on the socket inherited as file descriptor ``fd``."""
    _worker_main(Connection(fd))


def _worker_main(conn: Connection) -> None:
    """Worker loop: answer each ``(pred, gold)`` with ``math_equal``; ``None`` or a closed pipe ends it.

    The first message is ``("ready", None)`` once math-verify is imported and warm, or ``("error", text)``
    when it cannot be, so that the parent starts an item's clock only when the worker can work on it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    try:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we enforce our own
        math_equal("1", "1")
    except BaseException as exc:  # report any startup failure, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if item is None:
            return
        try:
            ok = math_equal(*item)
        except Exception:
            ok = False
        try:
            conn.send(ok)
        except OSError:  # the parent stopped listening
            return


class _Worker:
    """One checker process, its pipe, and the pair it is working on (``job``: index, pred, gold)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.job: tuple[int, str, str] | None = None
        self.booting = False
        self.deadline = math.inf

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        """Launch the process without waiting for it: it reports ``ready`` through the pipe."""
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            fd = child_sock.fileno()
            code = f"import sys; sys.path[:] = {sys.path!r}; import trainer.reward.answers as a; a._worker_entry({fd})"
            proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), stdin=subprocess.DEVNULL)
        self.proc, self.conn = proc, Connection(parent_sock.detach())
        self.booting = True
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after a grace period) and close the pipe."""
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        self.job = None
        self.booting = False
        self.deadline = math.inf
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------------------- checker

_LIVE_CHECKERS: weakref.WeakSet[AnswerChecker] = weakref.WeakSet()


class AnswerChecker:
    """Scores responses against gold answers: 1.0 correct, 0.0 otherwise.

    ``mode="math"`` compares with ``math_equal`` in worker processes under a per-pair time limit of
    ``timeout_s`` seconds; ``mode="exact"`` uses ``exact_match`` in-process. ``workers`` processes check pairs
    in parallel (math mode); they start on first use and persist across calls, since starting one costs about
    a second. Use as a context manager or call ``close()``; leftover workers are also stopped at exit.
    """

    def __init__(
        self,
        mode: str = "math",
        *,
        require_think: bool = False,
        fallback_last_number: bool = False,
        timeout_s: float = 2.0,
        workers: int = 1,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}; got {mode!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a finite number of seconds > 0; got {timeout_s!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
        if mode == "math" and importlib.util.find_spec("math_verify") is None:
            raise ImportError("mode='math' needs math-verify: pip install 'dler[math]' (or math-verify)")
        self.mode = mode
        self.require_think = require_think
        self.fallback_last_number = fallback_last_number
        self.timeout_s = float(timeout_s)
        self._workers = [_Worker() for _ in range(workers if mode == "math" else 0)]
        self._lock = threading.Lock()
        _LIVE_CHECKERS.add(self)

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        """One score per response. Never raises for any response text; a non-string response scores 0 and a
        non-string gold (an int from a dataset, say) is compared as ``str(gold)``."""
        if len(responses) != len(golds):
            raise ValueError(
                f"responses and golds must have the same length; got {len(responses)} responses and {len(golds)} golds"
            )
        scores = [0.0] * len(responses)
        jobs = []
        for i, (response, gold) in enumerate(zip(responses, golds)):
            pred = self._extract(response)
            if pred is None:
                continue
            gold = gold if isinstance(gold, str) else str(gold)
            if self.mode == "exact":
                scores[i] = float(exact_match(pred, gold))
            elif pred == gold.strip():  # identical text needs no sympy
                scores[i] = 1.0
            else:
                jobs.append((i, pred, gold))
        if jobs:
            with self._lock:
                for i in self._check_in_workers(jobs):
                    scores[i] = 1.0
        return scores

    def _extract(self, response: object) -> str | None:
        """The answer worth comparing, or None (no answer, or one too long to be a real answer)."""
        if not isinstance(response, str):
            return None
        pred = extract_answer(
            response, require_think=self.require_think, fallback_last_number=self.fallback_last_number
        )
        return None if pred is None or len(pred) > MAX_ANSWER_CHARS else pred

    def _check_in_workers(self, jobs: list[tuple[int, str, str]]) -> set[int]:
        """Indices of the jobs that math-verify accepts, each within its own ``timeout_s``.

        Each worker holds at most one job, so a hung worker holds nothing else and killing it loses only the
        pair that hung it. On an exception (startup failure, KeyboardInterrupt) busy workers are stopped, so
        that no stale answer is waiting in a pipe for the next call.
        """
        correct: set[int] = set()
        pending = deque(jobs)
        try:
            while True:
                for worker in self._workers:
                    if worker.job is None and pending:
                        self._assign(worker, pending.popleft())
                busy = [w for w in self._workers if w.job is not None]
                if not busy:
                    return correct
                wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                readable = wait([w.conn for w in busy], wait_s)
                for worker in busy:
                    if worker.conn in readable:
                        self._receive(worker, correct)
                    elif time.monotonic() >= worker.deadline and not worker.conn.poll():
                        self._expire(worker)
        except BaseException:
            for worker in self._workers:
                if worker.job is not None:
                    worker.stop()
            raise

    def _assign(self, worker: _Worker, job: tuple[int, str, str]) -> None:
        """Give ``job`` to an idle worker; a stopped worker is started and gets the job when it is ready."""
        if worker.running and worker.proc.poll() is not None:  # died while idle (killed from outside, OOM)
            worker.stop()
        worker.job = job
        if worker.running:
            self._send(worker)
        else:
            worker.start()

    def _send(self, worker: _Worker) -> None:
        _, pred, gold = worker.job
        try:
            worker.conn.send((pred, gold))
        except (OSError, ValueError):  # the worker died while idle: the pair scores 0, restart lazily
            worker.stop()
            return
        worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, worker: _Worker, correct: set[int]) -> None:
        """Handle a message: the startup report of a booting worker, or the verdict on its job."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the process died (crash, OOM kill)
            exit_code = worker.proc.poll()
            booting = worker.booting
            worker.stop()
            if booting:
                raise RuntimeError(f"the answer-checker worker died while starting (exit code {exit_code})") from None
            return  # the pair that killed it scores 0
        if worker.booting:
            kind, detail = message
            if kind != "ready":
                worker.stop()
                raise RuntimeError(f"the answer-checker worker could not start: {detail}")
            worker.booting = False
            self._send(worker)
            return
        if message is True:
            correct.add(worker.job[0])
        worker.job = None
        worker.deadline = math.inf

    def _expire(self, worker: _Worker) -> None:
        """The worker overran its deadline: kill it; its pair scores 0 (or, while starting, raise)."""
        booting = worker.booting
        worker.stop()
        if booting:
            raise RuntimeError(f"the answer-checker worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        """Stop the worker processes. Idempotent; the checker starts new ones if it is used again."""
        for worker in getattr(self, "_workers", ()):
            worker.stop()

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down what close() needs
            pass


@atexit.register
def _close_all_checkers() -> None:
    for checker in list(_LIVE_CHECKERS):
        checker.close()


_SHARED_CHECKERS: dict[tuple, AnswerChecker] = {}
_SHARED_LOCK = threading.Lock()


def check_answer(
    response: str,
    gold: str,
    *,
    mode: str = "math",
    require_think: bool = False,
    fallback_last_number: bool = False,
    timeout_s: float = 2.0,
) -> float:
    """Score one response (1.0 / 0.0) with a checker shared by all calls with the same settings, so that its
    worker process is started once."""
    key = (mode, require_think, fallback_last_number, timeout_s)
    with _SHARED_LOCK:
        checker = _SHARED_CHECKERS.get(key)
        if checker is None:
            checker = AnswerChecker(
                mode, require_think=require_think, fallback_last_number=fallback_last_number, timeout_s=timeout_s
            )
            _SHARED_CHECKERS[key] = checker
    return checker.score([response], [gold])[0]
