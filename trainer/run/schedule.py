"""What happens after a step besides its record: whether the run stops (a stop request or divergence,
voted by every rank alike) and whether the held-out evaluation is due.

**Stopping.** Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the current step: it writes a
checkpoint and returns at once, without any evaluation still due. A second Ctrl-C interrupts at once
(the last complete checkpoint is still there).

**Divergence.** A step stops the run, before anything of it is saved, when the loss of any of its
optimizer steps is not finite (the policy's own forward pass overflows: its next samples would be
garbage, or fail), when every optimizer step had a non-finite gradient norm (all were skipped: nothing
can be learned), when the weights hold a NaN or inf after the update, or when their norm is more than
``WEIGHT_NORM_FACTOR`` away from the norm the run started from: a learning rate far too large makes one
step that leaves every weight finite but huge (``optim.lr=1e9``: a norm about 1e10 times the start's after
step 1), and every step from there diverges whatever the learning rate. A non-finite gradient norm
with a finite loss in some of the optimizer steps is a transient (one bad backward pass): that
optimizer step is skipped and counted in ``skipped_steps``.

**A good checkpoint** (:func:`checkpoint_trouble`), the one a diverged run's error offers to continue from,
is one whose figures were checked: the step that made it had a finite loss and gradient norm, and its weights'
norm is within ``WEIGHT_NORM_FACTOR`` of the start's. The figures are saved with the checkpoint (its
``health``); a checkpoint without them (saved by an older dler) is not called good.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..dist import collective
from ..signals import CatchStopSignals
from ..update.optim import weight_norm

# How far (as a factor, either way) the weights' norm may move from the start's before a step counts as diverged
# and a checkpoint as not good. Measured on the demo's policy: 0.99995 times after 4 steps at the demo's
# optim.lr=1e-4, 1.11 times after 4 steps at 1e-2 (the tests' rate); one step at optim.lr=1e9: 1.5e10 times.
WEIGHT_NORM_FACTOR = 10.0


class StopRequest(CatchStopSignals):
    """SIGINT / SIGTERM set a flag checked after each step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (with a checkpoint); "
            "press Ctrl-C again to interrupt at once",
            flush=True,
        )


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

    def vote(
        self, update: dict[str, float], policy: torch.nn.Module, start_weight_norm: float | None = None
    ) -> Verdict:
        """Every rank's view of this step, agreed (collective). ``start_weight_norm``: the norm of the weights
        the run started from (None: unknown, not checked)."""
        diverged = divergence(update, policy, start_weight_norm)
        return Verdict(stop=collective.any_rank(self._request.requested), diverged=diverged)

    def eval_due(self, step: int, verdict: Verdict) -> bool:
        """The periodic evaluation, not at the last step (the final one follows) and not when the run
        stops: a stop request skips it (it would delay the stop by minutes), a divergence makes it moot."""
        due = self.eval_every and step % self.eval_every == 0 and step < self.steps
        return bool(self.has_eval and due and not verdict.stop and verdict.diverged is None)


def divergence(update: dict[str, float], policy: torch.nn.Module, start_weight_norm: float | None = None) -> str | None:
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
    if start_weight_norm:
        norm = weight_norm(policy)  # of the full weights: the same on every rank
        if not _norm_in_range(norm, start_weight_norm):
            return (
                f"the weights' norm is {norm:.3g} after the update, {norm / start_weight_norm:.3g} times the "
                f"{start_weight_norm:.3g} the run started from"
            )
    return None


def _norm_in_range(norm: float, start: float) -> bool:
    ratio = norm / start
    return math.isfinite(ratio) and 1 / WEIGHT_NORM_FACTOR <= ratio <= WEIGHT_NORM_FACTOR


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP2)."""
    return param.to_local() if hasattr(param, "to_local") else param


def checkpoint_trouble(health: dict[str, Any] | None) -> str | None:
    """Why the state a checkpoint holds is not known to be good (the rule in the module docstring), said of its
    step ("its step's loss was nan"), or None when it passes. ``health``: the figures saved with it: the loss and
    gradient norm of the step that made it, its weights' norm and the norm the run started from."""
    if not isinstance(health, dict) or not health:
        return "it carries no health figures (saved by an older dler)"
    loss, grad_norm = health.get("loss"), health.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"its step's loss was {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"its step's gradient norm was {grad_norm}"
    norm, start = health.get("weight_norm"), health.get("start_weight_norm")
    if start is None or not start > 0:
        return "the norm its weights started from is unknown (a run resumed from a checkpoint of an older dler)"
    if norm is None:
        return "its weights' norm was not recorded"
    if not _norm_in_range(norm, start):
        return f"its weights' norm is {norm:.3g}, {norm / start:.3g} times the {start:.3g} the run started from"
    return None
