"""The reports of ``dler eval``: ``results.md`` (the paper's Table 1, pass@k, the scaling runs) and the
accuracy-against-tokens and test-time-scaling plots, from the results dict."""

from __future__ import annotations

from pathlib import Path

from ..fsutil import save_figure


def results_markdown(results: dict) -> str:
    """Table 1 of the paper (accuracy and length per benchmark, then the average), then pass@k,
    majority vote and truncation, then the scaling runs."""
    models, datasets = list(results["results"]), list(results["datasets"])
    s = results["settings"]
    lines = [
        "# Evaluation",
        "",
        f"{s['samples']} samples per question, temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max {s['max_tokens']} tokens"
        + (f", think budget {s['think']['tokens']} tokens" if s.get("think") else "")
        + f"; engine {s['engine']}. Accuracy: average pass@1 (%); length: mean response tokens.",
        "",
        "| Model | " + " | ".join(f"{d} acc | {d} len" for d in datasets) + " | Avg acc | Avg len |",
        "|---|" + "---:|---:|" * (len(datasets) + 1),
    ]
    for m in models:
        cells = [
            f"{results['results'][m][d]['pass@1'] * 100:.1f} | {results['results'][m][d]['mean_length']:.0f}"
            for d in datasets
        ]
        avg = results["average"][m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg['pass@1'] * 100:.1f} | {avg['mean_length']:.0f} |")
    ks = list(next(iter(next(iter(results["results"].values())).values()))["pass@k"])
    lines += [
        "",
        "## pass@k, majority vote, truncation",
        "",
        "| Model | Data | " + " | ".join(f"pass@{k}" for k in ks) + " | majority | truncated |",
        "|---|---|" + "---:|" * (len(ks) + 2),
    ]
    for m in models:
        for d in datasets:
            r = results["results"][m][d]
            cells = " | ".join(f"{r['pass@k'][k] * 100:.1f}" for k in ks)
            lines.append(f"| {m} | {d} | {cells} | {r['majority'] * 100:.1f} | {r['truncation_rate'] * 100:.1f} |")
    if results.get("scaling"):
        lines += [
            "",
            "## Test-time scaling: K parallel samples per question",
            "",
            "Wall time of one generation of K samples per question (measured), pass@K estimated from the main samples.",
            "",
            "| Model | Data | K | seconds | pass@K | mean len |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for m, per in results["scaling"].items():
            for d, points in per.items():
                for p in points:
                    cells = f"{p['k']} | {p['seconds']:.2f} | {p['pass@k'] * 100:.1f} | {p['mean_length']:.0f}"
                    lines.append(f"| {m} | {d} | {cells} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict, path: Path) -> None:
    """Accuracy against mean length: one colour per model, one marker per data set, a star for the average."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^vP<>Xh"
    datasets = list(results["datasets"])
    for i, (model, per) in enumerate(results["results"].items()):
        colour = f"C{i % 10}"
        for j, d in enumerate(datasets):
            ax.plot(per[d]["mean_length"], per[d]["pass@1"] * 100, markers[j % len(markers)], color=colour, alpha=0.7)
        avg = results["average"][model]
        ax.plot(avg["mean_length"], avg["pass@1"] * 100, "*", color=colour, markersize=14, label=f"{model} (average)")
    for j, d in enumerate(datasets):
        ax.plot([], [], markers[j % len(markers)], color="grey", label=d)
    ax.set(xlabel="mean response length (tokens)", ylabel="average pass@1 (%)", title="accuracy against tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def plot_scaling(results: dict, path: Path) -> None:
    """pass@K against the wall time of K parallel samples, one panel per data set, one line per model."""
    plt = _pyplot()
    datasets = list(results["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, (model, per) in enumerate(results["scaling"].items()):
            points = per.get(d, [])
            xs, ys = [p["seconds"] for p in points], [p["pass@k"] * 100 for p in points]
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=model)
            for p, x, y in zip(points, xs, ys):
                ax.annotate(f"K={p['k']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="wall time of K parallel samples (s)", ylabel="pass@K (%)", title=d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    save_figure(fig, path)  # whole or not at all: a report re-run over an open plot never leaves half a PNG
    plt.close(fig)
