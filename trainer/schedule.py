"""What happens after a step besides its record: whether the run stops (a stop request or divergence,
voted by every rank alike) and whether the held-out evaluation is due.

**Stopping.** Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the current step: it writes a
checkpoint and returns at once, without any evaluation still due. A second Ctrl-C interrupts at once
(the last complete checkpoint is still there).

**Divergence.** A step stops the run, before anything of it is saved, when the loss of any of its
optimizer steps is not finite (the policy's own forward pass overflows: its next samples would be
garbage, or fail), when every optimizer step had a non-finite gradient norm (all were skipped: nothing
can be learned), or when the weights hold a NaN or inf after the update. A non-finite gradient norm
with a finite loss in some of the optimizer steps is a transient (one bad backward pass): that
optimizer step is skipped and counted in ``skipped_steps``.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch

from . import collective
from .config import TrainConfig


class StopRequest:
    """SIGINT / SIGTERM set a flag checked after each step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (with a checkpoint); "
            "press Ctrl-C again to interrupt at once",
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Verdict:
    """The vote after a step, the same on every rank: ``stop`` (a stop was requested on some rank) and
    ``diverged`` (why the update ruined the policy, or None)."""

    stop: bool
    diverged: str | None


class RunControl:
    """Decides, after each step, whether the run goes on and whether the held-out evaluation runs.
    Use it as a context manager around the loop: it listens for stop requests meanwhile."""

    def __init__(self, cfg: TrainConfig, has_eval: bool):
        self.steps, self.eval_every, self.has_eval = cfg.run.steps, cfg.run.eval_every, has_eval
        self._request = StopRequest()

    def __enter__(self) -> RunControl:
        self._request.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._request.__exit__(*exc)

    def vote(self, update: dict[str, float], policy: torch.nn.Module) -> Verdict:
        """Every rank's view of this step, agreed (collective)."""
        diverged = divergence(update, policy)
        return Verdict(stop=collective.any_rank(self._request.requested), diverged=diverged)

    def eval_due(self, step: int, verdict: Verdict) -> bool:
        """The periodic evaluation, not at the last step (the final one follows) and not when the run
        stops: a stop request skips it (it would delay the stop by minutes), a divergence makes it moot."""
        due = self.eval_every and step % self.eval_every == 0 and step < self.steps
        return bool(self.has_eval and due and not verdict.stop and verdict.diverged is None)


def divergence(update: dict[str, float], policy: torch.nn.Module) -> str | None:
    """Why this step's update ruined the policy (the rule in the module docstring), or None (collective)."""
    steps = int(update.get("optimizer_steps", 0))
    if steps and not math.isfinite(update.get("loss", 0.0)):
        return "the loss is not finite: the policy's own forward pass overflows"
    if steps and int(update.get("skipped_steps", 0)) >= steps:
        return "every optimizer step had a non-finite gradient norm"
    # one flag per tensor on the device, one wait for all of them (not one per parameter)
    finite = bool(torch.stack([torch.isfinite(_local(p)).all() for p in policy.parameters()]).all())
    if collective.any_rank(not finite):
        return "the weights hold NaN or inf values after the update"
    return None


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP2)."""
    return param.to_local() if hasattr(param, "to_local") else param
