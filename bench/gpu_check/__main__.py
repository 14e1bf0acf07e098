"""One command that answers every GPU question: ``make gpu-check`` (or this module, from the repository root).

    python -m bench.gpu_check --out gpu-check                  # one NVIDIA GPU: the full check, <= 8 minutes
    python -m bench.gpu_check --out gpu-check --wheels wheels/ # with carried liger-kernel / math-verify wheels
    python -m bench.gpu_check --out /tmp/gc --smoke            # tiny shapes, any machine (the CI runs this)

Stages, in order, each in its own process with its own time budget (killed there); a failed stage
records its error and the next one runs. The whole check has a deadline (--total-budget, 480 s): a stage
gets its own budget plus what earlier stages left unused, never past the deadline, or is not run (out of
time) when under 10 s would be left:

  1 environment   GPU, driver, versions; device copy bandwidth and matmul rate measured in this run
  2 build         the CUDA wheel, built with `make wheel-cuda`'s recipe (8.0;9.0;10.0+PTX) against this
                  machine's torch (time-boxed), and ptxas' spill report; installed into a fresh venv, where
                  the CUDA backend's oracle tests run; its dler_kernels._C then put into the checkout
  3 correctness   pytest -m gpu (counts per file, kept by a kill), and a 3-step `dler train` of the tiny demo model
  4 kernel_bench  bench_policy_loss: bf16, V=151936, N in {4096, 16384}, against eager, compile, Liger
  5 linear_bench  bench_linear_policy_loss: N=16384, the target (H, V) shapes, against the 3 matmuls, Liger
  6 train_step    bench_train_step --fsdp: Qwen2-1.5B config, MFU against stage 1's matmul and the datasheet

Every stage ends passed, failed, skipped (the device does not allow it, e.g. "no CUDA device") or not
run (e.g. "liger-kernel missing"): nothing that did not run is reported as a pass. Writes
OUT/gpu_report.json (every figure, with the GPU, driver, CUDA, torch and triton versions and the date)
and OUT/gpu_report.md (tables); each stage's log is in OUT/logs/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from .context import StageContext
from .report import machine, write_json, write_markdown
from .runner import (
    ROOT,
    STATUSES,
    Stage,
    kill_started_groups_on_sigterm,
    not_run,
    run_command,
    run_stage,
    stage_budget,
)
from .stages import STAGE_NAMES, STAGES, TOTAL_BUDGET_S, stage_function

FAULTS = ("raise", "hang")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_report.json, gpu_report.md and logs/")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script itself on any machine")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of carried pure-Python wheels (liger-kernel, math-verify), installed with "
                        "pip --no-index --no-deps into OUT/wheels-site (not into the environment)")  # fmt: skip
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma list of stages to run (default all: {','.join(STAGE_NAMES)}); the others "
                        "are reported as not run")  # fmt: skip
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override one stage's own time budget")  # fmt: skip
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, metavar="SECONDS",
                   help=f"the whole check's deadline (default {TOTAL_BUDGET_S:.0f}): each stage gets its own budget "
                        "plus what earlier stages left unused, never past it; a stage left under "
                        "10 s is not run (out of time)")  # fmt: skip
    p.add_argument("--inject-fault", action="append", default=[], metavar="STAGE=raise|hang",
                   help="for the tests of this script only: make STAGE raise, or hang in a command it started, to "
                        "check that the failure is recorded, the hung command killed, the next stage run")  # fmt: skip
    p.add_argument("--stage-child", choices=STAGE_NAMES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.selected) - set(STAGE_NAMES))
    if unknown:
        p.error(f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGE_NAMES)}")
    args.budgets = _pairs(p, "--budget", args.budget, float)
    if args.total_budget <= 0 or any(b <= 0 for b in args.budgets.values()):
        p.error("--total-budget and --budget: the seconds must be > 0")
    args.faults = _pairs(p, "--inject-fault", args.inject_fault, str)
    if any(f not in FAULTS for f in args.faults.values()):
        p.error(f"--inject-fault: the fault must be one of {', '.join(FAULTS)}")
    return args


def _pairs(p, flag: str, items: list[str], cast) -> dict:
    out = {}
    for item in items:
        stage, sep, value = item.partition("=")
        if not sep or stage not in STAGE_NAMES:
            p.error(f"{flag} {item!r}: expected STAGE=VALUE with STAGE one of {', '.join(STAGE_NAMES)}")
        try:
            out[stage] = cast(value)
        except ValueError:
            p.error(f"{flag} {item!r}: {value!r} is not a valid value")
    return out


def child_main(args) -> int:
    """One stage, inside its own process: the parent kills it at its budget and reads OUT/stages/NAME.json."""
    kill_started_groups_on_sigterm()
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "600"))
    ctx = StageContext(args.stage_child, args.out, args.smoke, args.wheels, budget)
    ctx.save()
    fault = args.faults.get(args.stage_child)
    try:
        if fault == "raise":
            raise RuntimeError(f"fault injected into stage {args.stage_child} (--inject-fault)")
        if fault == "hang":  # in a command the stage started, as a stuck pytest or compiler would
            pid_file = args.out / "logs" / f"{args.stage_child}-hang.pid"
            sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(10**6)"
            run_command([sys.executable, "-c", sleeper, str(pid_file)], 10**6)
        stage_function(args.stage_child)(ctx)
    except Exception as e:
        traceback.print_exc()
        ctx.record.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300],
                          error=traceback.format_exc()[-4000:])  # fmt: skip
        ctx.save()
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.stage_child:
        return child_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "stages", ignore_errors=True)  # a stage reads earlier ones': never a previous run's
    # Every stage imports the checkout's dler_kernels, trainer and this package (ROOT), the carried wheels, and the
    # benchmark scripts of bench/ (bench_policy_loss, ...), which import each other by bare name: ROOT/bench.
    paths = [str(ROOT), str(ROOT / "bench")]
    if args.wheels is not None:
        # Made now, filled by the environment stage: a path entry that exists at start-up is searched afresh.
        (args.out / "wheels-site").mkdir(exist_ok=True)
        paths.append(str(args.out / "wheels-site"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # Interpreted Triton measures nothing on a GPU; the stages that want it (pytest on a CPU) set it themselves.
    env.pop("TRITON_INTERPRET", None)
    # A user's DLER_BACKEND would redirect every dler measurement to one backend; the check wants the default.
    env.pop("DLER_BACKEND", None)
    env["HF_HUB_OFFLINE"] = "1"  # every model is built locally: a hub lookup is a bug, not a download
    child_args = ["--out", str(args.out)] + (["--smoke"] if args.smoke else [])
    child_args += ["--wheels", str(args.wheels.resolve())] if args.wheels is not None else []
    child_args += [a for stage, fault in args.faults.items() for a in ("--inject-fault", f"{stage}={fault}")]
    start, started_at = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    planned = 0.0  # the own budgets of the stages started so far
    for i, stage in enumerate(STAGES, 1):
        if stage.name not in args.selected:
            records.append(not_run(stage, "not selected (--stages)", args.smoke))
            continue
        if stage.name in args.budgets:
            stage = Stage(stage.name, stage.title, args.budgets[stage.name], args.budgets[stage.name])
        own = stage.smoke_budget_s if args.smoke else stage.budget_s
        elapsed = time.perf_counter() - start
        budget = stage_budget(own, planned, elapsed, args.total_budget)
        if budget is None:
            left = max(args.total_budget - elapsed, 0.0)
            records.append(not_run(stage, f"out of time: {left:.0f} s left of the {args.total_budget:.0f} s total "
                                          "budget (--total-budget)", args.smoke, left))  # fmt: skip
            print(f"[{i}/{len(STAGES)}] {stage.name}: not run: {records[-1]['reason']}", flush=True)
            continue
        planned += own
        stage_env = dict(env, GPU_CHECK_BUDGET_S=str(budget))
        records.append(run_stage(stage, i, len(STAGES), child_args, args.out, budget, stage_env, own))
        print(f"    {time.perf_counter() - start:.1f} s of the {args.total_budget:.0f} s total budget used",
              flush=True)  # fmt: skip
    total = time.perf_counter() - start
    about = machine(records)
    if about["date"].startswith("unknown"):  # the environment stage did not record it: when this run started
        about["date"] = started_at
    report = dict(
        command=shlex.join(["python", "-m", "bench.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
        smoke=args.smoke,
        machine=about,
        total_s=round(total, 1),
        total_budget_s=args.total_budget,
        stages=records,
    )  # fmt: skip
    write_json(args.out / "gpu_report.json", report)
    write_markdown(args.out / "gpu_report.md", report)
    counts = {status: sum(r["status"] == status for r in records) for status in STATUSES}
    print(f"gpu-check: {', '.join(f'{n} {s}' for s, n in counts.items())} in {total:.1f} s "
          f"-> {args.out / 'gpu_report.md'}")  # fmt: skip
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
