"""The results of ``dler study``: per cell (recipe x penalty), the mean and standard deviation over seeds of the
held-out accuracy and mean-length change, written as ``study.md``, ``study.json`` and ``pareto.png``.

The standard deviation is the sample one (ddof 1) and is reported only with two runs or more; every row says
how many runs are behind it. The warm start (every run's "before" evaluation) is one more point of the plot.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .fsutil import atomic_file, save_figure

STUDY_MD, STUDY_JSON, PARETO_PNG = "study.md", "study.json", "pareto.png"


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def cell_table(summaries: Mapping[tuple[str, str], Sequence[dict]]) -> list[dict[str, Any]]:
    """One entry per cell with runs: (recipe, penalty) -> the finished runs' summaries, in the order given."""
    cells = []
    for (recipe, penalty), runs in summaries.items():
        if not runs:
            continue
        per_run = {
            "accuracy_change": [r["after"]["accuracy"] - r["before"]["accuracy"] for r in runs],
            "length_change": [r["after"]["mean_length"] - r["before"]["mean_length"] for r in runs],
            "accuracy_after": [r["after"]["accuracy"] for r in runs],
            "length_after": [r["after"]["mean_length"] for r in runs],
        }
        cell = {"recipe": recipe, "penalty": penalty, "runs": len(runs)}
        cell.update({k: _spread(v) for k, v in per_run.items()})
        cell["per_run"] = per_run
        cells.append(cell)
    return cells


def warm_start(summaries: Mapping[tuple[str, str], Sequence[dict]]) -> dict[str, Any] | None:
    """The policy before training: the mean (and spread) of every run's "before" evaluation."""
    before = [r["before"] for runs in summaries.values() for r in runs]
    if not before:
        return None
    return {
        "runs": len(before),
        "accuracy": _spread([b["accuracy"] for b in before]),
        "mean_length": _spread([b["mean_length"] for b in before]),
    }


def _pm(spread: Mapping[str, float | None], scale: float, digits: int) -> str:
    mean = f"{spread['mean'] * scale:+.{digits}f}"
    return mean if spread["std"] is None else f"{mean} ± {spread['std'] * scale:.{digits}f}"


def markdown(cells: Sequence[dict], start: dict | None, header: Mapping[str, Any]) -> str:
    """study.md: how the study was run, then one row per cell."""
    lines = ["# Length-penalty study", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    if start is not None:
        acc, length = start["accuracy"], start["mean_length"]
        lines.append(
            f"- warm start (before training, mean of {start['runs']} runs' evaluations): accuracy {acc['mean']:.1%}, "
            f"mean length {length['mean']:.1f} tokens"
        )
    lines += [
        "",
        "Mean ± sample std over seeds (no ± with a single run) of the held-out change, after minus before.",
        "",
        "| recipe | penalty | runs | accuracy change (pt) | mean length change (tokens) | accuracy after "
        "| length after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c['recipe']} | {c['penalty']} | {c['runs']} | {_pm(c['accuracy_change'], 100, 1)} | "
            f"{_pm(c['length_change'], 1, 1)} | {c['accuracy_after']['mean']:.1%} | {c['length_after']['mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(cells: Sequence[dict], start: dict | None, path: Path) -> None:
    """Accuracy after training against mean tokens after, one point per cell with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {}
    for c in cells:
        color = colors.setdefault(c["recipe"], f"C{len(colors)}")
        x, y = c["length_after"], c["accuracy_after"]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt="o", color=color, capsize=3)
        ax.annotate(c["penalty"], (x["mean"], y["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for recipe, color in colors.items():
        ax.plot([], [], "o", color=color, label=recipe)
    if start is not None:
        x, y = start["mean_length"], start["accuracy"]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt="*", color="k", markersize=12)
        ax.plot([], [], "*", color="k", markersize=10, label="warm start (before)")
    ax.set(xlabel="held-out mean response length (tokens)", ylabel="held-out accuracy", title="after training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(
    out: Path, summaries: Mapping[tuple[str, str], Sequence[dict]], header: Mapping[str, Any]
) -> list[str]:
    """Write study.md, study.json and (with matplotlib) pareto.png into ``out``; returns notes for the console."""
    cells, start = cell_table(summaries), warm_start(summaries)
    with atomic_file(out / STUDY_MD) as f:
        f.write(markdown(cells, start, header))
    with atomic_file(out / STUDY_JSON) as f:
        json.dump({"header": dict(header), "warm_start": start, "cells": cells}, f, indent=1)
    if not cells:
        return ["no finished run yet: pareto.png not drawn"]
    if importlib.util.find_spec("matplotlib") is None:
        return [f"{PARETO_PNG} not drawn: matplotlib is not installed (pip install matplotlib)"]
    plot_pareto(cells, start, out / PARETO_PNG)
    return []
