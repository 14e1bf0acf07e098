"""Asynchronous rollouts with bounded staleness (``rollout.async_staleness`` = k >= 1): the engine samples
the batches of the next steps while the trainer updates on this one.

**The schedule is fixed, so a run is reproducible.** The batch of step b is sampled whole, every round of
dynamic sampling included, with the weights of step

    v(b) = max(s0, b - 1 - k)        (s0: the step the run started or resumed from)

and trained at step b, whose update starts from the weights of step b - 1: its samples are
``(b - 1) - v(b) = min(k, b - 1 - s0)`` versions old, never more than k. The engine runs up to k batches
ahead of the trainer and waits for the weights it needs, never for a timer, so which weights sample which
prompts does not depend on how fast either side is: the same config and seed give the same run (k = 0 is
the synchronous loop, in :mod:`trainer.train`, unchanged).

**Dynamic sampling stays exact.** :class:`~trainer.rollout.sampling.DynamicSampler` fills each batch
exactly as the synchronous loop does (``prompts_per_step`` groups with spread, GFPO's retained responses),
refilling from the stream, in the producer thread; scoring, the length penalty and DA-DLER's record run
there too, in batch order.

**Dropped samples.** A batch older than k versions is never trained on. Under the schedule none is; the
case arises when a run saved with a larger k resumes with a smaller one (or with k = 0): its saved batches
that are too old are dropped, counted (``stale_dropped_groups`` of the first step after the resume) and
sampled again, from the stream's current position, with the resumed weights.

**Checkpoints hold the work in flight.** A checkpoint of step s waits for the batches s+1 .. s+k (the
producer can make no later one before step s's weights exist) and saves them with the stream and DA-DLER
state as they were after batch s+k (:meth:`AsyncRollout.checkpoint_state`); a resume puts them back in
the queue (``pending``) and the producer continues at s+k+1 with the checkpoint's weights, so a resumed
run equals an uninterrupted one.

The engine is :class:`~trainer.rollout.engine_process.EngineProcess`, whose every call is bounded; the
trainer's waits here check that the producer lives and fail with its error, never hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import Example
from .contract import RolloutEngine, Sample
from .sampling import DynamicSampler, SamplingStats, ScoredGroup

Snapshot = list  # [(name, CPU tensor)]: one version of the policy's weights, copied out of the trainer


@dataclass
class StepBatch:
    """One step's scored groups as the producer made them, with the weights version that sampled them."""

    step: int
    version: int
    groups: list[ScoredGroup]
    stats: SamplingStats
    warnings: list[str] = field(default_factory=list)
    state_after: dict[str, Any] = field(default_factory=dict)  # stream and DA-DLER state after this batch

    @property
    def staleness(self) -> int:
        """Versions between the weights that sampled the batch and those its update starts from."""
        return self.step - 1 - self.version


class AsyncRollout:
    """The producer thread and its queue (see the module's docstring).

    ``seed_of(b)`` is the sampling seed of batch b (the synchronous loop's); ``stream_state()`` and
    ``budgets_state()`` read the sampler's stream and DA-DLER record after each batch, for checkpoints.
    ``pending`` are the batches a checkpoint saved; those of a wrong step or older than ``staleness``
    (with all after them) are dropped and sampled again."""

    def __init__(
        self,
        sampler: DynamicSampler,
        engine: RolloutEngine,
        *,
        staleness: int,
        start_step: int,
        last_step: int,
        seed_of: Callable[[int], int],
        state_of: Callable[[], dict[str, Any]],
        timeout_s: float,
        pending: Iterable[StepBatch] = (),
    ):
        if staleness < 1:
            raise ValueError(f"staleness must be >= 1 (0 is the synchronous loop), got {staleness}")
        self.sampler, self.engine, self.k = sampler, engine, staleness
        self.start_step, self.last, self.seed_of, self.state_of = start_step, last_step, seed_of, state_of
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()  # one user of the engine at a time: the producer, or an evaluation
        self._weights: dict[int, Snapshot] = {}
        self._published = start_step  # the newest weights the trainer has given (the engine starts with them)
        self._engine_version = start_step
        self._ready: dict[int, StepBatch] = {}
        self._states: dict[int, dict[str, Any]] = {}
        self._next = start_step + 1
        self.dropped_groups = 0  # reported once, by the first step taken
        for batch in sorted(pending, key=lambda b: b.step):
            if batch.step != self._next or batch.staleness > self.k or batch.step > last_step:
                self.dropped_groups += len(batch.groups)
                continue  # and every later one: the producer makes batches in order
            self._ready[batch.step], self._states[batch.step] = batch, batch.state_after
            self._next += 1
        self._busy: list[list[float]] = []  # [start, end] of each generate call; end is inf while it runs
        self._waiting_for: int | None = None  # the weights version the producer waits for, if it does
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._produce, name="dler-rollout", daemon=True)

    def version_for(self, step: int) -> int:
        """v(b), the weights version that samples the batch of ``step``."""
        return max(self.start_step, step - 1 - self.k)

    def start(self) -> None:
        self._thread.start()

    # -- the trainer's side --------------------------------------------------------------------

    def take(self, step: int) -> tuple[StepBatch, float]:
        """The batch of ``step`` and the seconds waited for it."""
        t0 = time.perf_counter()
        with self._cond:
            self._wait(lambda: step in self._ready, f"the rollouts of step {step}")
            batch = self._ready.pop(step)
        if batch.staleness > self.k:
            raise AssertionError(f"step {step}: a batch {batch.staleness} versions old passed the bound {self.k}")
        return batch, time.perf_counter() - t0

    def publish(self, version: int, snapshot: Snapshot) -> None:
        """The weights after step ``version``, for the batches that wait for them (and evaluations)."""
        with self._cond:
            self._weights[version] = snapshot
            self._published = version
            self._cond.notify_all()

    @contextlib.contextmanager
    def engine_at(self, version: int) -> Iterator[RolloutEngine]:
        """The engine, between two of the producer's batches, holding the published weights ``version``
        (an evaluation's): the producer loads its own again before its next batch."""
        with self._engine_lock:
            self._load(version)
            yield self.engine

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` saves: the batches made for later steps (all of s+1 .. s+k, waited
        for) and the stream's and DA-DLER's state after the last of them."""
        through = min(step + self.k, self.last)
        with self._cond:
            self._wait(lambda: self._next > through, f"the rollouts of steps {step + 1}-{through}")
            pending = [encode_batch(self._ready[b]) for b in sorted(self._ready) if step < b <= through]
            return {"pending": pending, "state": self._states[through]}

    def overlap_seconds(self, start: float, end: float) -> float:
        """Seconds of [start, end] during which the engine was generating."""
        now = time.perf_counter()
        with self._cond:
            spans = [(a, min(b, now)) for a, b in self._busy]
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the producer: it ends before its next batch. One still sampling after ``wait_s`` is left to end
        when the engine is closed (its call then fails; the thread is a daemon and its error is not raised)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=wait_s)

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Wait (holding the condition) until ``done``; the producer's error, a producer that has ended, or one
        that waits for weights the trainer has not published, ends the wait instead of hanging it. The bound:
        the engine's timeout for each round a batch may take, and one more."""
        limit = self.timeout_s * (self.sampler.config.max_rounds + 1)
        deadline = time.monotonic() + limit
        while not done():
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise RuntimeError(f"the rollout thread ended before {what} were made")
            if self._waiting_for is not None and self._waiting_for <= self._published:
                pass  # it was notified and is about to go on
            elif self._waiting_for is not None:
                raise RuntimeError(
                    f"waiting for {what}, but the rollout thread waits for the weights of step "
                    f"{self._waiting_for}, which are not published yet (published: step {self._published})"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} were not made within {limit:.0f} s")
            self._cond.wait(1.0)

    # -- the producer's side -------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            while True:
                with self._cond:
                    step = self._next
                    need = self.version_for(step)
                    while not self._closing and step <= self.last and self._published < need:
                        self._waiting_for = need
                        self._cond.wait(1.0)
                    self._waiting_for = None
                    if self._closing or step > self.last:
                        return
                batch = self._make(step, need)
                with self._cond:
                    self._ready[step], self._states[step] = batch, batch.state_after
                    self._next = step + 1
                    for old in [v for v in self._weights if v < need]:
                        del self._weights[old]  # no later batch samples with weights older than its own
                    for old in [s for s in self._states if s < step - self.k - 1]:
                        del self._states[old]
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 (the trainer raises it at its next wait)
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _make(self, step: int, version: int) -> StepBatch:
        with self._engine_lock:
            self._load(version)
            span = [time.perf_counter(), float("inf")]
            with self._cond:
                self._busy = [s for s in self._busy if s[1] > span[0] - 600.0] + [span]  # the last 10 minutes
            messages: list[str] = []
            self.sampler.report_short = messages.append  # this thread's own, printed by the step that trains it
            try:
                groups, stats = self.sampler.collect(step, seed=self.seed_of(step))
            finally:
                span[1] = time.perf_counter()
        return StepBatch(step, version, groups, stats, messages, self.state_of())

    def _load(self, version: int) -> None:
        """The engine holding weights ``version`` (called with the engine lock held)."""
        if self._engine_version == version:
            return
        with self._cond:
            snapshot = self._weights.get(version)
        if snapshot is None:
            raise RuntimeError(f"the weights of step {version} are needed by the engine but were not kept")
        self.engine.update_weights(snapshot)
        self._engine_version = version


# ------------------------------------------------------------------------------------------ checkpoints


def encode_batch(batch: StepBatch) -> dict[str, Any]:
    """A batch as plain JSON data (the checkpoint's state.json); :func:`decode_batch` gives it back equal."""
    stats = dataclasses.asdict(batch.stats)
    stats["budgets"] = {str(k): v for k, v in batch.stats.budgets.items()}
    return {
        "step": batch.step,
        "version": batch.version,
        "groups": [_encode_group(g) for g in batch.groups],
        "stats": stats,
        "warnings": list(batch.warnings),
        "state_after": batch.state_after,
    }


def decode_batch(data: dict[str, Any]) -> StepBatch:
    stats = dict(data["stats"])
    stats["budgets"] = {int(k): v for k, v in stats["budgets"].items()}
    return StepBatch(
        int(data["step"]),
        int(data["version"]),
        [_decode_group(g) for g in data["groups"]],
        SamplingStats(**stats),
        list(data["warnings"]),
        data["state_after"],
    )


def _encode_group(g: ScoredGroup) -> dict[str, Any]:
    return {
        "example": dataclasses.asdict(g.example),
        "prompt_ids": [int(t) for t in g.prompt_ids],
        "samples": [[list(s.token_ids), s.text, s.finish_reason, list(s.logprobs)] for s in g.samples],
        "correct": g.correct.tolist(),
        "rewards": g.rewards.tolist(),
        "lengths": g.lengths.tolist(),
        "truncated": g.truncated.tolist(),
        "budget": int(g.budget),
        "retained": None if g.retained is None else g.retained.tolist(),
    }


def _decode_group(d: dict[str, Any]) -> ScoredGroup:
    return ScoredGroup(
        Example(**d["example"]),
        list(d["prompt_ids"]),
        [Sample(list(ids), text, reason, list(lp)) for ids, text, reason, lp in d["samples"]],
        np.asarray(d["correct"], dtype=np.float64),
        np.asarray(d["rewards"], dtype=np.float64),
        np.asarray(d["lengths"], dtype=np.int64),
        np.asarray(d["truncated"], dtype=bool),
        int(d["budget"]),
        None if d["retained"] is None else np.asarray(d["retained"], dtype=np.int64),
    )
