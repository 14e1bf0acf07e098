"""The run's record: ``config.yaml``, ``metrics.jsonl``, the console table, the progress bar, the
external loggers (TensorBoard, W&B), ``summary.json`` and ``curves.png``.

Only rank 0 writes and prints; every other rank holds a :class:`RunLog` that does nothing, so the loop
calls it alike on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import TrainConfig
from ..devices import host
from ..fsutil import UserError, atomic_file, save_figure

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
# The console table repeats its header every this many steps, so a long log stays readable.
TABLE_HEADER_EVERY = 20
# The metrics of a step that the summary keeps for its first and last step.
SUMMARY_KEYS = ("step", "accuracy", "mean_response_length", "truncation_rate")


class RunLog:
    """Where a run's figures go. ``start_step``: the step the run starts after (the table's header is
    printed before the first step logged and every ``TABLE_HEADER_EVERY`` steps after it)."""

    def __init__(self, cfg: TrainConfig, out: Path, *, is_main: bool, progress: bool):
        self.cfg, self.out, self.is_main = cfg, out, is_main
        self.progress = progress and is_main
        self.start_step = 0
        self.loggers: list = []
        self._bar = None

    def open_loggers(self) -> None:
        """Start the external loggers (a missing package fails here, at the start of the run)."""
        self.loggers = open_loggers(self.cfg, self.out) if self.is_main else []

    # -- the console -----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line on the console (above the progress bar)."""
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(text)

    def warn(self, text: str) -> None:
        if self.is_main:
            print(f"dler train: warning: {text}", file=sys.stderr, flush=True)

    # -- the metrics file ------------------------------------------------------------------------

    def start_fresh(self, replaces_failed_start: bool) -> None:
        """A new run: its config, and an empty metrics file (a failed start's metrics are set aside)."""
        if not self.is_main:
            return
        metrics = self.out / METRICS_FILE
        if replaces_failed_start and metrics.is_file() and metrics.stat().st_size > 0:
            # Steps logged without a checkpoint cannot be resumed, but they are kept, not erased.
            aside = metrics.with_name(f"metrics-failed-{int(time.time())}.jsonl")
            os.replace(metrics, aside)
            self.warn(f"{self.out}: the failed start's metrics are kept as {aside.name}")
        config_mod.save_config(self.cfg, self.out / CONFIG_FILE)
        metrics.write_text("")

    def resume_at(self, step: int) -> None:
        """A resumed run: the records after ``step`` belong to the timeline the resume abandons."""
        self.start_step = step
        if self.is_main:
            truncate_metrics(self.out / METRICS_FILE, step)

    def record(self, record: dict[str, Any]) -> None:
        """One step's record: to metrics.jsonl, the external loggers, the console table and the bar."""
        if not self.is_main:
            return
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for write in self.loggers:
            write(record["step"], scalars)
        step = record["step"]
        if step == self.start_step + 1 or (step - self.start_step) % TABLE_HEADER_EVERY == 1:
            self.say(TABLE_HEADER)
        if step % self.cfg.run.log_every == 0 or step == self.cfg.run.steps:
            self.say(table_row(record))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(acc=f"{record['accuracy']:.2f}", len=f"{record['mean_response_length']:.0f}")

    # -- the progress bar ------------------------------------------------------------------------

    def open_bar(self) -> None:
        if not self.progress:
            return
        from ..progress import progress

        self._bar = progress(
            total=self.cfg.run.steps, initial=self.start_step, desc="dler train", unit="step", dynamic_ncols=True
        )

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- the end of the run ----------------------------------------------------------------------

    def finish(self, step: int, finished: bool, history: dict[str, Any], kernels: str) -> dict[str, Any]:
        """The run's summary (written to summary.json with the curves, and printed as a table). ``kernels``:
        the backend that computed the loss (triton, cpu, cuda or reference)."""
        records = read_metrics(self.out / METRICS_FILE) if self.is_main else []
        summary: dict[str, Any] = {"out": str(self.out), "steps": step, "finished": finished, "machine": host(),
                                   "kernels": kernels, **history}  # fmt: skip
        if records:
            first, last = records[0], records[-1]
            summary["training"] = {
                "first_step": {k: first[k] for k in SUMMARY_KEYS},
                "last_step": {k: last[k] for k in SUMMARY_KEYS},
                "seconds": sum(r["step_s"] for r in records),
            }
        if self.is_main:
            _write_text(self.out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
            if records and importlib.util.find_spec("matplotlib") is None:
                # A full install has matplotlib, but a bare GPU node may not: every figure of the plot is in
                # metrics.jsonl, so a missing plotting package must not turn a finished run into a crash.
                self.say(f"{CURVES_FILE} not drawn: matplotlib is not installed (pip install matplotlib)")
            elif records:
                plot_curves(records, history, self.out / CURVES_FILE)
            self.say(before_after_table(summary))
        return summary


def open_loggers(cfg: TrainConfig, out: Path) -> list:
    """Writers of per-step scalars besides metrics.jsonl: TensorBoard (OUT/tensorboard) and W&B, if asked.
    A missing package is a UserError at start, not a crash at the first step."""
    loggers = []
    if cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("run.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))

        def tensorboard(step: int, scalars: dict[str, float]) -> None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            writer.flush()

        loggers.append(tensorboard)
    if cfg.run.wandb_project:
        try:
            import wandb
        except ImportError:
            raise UserError(f"run.wandb_project={cfg.run.wandb_project!r} needs wandb: pip install wandb") from None
        run = wandb.init(project=cfg.run.wandb_project, dir=str(out), config=config_mod.to_dict(cfg), resume="allow")
        loggers.append(lambda step, scalars: run.log(scalars, step=step))
    return loggers


# -------------------------------------------------------------------------------- the console table

TABLE_COLUMNS = (
    ("step", "step", "{:>5d}"),
    ("acc", "accuracy", "{:>6.3f}"),
    ("len", "mean_response_length", "{:>7.1f}"),
    ("p90", "p90_response_length", "{:>6.0f}"),
    ("trunc", "truncation_rate", "{:>6.3f}"),
    ("reward", "reward", "{:>7.3f}"),
    ("kept", "kept_fraction", "{:>5.2f}"),
    ("entropy", "entropy", "{:>8.3f}"),
    ("clip", "clip_frac_high", "{:>6.3f}"),
    ("gnorm", "grad_norm", "{:>7.3f}"),
    ("dlogp", "mismatch_logp_abs_max", "{:>7.4f}"),  # the trainer-sampler gap ("-" in the bypass)
    ("roll s", "rollout_s", "{:>7.1f}"),
    ("upd s", "update_s", "{:>6.1f}"),
    ("step s", "step_s", "{:>7.1f}"),
)
TABLE_HEADER = " ".join(title.rjust(len(fmt.format(0 if "d" in fmt else 0.0))) for title, _, fmt in TABLE_COLUMNS)


def table_row(record: dict[str, Any]) -> str:
    cells = []
    for _, key, fmt in TABLE_COLUMNS:
        value = record.get(key)
        width = len(fmt.format(0 if "d" in fmt else 0.0))
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-".rjust(width))
    return " ".join(cells)


def before_after_table(summary: dict[str, Any]) -> str:
    """The run's result in a few lines: held-out accuracy and length before and after training."""
    before, after = summary.get("before"), summary.get("after")
    lines = [f"run {summary['out']}: {summary['steps']} steps" + ("" if summary["finished"] else " (stopped early)")]
    if before is None or after is None:
        training = summary.get("training")
        if training:
            first, last = training["first_step"], training["last_step"]
            lines.append(
                f"training rollouts: accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, mean length "
                f"{first['mean_response_length']:.1f} -> {last['mean_response_length']:.1f} tokens"
            )
        return "\n".join(lines)
    rows = (
        ("accuracy", "accuracy", "{:.1%}"),
        ("mean response length", "mean_length", "{:.1f}"),
        ("p90 response length", "p90_length", "{:.0f}"),
        ("truncated", "truncation_rate", "{:.1%}"),
    )
    lines.append(f"held-out evaluation ({after['samples']} samples)")
    lines.append(f"  {'':<22}{'before':>10}{'after':>10}{'change':>10}")
    for title, key, fmt in rows:
        b, a = before[key], after[key]
        if key in ("mean_length", "p90_length"):
            change = f"{(a - b) / b:+.1%}" if b else "-"
        else:
            change = f"{(a - b) * 100:+.1f} pt"
        lines.append(f"  {title:<22}{fmt.format(b):>10}{fmt.format(a):>10}{change:>10}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- curves


def plot_curves(records: list[dict[str, Any]], history: dict[str, Any], path: Path) -> None:
    """Accuracy and mean response length per step (training rollouts; held-out evaluations as points),
    and the trainer-sampler mismatch when the run measured it (not in the bypass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    measured = [r for r in records if "mismatch_logp_abs_max" in r]
    fig, axes = plt.subplots(1, 3 if measured else 2, figsize=(15 if measured else 10, 3.8))
    acc_ax, len_ax = axes[:2]
    acc_ax.plot(steps, [r["accuracy"] for r in records], label="training rollouts")
    len_ax.plot(steps, [r["mean_response_length"] for r in records], label="training rollouts")
    len_ax.plot(steps, [r["p90_response_length"] for r in records], alpha=0.5, linestyle="--", label="p90")
    evals = [(0, history.get("before"))] + [(r["step"], r.get("eval")) for r in records]
    evals.append((steps[-1], history.get("after")))
    evals = [(s, e) for s, e in evals if e]
    if evals:
        acc_ax.plot([s for s, _ in evals], [e["accuracy"] for _, e in evals], "o", label="held-out eval")
        len_ax.plot([s for s, _ in evals], [e["mean_length"] for _, e in evals], "o", label="held-out eval")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    len_ax.set(xlabel="step", ylabel="tokens", title="response length")
    if measured:
        gap_ax, at = axes[2], [r["step"] for r in measured]
        gap_ax.plot(at, [r["mismatch_logp_abs_max"] for r in measured], label="max |dlogp|")
        gap_ax.plot(at, [r["mismatch_logp_abs_mean"] for r in measured], label="mean |dlogp|")
        gap_ax.plot(at, [r["mismatch_kl_k3"] for r in measured], label="KL k3")
        gap_ax.set(xlabel="step", ylabel="nats", title="trainer-sampler mismatch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------ metrics.jsonl on disk


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A torn last line (the process died mid-write, or the disk filled) is
    dropped with a one-line warning: its step is redone by the resume. A bad line anywhere else is damage
    the run cannot explain: an error naming the line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (line_no, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record")
        except ValueError:
            if k == len(numbered) - 1:
                print(f"dler train: warning: {path}:{line_no}: dropped a torn last line", file=sys.stderr, flush=True)
                break
            raise UserError(
                f"{path}:{line_no} is not a metrics record (the file was edited or damaged); fix or delete that line"
            ) from None
        records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step``: they belong to the timeline the resume abandons."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    _write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)
