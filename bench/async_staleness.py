"""The asynchronous loop on the CPU demo: ``rollout.async_staleness`` k = 0, 1, 2 over seeds, side by side.

    python bench/async_staleness.py --out runs/async            # 3 k x 3 seeds x 80 steps, then the table
    python bench/async_staleness.py --out runs/async --report   # the table of the runs already there

Each run is ``dler train`` on the demo preset (``toy-cpu``) with ``run.seed`` and ``rollout.async_staleness``;
a finished run (its summary.json) is not run again, so a second call continues. ``--split 2+2`` runs k >= 1 with
2 torch threads in each of the trainer and the engine process, instead of the default 1 + 1 on 2 cores
(``trainer.train.cpu_share``); its runs go to their own folders, as do those of ``--set KEY=VALUE --tag NAME``
(overrides of the k >= 1 runs, paired with the plain k = 0 runs). The report gives per k: the mean step time
(step 1 left out: nothing is sampled ahead yet), the wall time of the 80 steps, the fraction of the step in which
generation overlapped the trainer's work, the trainer's wait for its batch, the staleness histogram, the groups
dropped as stale, the held-out accuracy and length after training (mean +- std over seeds, and the difference
paired with k = 0 by seed) and the trainer-sampler mismatch by staleness. It writes report.md and report.json in
``--out``. One trainer at a time: two at once on 2 cores slow each other several times over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

MISMATCH = ("mismatch_kl_k3", "mismatch_logp_abs_mean")


def run_name(k: int, seed: int, split: str, tag: str = "") -> str:
    name = f"k{k}-seed{seed}" + ("" if split == "1+1" or k == 0 else f"-split{split.replace('+', 'x')}")
    return name + (f"-{tag}" if tag and k else "")


def run(out: Path, k: int, seed: int, steps: int, split: str, tag: str = "", extra: list[str] = ()) -> Path:
    folder = out / run_name(k, seed, split, tag)
    if (folder / "summary.json").is_file():
        return folder
    overrides = [f"run.out={folder}", f"run.seed={seed}", f"run.steps={steps}", f"rollout.async_staleness={k}"]
    if split != "1+1" and k:
        trainer, engine = split.split("+")
        overrides += [f"run.threads={trainer}", f"rollout.engine_threads={engine}"]
    if k:
        overrides += list(extra)  # the k = 0 runs stay the plain ones, the pairs' reference
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished run of this script's own: started over, not resumed (its timing)
    command = [sys.executable, "-m", "trainer", "train", "--no-progress", *overrides]
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    log = out / f"{folder.name}.log"
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{folder.name} failed ({done.returncode}); its output: {log}")
    (folder / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - start}))
    return folder


def facts(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    later = records[1:] or records
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in later)  # noqa: E731
    return {
        "step_s": mean("step_s"),
        "steps_s": sum(r["step_s"] for r in records),
        "wall_s": json.loads((folder / "wall.json").read_text())["wall_s"] if (folder / "wall.json").exists() else None,
        "overlap": mean("overlap"),
        "wait_s": mean("rollout_wait_s"),
        "rollout_s": mean("rollout_s"),
        "update_s": mean("update_s") + mean("logprob_s"),
        "staleness": dict(Counter(int(r.get("staleness", 0)) for r in records)),
        "dropped": sum(r.get("stale_dropped_groups", 0) for r in records),
        "accuracy": summary["after"]["accuracy"],
        "length": summary["after"]["mean_length"],
        "before_accuracy": summary["before"]["accuracy"],
        "mismatch": {
            str(s): {
                key: statistics.fmean(r[key] for r in records if r.get("staleness", 0) == s and key in r)
                for key in MISMATCH
                if any(key in r for r in records if r.get("staleness", 0) == s)
            }
            for s in sorted({int(r.get("staleness", 0)) for r in records})
        },  # fmt: skip
    }


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out: Path, ks: list[int], seeds: list[int], split: str, tag: str = "") -> str:
    runs = {(k, s): facts(out / run_name(k, s, split, tag)) for k in ks for s in seeds
            if (out / run_name(k, s, split, tag) / "summary.json").is_file()}  # fmt: skip
    lines = [
        f"split {split} (trainer + engine threads for k >= 1), seeds {seeds}, mean ± std over seeds"
        + (f", runs of k >= 1 tagged {tag!r}" if tag else ""),
        "",
        "| k | step s | 80 steps s | wall s | overlap | wait s | rollout s | update s | staleness (steps) | dropped "
        "| accuracy after | Δ acc vs k=0 (pt) | length after | Δ length vs k=0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        mine = [s for s in seeds if (k, s) in runs]
        if not mine:
            continue
        f = [runs[k, s] for s in mine]
        paired = [s for s in mine if (0, s) in runs]
        d_acc = [100 * (runs[k, s]["accuracy"] - runs[0, s]["accuracy"]) for s in paired]
        d_len = [runs[k, s]["length"] - runs[0, s]["length"] for s in paired]
        hist = Counter()
        for x in f:
            hist.update({int(a): b for a, b in x["staleness"].items()})
        walls = [x["wall_s"] for x in f if x["wall_s"] is not None]
        lines.append(
            f"| {k} | {_ms([x['step_s'] for x in f])} | {_ms([x['steps_s'] for x in f], digits=0)} "
            f"| {_ms(walls, digits=0) if walls else '-'} | {_ms([x['overlap'] for x in f])} "
            f"| {_ms([x['wait_s'] for x in f])} | {_ms([x['rollout_s'] for x in f])} "
            f"| {_ms([x['update_s'] for x in f])} | {dict(sorted(hist.items()))} | {sum(x['dropped'] for x in f)} "
            f"| {_ms([x['accuracy'] for x in f], 100, 1)}% | {_ms(d_acc, digits=1) if k and d_acc else '-'} "
            f"| {_ms([x['length'] for x in f], digits=1)} | {_ms(d_len, digits=1) if k and d_len else '-'} |"
        )
    lines += ["", "trainer-sampler mismatch by staleness (mean over the steps of that staleness, all runs):", ""]
    lines += ["| staleness | " + " | ".join(MISMATCH) + " |", "|---|" + "---|" * len(MISMATCH)]
    by_staleness: dict[str, dict[str, list[float]]] = {}
    for x in runs.values():
        for s, values in x["mismatch"].items():
            for key, v in values.items():
                by_staleness.setdefault(s, {}).setdefault(key, []).append(v)
    for s in sorted(by_staleness, key=int):
        cells = [f"{statistics.fmean(by_staleness[s][key]):.2e}" if key in by_staleness[s] else "-" for key in MISMATCH]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    name = f"report-split{split.replace('+', 'x')}" + (f"-{tag}" if tag else "")
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({f"k{k}-seed{s}": v for (k, s), v in runs.items()}, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/async"))
    p.add_argument("--ks", default="0,1,2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--split", default="1+1", help="trainer+engine torch threads for k >= 1 (default 1+1)")
    p.add_argument("--report", action="store_true", help="only the table of the runs already in --out")
    p.add_argument("--set", action="append", default=[], help="an override of the k >= 1 runs (repeatable)")
    p.add_argument("--tag", default="", help="the suffix of the k >= 1 runs' folders (with --set)")
    args = p.parse_args(argv)
    ks, seeds = [int(x) for x in args.ks.split(",")], [int(x) for x in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in seeds:  # by seed: a stopped call leaves whole pairs
            for k in ks:
                run(args.out, k, seed, args.steps, args.split, args.tag, args.set)
    print(report(args.out, ks, seeds, args.split, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
