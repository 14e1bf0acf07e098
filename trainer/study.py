"""``dler study``: a seeded comparison of length penalties under the GRPO and DLER recipes on the CPU demo.

Every run is one ``dler train`` of the demo (``toy-cpu`` for DLER, ``toy-cpu-grpo`` for GRPO) with one
penalty's overrides, a seed and a step count, in its own run folder ``OUT/runs/RECIPE-PENALTY-seedS-Nsteps``;
its held-out before/after evaluation is the measurement. Runs go one at a time (the machine has two cores),
seed by seed, so an interrupted study already covers every cell at the first seeds. A run whose
``summary.json`` is whole and finished is not run again; one that stopped part-way is resumed from its
checkpoint (or, before its first checkpoint, started over by ``dler train`` itself). The engine's and the
trainer's output go to ``OUT/logs/NAME.log``; the console gets one line per run. The tables and the plot
are :mod:`trainer.study_report`'s.

The penalties' per-token coefficients are the papers' (set for budgets of thousands of tokens) scaled to the
demo's budget of 80 by ``PAPER_BUDGET / DEMO_BUDGET``, so each penalty weighs length about as its paper does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .fsutil import UserError, atomic_file

OVERRIDES_FILE = "overrides.json"  # the --set overrides every run of the study was made with
SUMMARY_FILE = "summary.json"  # trainer.run_log's, not imported: `dler --help` builds this command's parser
RECIPES = {"grpo": "toy-cpu-grpo", "dler": "toy-cpu"}
"""Recipe name -> the demo preset that runs it."""
DEMO_BUDGET = 80  # toy-cpu's reward.penalty.length_budget
PAPER_BUDGET = 4000  # DLER's budget, the scale the papers' per-token coefficients were set for
TOKEN_SCALE = PAPER_BUDGET / DEMO_BUDGET
# The schedule of the `schedule` cell: the demo's 80 tokens times 0.75 every steps // 4 steps, never under 30, about
# the worked sum without re-checks (the demo's trained runs average 26 tokens). At 30 steps: every 7 steps, so
# 80, 60, 45, 34 and the floor 30 for the last two steps (34 x 0.75 = 25.5).
SCHEDULE_DECAY, SCHEDULE_STAGES, SCHEDULE_FLOOR = 0.75, 4, 30
LASER_MAX_TOKENS = 2 * DEMO_BUDGET  # the laser cell's generation limit, above its target L (see penalty_overrides)
GFPO_SAMPLES = 16  # GFPO's larger group: twice the demo's 8, of which the 8 shortest are trained on


def penalty_overrides(penalty: str, steps: int) -> list[str]:
    """The ``dler train`` overrides of one penalty of the study (on top of the recipe's preset)."""
    table = {
        "truncation": ["reward.penalty.name=truncation"],
        "overlong": ["reward.penalty.name=overlong", f"reward.penalty.overlong_buffer={DEMO_BUDGET // 4}"],
        "cosine": ["reward.penalty.name=cosine"],
        "l1_max": ["reward.penalty.name=l1_max", f"reward.penalty.l1_alpha={0.0003 * TOKEN_SCALE:g}"],
        "kimi": ["reward.penalty.name=kimi"],
        # LASER's target L sits below the generation limit: at the demo's limit of L every correct response is
        # within L and earns the bonus, 1.5 x correctness, which group normalisation turns into the truncation
        # cell's advantages exactly (measured: the two seed-0 GRPO runs had identical losses at every step).
        "laser": ["reward.penalty.name=laser", f"rollout.sampling.max_tokens={LASER_MAX_TOKENS}"],
        "shorter_better": [
            "reward.penalty.name=shorter_better",
            f"reward.penalty.shorter_better_beta={0.001 * TOKEN_SCALE:g}",
        ],
        "alp": ["reward.penalty.name=alp"],
        # GFPO replaces the length penalty: correctness only, the length control is the filter (the paper's setup)
        "gfpo": ["reward.penalty.name=none", f"rollout.sampling.gfpo_sample_size={GFPO_SAMPLES}"],
        "schedule": [
            "reward.penalty.name=truncation",
            "reward.budget_schedule.enabled=true",
            f"reward.budget_schedule.decay={SCHEDULE_DECAY}",
            f"reward.budget_schedule.every={max(1, steps // SCHEDULE_STAGES)}",
            f"reward.budget_schedule.min_budget={SCHEDULE_FLOOR}",
        ],
    }
    if penalty not in table:
        raise UserError(f"unknown penalty {penalty!r}; the study's penalties are {', '.join(PENALTIES)}")
    return table[penalty]


PENALTIES = (
    "truncation", "overlong", "cosine", "l1_max", "kimi", "laser", "shorter_better", "alp", "gfpo", "schedule",
)  # fmt: skip
DEFAULT_STEPS = 30
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """One cell at one seed."""

    recipe: str
    penalty: str
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.penalty}-seed{self.seed}-{self.steps}steps"

    def command(self, out: Path, extra: Sequence[str]) -> list[str]:
        """The ``dler train`` command line of a fresh start (``extra``: the user's overrides, last)."""
        overrides = [f"run.out={out}", f"run.seed={self.seed}", f"run.steps={self.steps}"]
        overrides += penalty_overrides(self.penalty, self.steps) + list(extra)
        return [sys.executable, "-m", "trainer", "train", RECIPES[self.recipe], *overrides, "--no-progress"]


def plan(recipes: Sequence[str], penalties: Sequence[str], seeds: Sequence[int], steps: int) -> list[Run]:
    """Every run of the study, seed by seed (all cells at the first seed first)."""
    for recipe in recipes:
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; the study's recipes are {', '.join(RECIPES)}")
    for penalty in penalties:
        penalty_overrides(penalty, steps)  # names the unknown one
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if not (recipes and penalties and seeds):
        raise UserError("the study needs at least one recipe, one penalty and one seed")
    once = dict.fromkeys  # a name given twice would be averaged twice: each counts once, in its first place
    return [Run(r, p, s, steps) for s in once(seeds) for r in once(recipes) for p in once(penalties)]


def finished_summary(run_dir: Path) -> dict | None:
    """The run's summary if it is whole and the run finished with both evaluations, else None."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    whole = isinstance(summary, dict) and summary.get("finished") is True and not summary.get("stopped")
    return summary if whole and "before" in summary and "after" in summary else None


def run_one(run: Run, out: Path, extra: Sequence[str]) -> float:
    """Run (or resume) ``run`` with its output in OUT/logs/NAME.log; returns its wall time in seconds."""
    from .checkpoint import CheckpointManager

    run_dir, log = out / "runs" / run.name, out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists() and CheckpointManager(run_dir).latest() is not None:
        command = [sys.executable, "-m", "trainer", "train", "--resume", str(run_dir), "--no-progress"]
    else:
        command = run.command(run_dir, extra)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        # Unbuffered: the log shows how far a run is while it runs.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise UserError(f"{run.name}: dler train exited with {code}; its output is in {log}")
    return time.perf_counter() - start


def check_overrides(out: Path, extra: Sequence[str]) -> None:
    """Record the study's ``--set`` overrides in OUT/overrides.json, or refuse ones that differ from those its
    runs were made with: run names do not carry them, so a finished run would be reused under a setting it
    was not trained with."""
    path = out / OVERRIDES_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != list(extra):
            raise UserError(
                f"{out} holds runs made with --set {before or '(none)'}, not {list(extra) or '(none)'}: give the same "
                "--set to continue that study, or another --out for a new one"
            )
        return
    with atomic_file(path) as f:
        json.dump(list(extra), f)


def run_study(
    out: Path,
    runs: Sequence[Run],
    extra: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> dict[str, float]:
    """Run every unfinished run of ``runs`` one at a time; returns the wall seconds of each run (this call's
    and earlier ones', kept in OUT/timings.json)."""
    out.mkdir(parents=True, exist_ok=True)
    check_overrides(out, extra)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.is_file() else {}
    for i, run in enumerate(runs, start=1):
        prefix = f"[{i}/{len(runs)}] {run.recipe} {run.penalty} seed {run.seed}"
        summary = finished_summary(out / "runs" / run.name)
        if summary is None:
            timings[run.name] = run_one(run, out, extra)
            with atomic_file(timings_file) as f:
                json.dump(timings, f, indent=1)
            summary = finished_summary(out / "runs" / run.name)
            if summary is None:
                raise UserError(f"{run.name}: dler train ended without a finished summary; see {out}/logs")
            took = f"{timings[run.name]:.0f} s"
        else:
            took = "done before, skipped"
        b, a = summary["before"], summary["after"]
        say(
            f"{prefix}: accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%}, mean length "
            f"{b['mean_length']:.1f} -> {a['mean_length']:.1f} ({took})"
        )
    return timings
