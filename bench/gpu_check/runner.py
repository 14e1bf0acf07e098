"""The stage runner of ``python -m bench.gpu_check``: each stage in a fresh process, killed at its time budget.

A stage runs in its own process so that one that hangs can be killed (with everything it started: the
process group), and one that breaks the CUDA context (an illegal address, an out-of-memory that leaves
the allocator wedged) cannot take the later stages with it. A stage writes its outcome to a JSON file
as it goes, so a stage killed at its budget still reports the parts it finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The repository root: the stage processes run there (``python -m bench.gpu_check`` finds the package from it).
ROOT = Path(__file__).resolve().parents[2]
STATUSES = ("passed", "failed", "skipped", "not run")
ERROR_TAIL_LINES = 25
TERM_GRACE_S = 5  # between SIGTERM (a stage kills the commands it started) and SIGKILL
# A stage that would get less than this (or than its own budget, if that is smaller) is not started: it
# could not import torch and measure anything before being killed.
MIN_STAGE_S = 10.0
_LIVE_GROUPS: set[int] = set()  # process groups this process started and has not seen end


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    budget_s: float  # on a GPU, full sizes: the budgets of all stages sum to 8 minutes
    smoke_budget_s: float  # --smoke, on whatever device (the CI's CPU is slow and shared)


def stage_budget(own_s: float, planned_s: float, elapsed_s: float, total_s: float,
                 floor_s: float = MIN_STAGE_S) -> float | None:  # fmt: skip
    """The seconds a stage gets under the whole check's deadline: its own budget plus what the stages before it
    left unused, never past the deadline; None (not run: out of time) when that is under ``floor_s`` or under
    the stage's own budget if that is smaller.

    ``planned_s``: the own budgets of the stages run so far, summed; ``elapsed_s``: the wall time since the check
    began; ``total_s``: the deadline, in seconds from the start. A stage that finished early hands its spare
    time to the next, a stage that ran long (the kill's grace) takes it from the later ones."""
    carried = max(0.0, planned_s - elapsed_s)
    budget = min(own_s + carried, total_s - elapsed_s)
    return budget if budget >= min(floor_s, own_s) else None


@dataclass
class CommandResult:
    returncode: int | None  # None: killed at its time limit
    seconds: float
    output: str


def run_command(cmd: list[str], timeout_s: float, env: dict | None = None, cwd=None, log: Path | None = None):
    """``cmd`` in a new process group, output to ``log`` (or captured). At ``timeout_s`` the group gets
    SIGTERM, then SIGKILL after a grace: a stage process that gets SIGTERM kills the groups it started in
    turn (:func:`kill_started_groups_on_sigterm`), so pytest, ``dler train`` or a compiler die with it."""
    start = time.perf_counter()
    sink = open(log, "w") if log is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                start_new_session=True)  # fmt: skip
        _LIVE_GROUPS.add(proc.pid)
        try:
            out, _ = proc.communicate(timeout=max(timeout_s, 0.1))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
            code = None
        finally:
            _LIVE_GROUPS.discard(proc.pid)
    finally:
        if log is not None:
            sink.close()
    output = log.read_text(errors="replace") if log is not None else (out or "")
    return CommandResult(code, time.perf_counter() - start, output)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has already exited
        pass


def kill_started_groups_on_sigterm() -> None:
    """In a stage process: on SIGTERM (its budget is up), SIGKILL every command group it started, then exit.
    Each command runs in a group of its own, which the parent's signal to the stage's group does not reach."""

    def handler(signum, frame):
        for pgid in list(_LIVE_GROUPS):
            _signal_group(pgid, signal.SIGKILL)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_stage(stage: Stage, index: int, total: int, child_args: list[str], out: Path, budget: float, env: dict,
              own_budget: float) -> dict:  # fmt: skip
    """Runs ``python -m bench.gpu_check --stage-child NAME`` in ROOT for ``budget`` seconds (``own_budget``: the
    stage's own, before the time carried over or cut by the deadline); returns the stage's record for the report."""
    result_file = out / "stages" / f"{stage.name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    carried = budget - own_budget
    how = f"{own_budget:.0f} s {'+' if carried >= 0 else '-'} {abs(carried):.0f} s" if abs(carried) >= 0.5 else ""
    print(f"[{index}/{total}] {stage.name}: {stage.title} (budget {budget:.0f} s{' = ' + how if how else ''}) ...",
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "bench.gpu_check", "--stage-child", stage.name, *child_args]
    done = run_command(cmd, budget, env=env, cwd=ROOT, log=log)
    record = json.loads(result_file.read_text()) if result_file.exists() else {}
    record.update(name=stage.name, title=stage.title, budget_s=round(budget, 1), own_budget_s=own_budget,
                  elapsed_s=round(done.seconds, 2), log=str(log.relative_to(out)))  # fmt: skip
    if done.returncode is None:
        record.update(status="failed", reason=f"timed out: killed at its budget of {budget:.0f} s",
                      error=tail(done.output))  # fmt: skip
    elif done.returncode != 0:
        record.update(status="failed", reason=record.get("reason") or f"exited with status {done.returncode}",
                      error=record.get("error") or tail(done.output))  # fmt: skip
    elif record.get("status") not in STATUSES:
        record.update(status="failed", reason="the stage wrote no outcome", error=tail(done.output))
    line = f"    {record['status']}"
    if record.get("reason"):
        line += f": {record['reason']}"
    print(f"{line}  [{done.seconds:.1f} s]", flush=True)
    return record


def not_run(stage: Stage, reason: str, smoke: bool, budget: float = 0.0) -> dict:
    """The record of a stage this run did not start (it still appears in the report, with why); ``budget``:
    the seconds it was left (0 when it was not selected)."""
    own = stage.smoke_budget_s if smoke else stage.budget_s
    return dict(name=stage.name, title=stage.title, status="not run", reason=reason, budget_s=round(budget, 1),
                own_budget_s=own, elapsed_s=0.0)  # fmt: skip
