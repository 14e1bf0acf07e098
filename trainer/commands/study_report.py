"""The results of ``dler study``: per cell (recipe x penalty), the mean and standard deviation over its runs (warm
starts x seeds) of the held-out accuracy and mean-length change, written as ``study.md``, ``study.json`` and
``pareto.png``; with several warm starts, also per warm start (``warm_starts.png``: before -> after of each).

The standard deviation is the sample one (ddof 1) and is reported only with two runs or more; every row says
how many runs are behind it. The warm start (every run's "before" evaluation) is one more point of the plot.

The question a study asks is whether a recipe beats GRPO, so a second table pairs each recipe's run with GRPO's
at the same penalty, warm start and seed: the pair's *block*. A pair shares its "before" evaluation (the same
warm start, questions and sampling seed), so the pair's difference of accuracy changes is the difference of the
"after" accuracies, free of the spread between blocks' "before" evaluations; pooled over every penalty it says
how often the recipe was ahead, with the two-sided sign test's p-value (exact binomial, ties dropped).

That pooled sign test counts every (penalty, block) pair as independent, which they are not: the pairs of one
block share its warm start, its evaluation questions and its sampling seed, so they tend to lean the same way
and the pooled p-value can be too small. Two tests of the pooled difference take the block as the unit
(:func:`seed_tests`): the exact sign test over the blocks' mean differences, and the exact permutation test
blocked by (warm start, seed), which flips the signs of one block's differences together.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fsutil import atomic_file, save_figure

STUDY_MD, STUDY_JSON, PARETO_PNG, WARM_STARTS_PNG = "study.md", "study.json", "pareto.png", "warm_starts.png"
BASELINE = "grpo"  # the recipe the others are paired with
# The blocked permutation test enumerates all 2^S sign assignments up to this many seeds (65536 of them, well
# under a second); with more it draws PERMUTATION_DRAWS of them with a fixed seed (a Monte Carlo p-value).
EXACT_PERMUTATION_SEEDS = 16
PERMUTATION_DRAWS = 2**16
# Sums of accuracy differences (fractions of the evaluation questions) that differ by less than this are the
# same sum computed in another order: float rounding (~1e-16), far below one question's share of any evaluation.
SUM_TIE = 1e-9


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def block(run: Mapping[str, Any]) -> tuple[int, Any]:
    """The (warm start, seed) a run shares with the runs it is paired with (warm start 0 where not recorded)."""
    return run.get("warm_start", 0), run["seed"]


def _block_label(key: tuple[int, Any], warm_starts: bool) -> str:
    return f"warm start {key[0]}, seed {key[1]}" if warm_starts else f"seed {key[1]}"


def cell_table(summaries: Mapping[tuple[str, str], Sequence[dict]]) -> list[dict[str, Any]]:
    """One entry per cell with runs: (recipe, penalty) -> the finished runs' summaries, in the order given (each
    with its ``"seed"`` where known, as ``dler study`` adds it)."""
    cells = []
    for (recipe, penalty), runs in summaries.items():
        if not runs:
            continue
        per_run = {
            "accuracy_change": [_accuracy_change(r) for r in runs],
            "length_change": [r["after"]["mean_length"] - r["before"]["mean_length"] for r in runs],
            "accuracy_after": [r["after"]["accuracy"] for r in runs],
            "length_after": [r["after"]["mean_length"] for r in runs],
            "seed": [r.get("seed") for r in runs],
            "warm_start": [r.get("warm_start", 0) for r in runs],
        }
        cell = {"recipe": recipe, "penalty": penalty, "runs": len(runs)}
        cell.update({k: _spread(v) for k, v in per_run.items() if k not in ("seed", "warm_start")})
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


def sign_test(ahead: int, behind: int) -> float:
    """Two-sided exact sign test: the probability, with ahead and behind equally likely, of a split at least
    as uneven as ``ahead`` : ``behind`` (ties are left out before counting)."""
    n, k = ahead + behind, min(ahead, behind)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def blocked_permutation_test(seed_sums: Sequence[float]) -> tuple[float, bool]:
    """Two-sided permutation test of a paired difference blocked by seed: each seed's pairs flip their signs
    together, so ``seed_sums`` (each seed's sum of paired differences) flip whole. Returns ``(p, exact)``: p is
    the fraction of the 2^S sign assignments whose |total| is at least the observed |total| (both the observed
    assignment and its negation count, so p >= 2 / 2^S), enumerated exactly up to
    ``EXACT_PERMUTATION_SEEDS`` seeds; beyond, ``(1 + hits) / (1 + draws)`` over random assignments."""
    observed = abs(sum(seed_sums)) - SUM_TIE
    if len(seed_sums) <= EXACT_PERMUTATION_SEEDS:
        signs = itertools.product((1, -1), repeat=len(seed_sums))
        hits = sum(abs(sum(g * x for g, x in zip(flip, seed_sums))) >= observed for flip in signs)
        return hits / 2 ** len(seed_sums), True
    rng = random.Random(0)
    hits = sum(abs(sum(rng.choice((1, -1)) * x for x in seed_sums)) >= observed for _ in range(PERMUTATION_DRAWS))
    return (1 + hits) / (1 + PERMUTATION_DRAWS), False


def seed_tests(differences: Sequence[tuple[tuple[int, Any], float]]) -> dict[str, Any]:
    """The pooled accuracy differences, ``((warm start, seed), difference)`` per pair, tested with that block as
    the unit: each block's mean difference over its pairs, the exact sign test over those means (ties dropped),
    and the blocked permutation test of the mean over every pair (:func:`blocked_permutation_test`)."""
    by_seed: dict[Any, list[float]] = {}
    for key, d in differences:
        by_seed.setdefault(key, []).append(d)
    per_seed = [
        {"warm_start": w, "seed": s, "pairs": len(v), "accuracy_difference": statistics.fmean(v)}
        for (w, s), v in by_seed.items()
    ]
    # a seed whose differences cancel is a tie, not ahead or behind by a rounding error
    ahead = sum(x["accuracy_difference"] > SUM_TIE for x in per_seed)
    behind = sum(x["accuracy_difference"] < -SUM_TIE for x in per_seed)
    p, exact = blocked_permutation_test([math.fsum(v) for v in by_seed.values()])
    return {
        "seeds": len(by_seed), "per_seed": per_seed,
        "seeds_ahead": ahead, "seeds_behind": behind, "seed_sign_test_p": sign_test(ahead, behind),
        "permutation_p": p, "permutation_exact": exact,
    }  # fmt: skip


def _accuracy_change(summary: Mapping[str, Any]) -> float:
    return summary["after"]["accuracy"] - summary["before"]["accuracy"]


def _pair_stats(acc: Sequence[float], length: Sequence[float]) -> dict[str, Any]:
    ahead, behind = sum(d > 0 for d in acc), sum(d < 0 for d in acc)
    return {
        "pairs": len(acc), "accuracy_difference": _spread(acc), "length_after_difference": _spread(length),
        "ahead": ahead, "behind": behind, "sign_test_p": sign_test(ahead, behind),
    }  # fmt: skip


def paired_table(summaries: Mapping[tuple[str, str], Sequence[dict]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Each recipe other than ``baseline`` (GRPO, or e.g. ``dler`` for the objective axis) minus ``baseline``, per
    penalty and pooled over the penalties (penalty ``None``), pairing runs by their ``"seed"``: the accuracy change's
    difference (= the "after" accuracies' difference) and the "after" mean lengths' difference, pairing runs by
    their :func:`block` (warm start, seed). Runs without a baseline run at the same penalty and block give no pair.
    A pooled row also has ``by_seed``, the tests that take the block as the unit (:func:`seed_tests`)."""
    base_runs = {(p, block(s)): s for (r, p), cell in summaries.items() if r == baseline for s in cell if "seed" in s}
    out = []
    for recipe in dict.fromkeys(r for r, _ in summaries if r != baseline):
        pooled_acc, pooled_len, pooled_seeds = [], [], []
        for (r, penalty), cell in summaries.items():
            pairs = [
                (s, base_runs[penalty, block(s)]) for s in cell if "seed" in s and (penalty, block(s)) in base_runs
            ]
            if r != recipe or not pairs:
                continue
            acc = [_accuracy_change(m) - _accuracy_change(b) for m, b in pairs]
            length = [m["after"]["mean_length"] - b["after"]["mean_length"] for m, b in pairs]
            out.append({"recipe": recipe, "penalty": penalty, **_pair_stats(acc, length)})
            pooled_acc += acc
            pooled_len += length
            pooled_seeds += [block(m) for m, _ in pairs]
        if len({row["penalty"] for row in out if row["recipe"] == recipe}) > 1:
            by_seed = seed_tests(list(zip(pooled_seeds, pooled_acc)))
            out.append({"recipe": recipe, "penalty": None, **_pair_stats(pooled_acc, pooled_len), "by_seed": by_seed})
    return out


def warm_start_table(summaries: Mapping[tuple[str, str], Sequence[dict]]) -> list[dict[str, Any]]:
    """Per cell and warm start (runs without ``"warm_start"`` are warm start 0): the accuracy before (the runs'
    "before" evaluations, which share the warm start and differ by their evaluation's sampling seed) and after
    training, and the change, each its mean and spread over the seeds."""
    rows = []
    for (recipe, penalty), runs in summaries.items():
        by_warm: dict[int, list[dict]] = {}
        for r in runs:
            by_warm.setdefault(r.get("warm_start", 0), []).append(r)
        for w, group in sorted(by_warm.items()):
            rows.append(
                {
                    "recipe": recipe, "penalty": penalty, "warm_start": w, "runs": len(group),
                    "accuracy_before": _spread([r["before"]["accuracy"] for r in group]),
                    "accuracy_after": _spread([r["after"]["accuracy"] for r in group]),
                    "accuracy_change": _spread([_accuracy_change(r) for r in group]),
                    "length_before": _spread([r["before"]["mean_length"] for r in group]),
                    "length_after": _spread([r["after"]["mean_length"] for r in group]),
                }
            )  # fmt: skip
    return rows


def _p(p: float) -> str:
    """A p-value: two decimals, or two significant digits below 0.01 (9 pairs all one way: 0.0039, not 0.00)."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.2g}"


def _pm(spread: Mapping[str, float | None], scale: float, digits: int) -> str:
    mean = f"{spread['mean'] * scale:+.{digits}f}"
    return mean if spread["std"] is None else f"{mean} ± {spread['std'] * scale:.{digits}f}"


def markdown(
    cells: Sequence[dict], start: dict | None, header: Mapping[str, Any], pairs: Sequence[dict] = (),
    baseline: str = BASELINE, warm_rows: Sequence[dict] = (),
) -> str:  # fmt: skip
    """study.md: how the study was run, one row per cell, then per warm start (``warm_rows``, with more than one),
    then the pairs with ``baseline`` (:func:`paired_table`)."""
    several = len({r["warm_start"] for r in warm_rows}) > 1
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
        "Mean ± sample std over the runs (warm starts x seeds; no ± with a single run) of the held-out change, "
        "after minus before.",
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
    if several:
        lines += [
            "",
            "## Per warm start",
            "",
            "Each warm start's runs, mean ± sample std over their seeds: held-out accuracy before training (the same "
            "policy, evaluated with each run's sampling seed), after, and the change (pt).",
            "",
            "| recipe | penalty | warm start | runs | accuracy before | accuracy after | accuracy change (pt) "
            "| length before -> after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in warm_rows:
            lines.append(
                f"| {r['recipe']} | {r['penalty']} | {r['warm_start']} | {r['runs']} | "
                f"{r['accuracy_before']['mean']:.1%} | {r['accuracy_after']['mean']:.1%} | "
                f"{_pm(r['accuracy_change'], 100, 1)} | {r['length_before']['mean']:.1f} -> "
                f"{r['length_after']['mean']:.1f} |"
            )
    unit = "warm start and seed" if several else "seed"
    if pairs:
        lines += [
            "",
            f"## Paired with {baseline} at the same penalty and {unit}",
            "",
            f"Recipe minus {baseline}: the accuracy change (pt; the pair shares its before evaluation) and the mean "
            "length after (tokens), mean ± sample std over the pairs; how many pairs the recipe was ahead / behind in "
            "accuracy, and the two-sided sign test's p-value.",
            "",
            "| recipe | penalty | pairs | accuracy difference (pt) | length after difference (tokens) "
            "| ahead / behind | sign test p |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in pairs:
            penalty = r["penalty"] if r["penalty"] is not None else "**all penalties**"
            lines.append(
                f"| {r['recipe']} | {penalty} | {r['pairs']} | {_pm(r['accuracy_difference'], 100, 1)} | "
                f"{_pm(r['length_after_difference'], 1, 1)} | {r['ahead']} / {r['behind']} | {_p(r['sign_test_p'])} |"
            )
    pooled = [r for r in pairs if "by_seed" in r]
    if pooled:
        lines += [
            "",
            f"### Pooled over the penalties, by {unit}",
            "",
            f"The pairs of one {unit} share its warm start and its evaluation (questions and sampling seed), so the "
            f"pooled rows' pairs are not independent. Per {unit}, the recipe's mean accuracy difference (pt) over its "
            f"pairs; how many it was ahead / behind in, with two tests that take the {unit} as the unit.",
            "",
            f"| recipe | blocks | per-block accuracy difference (pt) | blocks ahead / behind | sign test over blocks p "
            f"| permutation p, blocked by {unit} |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in pooled:
            t = r["by_seed"]
            per_seed = ", ".join(
                f"{x['accuracy_difference'] * 100:+.1f} ({_block_label((x['warm_start'], x['seed']), several)})"
                for x in t["per_seed"]
            )
            exact = "" if t["permutation_exact"] else f" ({PERMUTATION_DRAWS} random sign assignments)"
            lines.append(
                f"| {r['recipe']} | {t['seeds']} | {per_seed} | {t['seeds_ahead']} / {t['seeds_behind']} | "
                f"{_p(t['seed_sign_test_p'])} | {_p(t['permutation_p'])}{exact} |"
            )
        lines += [
            "",
            "What each p-value assumes when the recipes are equal:",
            "",
            f"- pooled sign test (the table above): every (penalty, {unit}) pair independent, each equally likely "
            f"ahead or behind; the pairs of one {unit} are not independent, so its p-value can be too small.",
            f"- sign test over blocks: the blocks ({unit}) independent, each block's mean difference equally likely "
            "positive or negative; it uses the signs only.",
            f"- permutation test blocked by {unit} (of the pooled mean difference): the blocks independent, each "
            "block's differences as likely as all of them negated together; it uses their sizes, enumerates all 2^B "
            "sign assignments of B blocks (exact), and cannot go below 2 / 2^B (0.25 with 3 blocks).",
        ]
    return "\n".join(lines) + "\n"


def plot_pareto(cells: Sequence[dict], start: dict | None, path: Path) -> None:
    """Accuracy after training against mean tokens after, one point per cell with std error bars: the whole
    picture with the warm start, and beside it the trained cells alone (they crowd together far from it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    colors: dict[str, str] = {}
    for c in cells:
        colors.setdefault(c["recipe"], f"C{len(colors)}")
    for ax, with_start in zip(axes, (True, False)):
        for c in cells:
            x, y = c["length_after"], c["accuracy_after"]
            color = colors[c["recipe"]]
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt="o", color=color, capsize=3)
            if not with_start:  # names on the zoomed panel, each recipe's on its own side of the point
                right = list(colors).index(c["recipe"]) % 2 == 1
                ax.annotate(c["penalty"], (x["mean"], y["mean"]), fontsize=7, color=color,
                            xytext=(5 if right else -5, 2), textcoords="offset points",
                            ha="left" if right else "right")  # fmt: skip
        if with_start and start is not None:
            x, y = start["mean_length"], start["accuracy"]
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt="*", color="k", markersize=12)
            ax.plot([], [], "*", color="k", markersize=10, label="warm start (before)")
        for recipe, color in colors.items():
            ax.plot([], [], "o", color=color, label=recipe)
        title = "after training, with the warm start" if with_start else "after training: the cells"
        ax.set(xlabel="held-out mean response length (tokens)", ylabel="held-out accuracy", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_warm_starts(warm_rows: Sequence[dict], path: Path) -> None:
    """Held-out accuracy before -> after training per warm start: one arrow per cell and warm start, from the
    before to the after mean, with the after spread over seeds as an error bar. Whether training gains or loses
    accuracy can depend on the warm start; this shows it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["recipe"], r["penalty"]) for r in warm_rows))
    warms = sorted({r["warm_start"] for r in warm_rows})
    width = 0.7 / max(1, len(cells))
    fig, ax = plt.subplots(figsize=(max(6, 2 + 1.6 * len(warms)), 4.8))
    for k, cell in enumerate(cells):
        color = f"C{k}"
        for r in (r for r in warm_rows if (r["recipe"], r["penalty"]) == cell):
            x = warms.index(r["warm_start"]) + (k - (len(cells) - 1) / 2) * width
            before, after = r["accuracy_before"]["mean"], r["accuracy_after"]["mean"]
            ax.annotate("", xy=(x, after), xytext=(x, before), arrowprops={"arrowstyle": "->", "color": color})
            ax.plot([x], [before], "o", color="k", markersize=4)
            ax.errorbar(x, after, yerr=r["accuracy_after"]["std"] or 0, fmt="s", color=color, capsize=3)
        ax.plot([], [], "s", color=color, label=f"{cell[0]} {cell[1]} (after)")
    ax.plot([], [], "o", color="k", markersize=4, label="before training")
    ax.set_xticks(range(len(warms)), [f"warm start {w}" for w in warms])
    ax.set(ylabel="held-out accuracy", title="before -> after training, per warm start (mean over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(
    out: Path, summaries: Mapping[tuple[str, str], Sequence[dict]], header: Mapping[str, Any], baseline: str = BASELINE
) -> list[str]:
    """Write study.md, study.json and (with matplotlib) pareto.png into ``out``; returns notes for the console.
    ``baseline``: the recipe every other is paired with."""
    cells, start, pairs = cell_table(summaries), warm_start(summaries), paired_table(summaries, baseline)
    warm_rows = warm_start_table(summaries)
    with atomic_file(out / STUDY_MD) as f:
        f.write(markdown(cells, start, header, pairs, baseline, warm_rows))
    with atomic_file(out / STUDY_JSON) as f:
        json.dump(
            {"header": dict(header), "warm_start": start, "cells": cells, "per_warm_start": warm_rows, "paired": pairs},
            f,
            indent=1,
        )
    if not cells:
        return ["no finished run yet: pareto.png not drawn"]
    if importlib.util.find_spec("matplotlib") is None:
        return [f"{PARETO_PNG} not drawn: matplotlib is not installed (pip install matplotlib)"]
    plot_pareto(cells, start, out / PARETO_PNG)
    if len({r["warm_start"] for r in warm_rows}) > 1:
        plot_warm_starts(warm_rows, out / WARM_STARTS_PNG)
    return []
