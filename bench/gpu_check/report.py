"""gpu_report.json (every figure) and gpu_report.md (the tables a person reads) from the stage records."""

from __future__ import annotations

import json
from pathlib import Path

MACHINE_KEYS = ("date", "gpu", "driver", "cuda", "torch", "triton", "transformers", "python", "nvcc")


def machine(stages: list[dict]) -> dict:
    """The versions and the device, from the environment stage (\"unknown\" where it did not record them)."""
    env = next((s for s in stages if s["name"] == "environment"), {}).get("figures", {})
    return {key: env.get(key, "unknown (environment stage did not record it)") for key in MACHINE_KEYS}


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _value(target: dict) -> str:
    value = target.get("value")
    if value is None:
        return target.get("reason") or "-"
    return f"{value:.2f}"


def _note(target: dict) -> str:
    """The reason beside a measured value (an unmeasured one shows its reason as the value)."""
    return target.get("reason", "") if target.get("value") is not None else ""


def _met(target: dict) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[target.get("met")]


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = [
        "# GPU check",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {m['date']}; mode: {'smoke (tiny shapes)' if report['smoke'] else 'full'}; "
        f"total {report['total_s']:.1f} s (full-run target: <= {report['total_budget_s']:.0f} s)",
        "",
        *_table(["GPU", "driver", "CUDA", "torch", "triton", "transformers", "python"],
               [[m["gpu"], m["driver"], m["cuda"], m["torch"], m["triton"], m["transformers"], m["python"]]]),
        "",
        "## Stages",
        "",
        *_table(["#", "stage", "status", "seconds", "budget s", "reason"],
                [[i, f"{s['name']}: {s['title']}", s["status"], f"{s['elapsed_s']:.1f}", f"{s['budget_s']:.0f}",
                  s.get("reason", "")] for i, s in enumerate(report["stages"], 1)]),
    ]  # fmt: skip
    for s in report["stages"]:
        parts, tables, targets = s.get("parts", []), s.get("tables", []), s.get("targets", [])
        notes = s.get("notes", [])
        if not (parts or tables or targets or notes or s.get("error")):
            continue
        lines += ["", f"## {s['name']}: {s['title']} ({s['status']})"]
        if parts:
            rows = [[p["name"], p["status"], p.get("reason", ""),
                     _counts(p), f"{p['seconds']:.1f}" if "seconds" in p else "-"] for p in parts]  # fmt: skip
            lines += ["", *_table(["part", "status", "reason", "counts", "seconds"], rows)]
        for t in tables:
            lines += ["", f"**{t['title']}**", "", *_table(t["columns"], t["rows"])]
        if targets:
            rows = [[t["target"], _value(t), t["goal"], _met(t), _note(t)] for t in targets]
            lines += ["", "Targets:", "", *_table(["target", "measured", "goal", "verdict", "note"], rows)]
        if notes:
            lines += ["", *[f"- {note}" for note in notes]]
        if s.get("error"):
            lines += ["", "Error (last lines of its log, `" + s.get("log", "") + "`):", "", "```", s["error"], "```"]
    path.write_text("\n".join(lines) + "\n")


def _counts(part: dict) -> str:
    if "passed" in part:
        return f"{part['passed']} passed, {part['failed']} failed, {part['skipped']} skipped"
    return "-"
