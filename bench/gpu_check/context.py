"""What every stage gets inside its own process (``--stage-child NAME``): a :class:`StageContext`, and the helpers
the stages share.

A stage fills ``ctx.record``: ``status`` (passed / failed / skipped / not run), ``reason``, ``figures`` (every
number, for gpu_report.json), ``tables`` (for gpu_report.md), ``parts`` (sub-checks, each with its own status) and
``targets`` (the performance targets, met or not). ``ctx.save()`` writes it to OUT/stages/NAME.json as the stage
goes, so a stage killed at its budget keeps what it finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageContext:
    name: str
    out: Path
    smoke: bool
    wheels: Path | None
    budget_s: float = 600.0  # the parent kills this process then; parts that start commands fit inside it
    record: dict = field(default_factory=lambda: dict(status="failed", reason="did not finish", figures={}))
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        path = self.out / "stages" / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(path)  # a stage killed mid-write leaves the previous complete file

    def earlier(self, stage: str) -> dict:
        """An earlier stage's figures ({} if it did not run or failed before measuring)."""
        path = self.out / "stages" / f"{stage}.json"
        return json.loads(path.read_text()).get("figures", {}) if path.exists() else {}

    def part(self, name: str, status: str, reason: str = "", **figures) -> dict:
        part = dict(name=name, status=status, reason=reason, **figures)
        self.record.setdefault("parts", []).append(part)
        self.save()
        return part

    def finish_from_parts(self) -> None:
        """failed if any part failed, passed if any passed, else skipped (each part keeps its reason)."""
        statuses = [p["status"] for p in self.record.get("parts", [])]
        if "failed" in statuses:
            failed = [p["name"] for p in self.record["parts"] if p["status"] == "failed"]
            self.record.update(status="failed", reason="failed: " + ", ".join(failed))
        elif "passed" in statuses:
            self.record.update(status="passed", reason="")
        else:
            self.record.update(status="skipped", reason="; ".join(p["reason"] for p in self.record.get("parts", [])))
        self.save()


def judge_only_on_a_gpu(ctx: StageContext, targets: list[dict], cuda: bool) -> list[dict]:
    """The targets are for the GPU shapes: a CPU or --smoke run shows the figures, judges none."""
    if cuda and not ctx.smoke:
        return targets
    why = "smoke mode: tiny shapes" if ctx.smoke else "a CPU run"
    for t in targets:
        if t.get("met") is not None:
            t.update(met=None, reason=f"{why}, not judged (the target is for the GPU shapes)")
    return targets


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env(**extra) -> dict:
    """The environment of a command a stage starts: this process's (its PYTHONPATH names the checkout)."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env
