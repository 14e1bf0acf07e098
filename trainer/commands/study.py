"""``dler study``: a seeded comparison of length penalties under the GRPO and DLER recipes on the CPU demo.

Every run is one ``dler train`` of the demo (``toy-cpu`` for DLER, ``toy-cpu-grpo`` for GRPO) with one
penalty's overrides, a warm start, a seed and a step count, in its own run folder
``OUT/runs/RECIPE-PENALTY[-warmW]-seedS-Nsteps``; its held-out before/after evaluation is the measurement.
Runs go one at a time (the machine has two cores), seed by seed, so an interrupted study already covers every
cell at the first seeds. A run whose ``summary.json`` is whole and finished is not run again; one that stopped
part-way is resumed from its checkpoint (or, before its first checkpoint, started over by ``dler train``
itself). The engine's and the trainer's output go to ``OUT/logs/NAME.log``; the console gets one line per run.
The tables and the plots are :mod:`trainer.commands.study_report`'s.

**Warm starts.** The seed varies the RL run; the warm start it starts from is another source of spread, and the
one a machine varies (another CPU model builds another warm start from the same seed). ``--warm-starts`` names
the SFT seeds of the warm starts the runs start from (``demo-verbose-arith?seed=W``,
:mod:`trainer.models.warm_start`; default 0 alone, the demo's). Each is built once, before the runs that need it,
and cached; warm start 0's runs keep the names they had before the axis existed, so earlier studies continue.

**The folder.** ``--out`` follows the output rule of every dler command (``fsutil.check_output``): a new or
empty folder becomes a study (its ``.dler-run`` marker says ``study``), a study's folder is continued, and any
other non-empty folder is refused untouched, so a user's own ``overrides.json`` is never read as a study's. A
study holds its folder's lock while it runs (``fsutil.FolderLock``): one study per folder at a time.

**Stopping.** Ctrl-C or SIGTERM reaches the study alone (each run is in a session of its own), and the study
passes one SIGINT on to the running ``dler train``, which stops after its current step with a checkpoint; the
study waits for it up to ``STOP_TIMEOUT_S`` (then kills it and says so) and exits with 130, saying how the run
resumes when the study is run again. A second Ctrl-C is passed on too: the run stops at once, keeping its last
checkpoint.

The penalties' per-token coefficients are the papers' (set for budgets of thousands of tokens) scaled to the
demo's budget of 80 by ``PAPER_BUDGET / DEMO_BUDGET``, so each penalty weighs length about as its paper does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import FolderLock, UserError, atomic_file, check_output, mark_owner, owner
from ..signals import CatchStopSignals

OVERRIDES_FILE = "overrides.json"  # the --set overrides every run of the study was made with
SUMMARY_FILE = "summary.json"  # trainer.run.run_log's, not imported: `dler --help` builds this command's parser
RECIPES = {"grpo": "toy-cpu-grpo", "dler": "toy-cpu"}
"""Recipe name -> the demo preset that runs it. ``RECIPE+OBJECTIVE`` (``dler+gspo``) is the recipe with another policy
objective (``algorithm.objective``, its parameters at the objective's defaults): the study's objective axis."""
DEMO_BUDGET = 80  # toy-cpu's reward.penalty.length_budget
PAPER_BUDGET = 4000  # DLER's budget, the scale the papers' per-token coefficients were set for
TOKEN_SCALE = PAPER_BUDGET / DEMO_BUDGET
# The schedule of the `schedule` cell: the demo's 80 tokens times 0.75 every steps // 4 steps, never under 30, about
# the worked sum without re-checks (the demo's trained runs average 26 tokens). At 30 steps: every 7 steps, so
# 80, 60, 45, 34 and the floor 30 for the last two steps (34 x 0.75 = 25.5).
SCHEDULE_DECAY, SCHEDULE_STAGES, SCHEDULE_FLOOR = 0.75, 4, 30
LASER_MAX_TOKENS = 2 * DEMO_BUDGET  # the laser cell's generation limit, above its target L (see penalty_overrides)
GFPO_SAMPLES = 16  # GFPO's larger group: twice the demo's 8, of which the 8 shortest are trained on
# What runs one run: `dler train` in this interpreter; read at each run, so that a stand-in can take its place.
TRAIN_COMMAND = (sys.executable, "-m", "trainer", "train")
# How long a stopped study waits for its run's last step and checkpoint: seconds with the machine to itself (a 30-step
# run, both evaluations included, takes 56-96 s) and up to about a minute beside another job (runs of 4.5-28 min).
STOP_TIMEOUT_S = 120.0
_POLL_S = 0.2  # how often the study looks at its running child and at a stop request


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


DEFAULT_WARM_STARTS = (0,)
DEMO_MODEL = "demo-verbose-arith"  # the demo presets' model.path; DEMO_MODEL?seed=W is warm start W


@dataclass(frozen=True)
class Run:
    """One cell at one warm start and one seed."""

    recipe: str
    penalty: str
    seed: int
    steps: int
    warm_start: int = 0

    @property
    def name(self) -> str:
        warm = f"-warm{self.warm_start}" if self.warm_start else ""  # warm start 0: the names from before the axis
        return f"{self.recipe}-{self.penalty}{warm}-seed{self.seed}-{self.steps}steps"

    @property
    def block(self) -> tuple[int, int]:
        """What a run shares with the other recipes' runs it is paired with: its warm start and seed (the same
        policy before training, the same evaluation questions and sampling seed)."""
        return self.warm_start, self.seed

    def command(self, out: Path, extra: Sequence[str], train: Sequence[str] | None = None) -> list[str]:
        """The ``dler train`` command line of a fresh start (``extra``: the user's overrides, last; ``train``: the
        command that is ``dler train``, default :data:`TRAIN_COMMAND`)."""
        preset, recipe_overrides = recipe_preset(self.recipe)
        overrides = [f"run.out={out}", f"run.seed={self.seed}", f"run.steps={self.steps}", *recipe_overrides]
        if self.warm_start:
            overrides.append(f"model.path={DEMO_MODEL}?seed={self.warm_start}")
        overrides += penalty_overrides(self.penalty, self.steps) + list(extra)
        return [*(train or TRAIN_COMMAND), preset, *overrides, "--no-progress"]


def recipe_preset(recipe: str) -> tuple[str, list[str]]:
    """The preset and the overrides of ``recipe``: a name of RECIPES, or ``NAME+OBJECTIVE``."""
    base, _, objective = recipe.partition("+")
    if base not in RECIPES:
        raise UserError(
            f"unknown recipe {recipe!r}; the study's recipes are {', '.join(RECIPES)}, each optionally +OBJECTIVE"
        )
    if not objective:
        return RECIPES[base], []
    from dler_kernels.objectives import OBJECTIVES  # torch: only once a recipe names an objective

    if objective not in OBJECTIVES:
        raise UserError(
            f"unknown objective {objective!r} in recipe {recipe!r}; the objectives are {', '.join(OBJECTIVES)}"
        )
    # The recipe's preset may set PPO-clip's clip bounds: null takes the objective's own (or a one-line error, for
    # an objective that reads none, would stop the run).
    return RECIPES[base], [f"algorithm.objective={objective}", "algorithm.eps_low=null", "algorithm.eps_high=null"]


def plan(
    recipes: Sequence[str], penalties: Sequence[str], seeds: Sequence[int], steps: int,
    warm_starts: Sequence[int] = DEFAULT_WARM_STARTS, extra: Sequence[str] = (),
) -> list[Run]:  # fmt: skip
    """Every run of the study, seed by seed and within a seed warm start by warm start (all cells at the first
    seed first). ``extra``: the user's overrides, which may not set the model of a study over warm starts."""
    if any(w < 0 for w in warm_starts):
        raise UserError(f"--warm-starts are SFT seeds, >= 0; got {', '.join(map(str, warm_starts))}")
    model_set = _sets_model(extra)
    if model_set and list(warm_starts) != [0]:
        raise UserError(
            f"--warm-starts sets each run's model.path ({DEMO_MODEL}?seed=W); it cannot be combined with --set "
            f"{model_set[0]}"
        )
    for recipe in recipes:
        recipe_preset(recipe)  # names an unknown recipe or objective
    for penalty in penalties:
        penalty_overrides(penalty, steps)  # names the unknown one
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if not (recipes and penalties and seeds and warm_starts):
        raise UserError("the study needs at least one recipe, one penalty, one seed and one warm start")
    once = dict.fromkeys  # a name given twice would be averaged twice: each counts once, in its first place
    return [
        Run(r, p, s, steps, w)
        for s in once(seeds)
        for w in once(warm_starts)
        for r in once(recipes)
        for p in once(penalties)
    ]


def finished_summary(run_dir: Path) -> dict | None:
    """The run's summary if it is whole and the run finished with both evaluations, else None."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    whole = isinstance(summary, dict) and summary.get("finished") is True and not summary.get("stopped")
    return summary if whole and "before" in summary and "after" in summary else None


class Interrupted(Exception):
    """The study stopped on SIGINT or SIGTERM; the message says where the run it was running stands."""


class StopSignals(CatchStopSignals):
    """While active (a context manager, in the main thread), SIGINT and SIGTERM are counted instead of ending
    the study: the study passes each one on to its running child (:func:`run_one`) and stops before starting
    another run."""

    def __init__(self) -> None:
        super().__init__()
        self.requested = 0

    def _handle(self, signum, frame) -> None:
        self.requested += 1  # all a handler does: the study's wait loop passes it on


def run_one(
    run: Run,
    out: Path,
    extra: Sequence[str],
    stop: StopSignals | None = None,
    *,
    train: Sequence[str] | None = None,
    stop_timeout: float = STOP_TIMEOUT_S,
    say: Callable[[str], None] = print,
) -> float:
    """Run (or resume) ``run`` with its output in OUT/logs/NAME.log; returns its wall time in seconds. ``train``:
    the command that is ``dler train`` (default :data:`TRAIN_COMMAND`). Raises :class:`Interrupted` when ``stop``
    was signalled meanwhile: the run was asked to stop after its step (with a checkpoint) and waited for up to
    ``stop_timeout`` seconds."""
    from ..checkpoint.manager import CheckpointManager

    stop, train = stop or StopSignals(), train or TRAIN_COMMAND
    run_dir, log = out / "runs" / run.name, out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists() and CheckpointManager(run_dir).latest() is not None:
        command = [*train, "--resume", str(run_dir), "--no-progress"]
    else:
        command = run.command(run_dir, extra, train)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        # Unbuffered: the log shows how far a run is while it runs.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own: the terminal's Ctrl-C reaches the study alone, which passes one SIGINT on (a
        # second one, from the terminal as well, would make dler train stop at once, without its checkpoint).
        child = subprocess.Popen(
            command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        try:
            code, killed = _wait(child, stop, run.name, stop_timeout, say)
        except BaseException:
            child.kill()  # in a session of its own, nothing else would ever stop it
            child.wait()
            raise
    if stop.requested:
        raise Interrupted(_interrupted(run, run_dir, code, killed, stop_timeout))
    if code != 0:
        raise UserError(f"{run.name}: dler train exited with {code}; its output is in {log}")
    return time.perf_counter() - start


def _wait(
    child: subprocess.Popen, stop: StopSignals, name: str, timeout: float, say: Callable[[str], None]
) -> tuple[int, bool]:
    """The child's exit code, passing each stop request on to it as one SIGINT, and whether it had to be killed
    (it had not ended ``timeout`` seconds after the first request)."""
    passed, deadline = 0, None
    while True:
        try:
            return child.wait(timeout=_POLL_S), False
        except subprocess.TimeoutExpired:
            pass
        while passed < stop.requested:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)
            passed += 1
            if deadline is None:
                deadline = time.monotonic() + timeout
                say(
                    f"dler study: stopping: {name} finishes its step and saves a checkpoint (waiting up to "
                    f"{timeout:.0f} s; Ctrl-C again stops it at once)"
                )
        if deadline is not None and time.monotonic() > deadline:
            child.kill()
            return child.wait(), True


def _interrupted(run: Run, run_dir: Path, code: int, killed: bool, timeout: float) -> str:
    """Where a stopped study leaves its run, and how it goes on."""
    from ..checkpoint.manager import CheckpointManager

    if finished_summary(run_dir) is not None:
        where = f"{run.name} finished"
    else:
        latest = CheckpointManager(run_dir).latest()
        where = (
            f"{run.name} resumes from its checkpoint {latest.name}"
            if latest is not None
            else f"{run.name} had no checkpoint yet and starts over"
        )
    how = (
        f"{run.name} did not stop within {timeout:.0f} s and was killed"
        if killed
        else f"{run.name} stopped (dler train exited with {code})"
    )
    return f"{how}; run the same command again to resume the study ({where})"


def _sets_model(extra: Sequence[str]) -> list[str]:
    return [item for item in extra if item.split("=", 1)[0].strip() == "model.path"]


def warm_starts_to_build(out: Path, runs: Sequence[Run], extra: Sequence[str] = ()) -> list[int]:
    """The warm starts that the unfinished runs of ``runs`` start from, in their order; none when ``extra`` sets
    the model (the runs start from the user's)."""
    if _sets_model(extra):
        return []
    return list(dict.fromkeys(r.warm_start for r in runs if finished_summary(out / "runs" / r.name) is None))


def build_warm_starts(warm_starts: Sequence[int], say: Callable[[str], None] = print) -> None:
    """Build (or find in the cache) each warm start, before the runs, so that a run's time is its own. A stop
    (SIGINT, SIGTERM) saves the build's state and raises KeyboardInterrupt; the next study resumes the build."""
    from ..models.demo import WarmStartConfig
    from ..models.warm_start import warm_start

    for w in warm_starts:
        folder = warm_start(WarmStartConfig(seed=w), progress=True, say=say)
        say(f"warm start {w}: {folder.name}")


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


# The name of a run's log and run folder (Run.name), by which a study from before the marker is recognised.
_RUN_NAME = re.compile(r"[a-z]+-[a-z0-9_]+(-warm\d+)?-seed-?\d+-\d+steps")


@contextlib.contextmanager
def claim_folder(out: Path) -> Iterator[None]:
    """Claim ``out`` for a study (``fsutil.check_output``: new, empty or a study's own; anything else is refused
    untouched), mark it as a study's and hold its lock while the block runs."""
    out = Path(out)
    # A study written before studies carried their marker is ours too: it is marked below.
    if not (owner(out) is None and is_legacy_study(out)):
        check_output(out, "study", flag=None, ours_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if owner(out) != "study":  # new, or a study from before the marker
        mark_owner(out, "study")
    lock = FolderLock(out, "study")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_legacy_study(out: Path) -> bool:
    """A study folder from before studies carried their marker: its overrides file (a list of key=value) and
    the log of at least one of its runs."""
    try:
        overrides = json.loads((out / OVERRIDES_FILE).read_text(encoding="utf-8"))
        logs = [p.stem for p in (out / "logs").glob("*.log")]
    except (OSError, ValueError):
        return False
    listed = isinstance(overrides, list) and all(isinstance(x, str) and "=" in x for x in overrides)
    return listed and any(_RUN_NAME.fullmatch(name) for name in logs)


def run_study(
    out: Path,
    runs: Sequence[Run],
    extra: Sequence[str] = (),
    say: Callable[[str], None] = print,
    *,
    train: Sequence[str] | None = None,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> dict[str, float]:
    """Run every unfinished run of ``runs`` one at a time; returns the wall seconds of each run (this call's
    and earlier ones', kept in OUT/timings.json). SIGINT and SIGTERM stop it with :class:`Interrupted`, after
    the running run's checkpoint (:func:`run_one`)."""
    out.mkdir(parents=True, exist_ok=True)
    check_overrides(out, extra)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.is_file() else {}
    show_warm = any(run.warm_start for run in runs)
    with StopSignals() as stop:
        for i, run in enumerate(runs, start=1):
            warm = f" warm start {run.warm_start}" if show_warm else ""
            prefix = f"[{i}/{len(runs)}] {run.recipe} {run.penalty}{warm} seed {run.seed}"
            summary = finished_summary(out / "runs" / run.name)
            if summary is None:
                if stop.requested:
                    raise Interrupted(
                        f"stopped before {run.name} started; run the same command again to resume the study"
                    )
                timings[run.name] = run_one(run, out, extra, stop, train=train, stop_timeout=stop_timeout, say=say)
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
