"""Where the CPU demo's policies go wrong: the errors of ``dler eval`` samples on ``toy-arith``, by kind.

The demo's warm start answers with worked steps, ending in the result line ``A + B = R.``, then 0 to 12
redundant ``Check: ...`` lines, then ``\\boxed{R}`` (``trainer/models/demo.py``). A length penalty teaches a
policy to drop the re-checks, so this splits each model's samples into those with and without a re-check
and counts, per split, the correct ones and three kinds of error:

* ``result wrong``: the result line's arithmetic is wrong (``A op B != R``);
* ``boxed != result``: the result line is right but the boxed answer is another number;
* ``other``: anything else (operands copied wrong, no result line, no boxed answer).

usage: python bench/demo_error_breakdown.py EVAL_OUT [EVAL_OUT ...]
  EVAL_OUT: a ``dler eval --out`` folder (its samples/MODEL/DATA.jsonl are read)

To sample as the demo's own held-out evaluation does, give ``dler eval`` that evaluation's settings, top-p
1.0 included (``dler eval``'s default is 0.95, which drops the tiny model's rarest tokens and with them
most of its garbled lines), e.g. for the warm start and one run's last checkpoint:

  dler eval --model warm=demo-verbose-arith --model run=RUN/checkpoints/step-00000030 \
    --data "arith=builtin:toy-arith?difficulty=1&size=256&seed=1" --samples 4 --temperature 1.0 --top-p 1.0 \
    --max-tokens 320 --template plain --checker exact --dtype float32 --scaling-k none --out EVAL_OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

RESULT_LINE = re.compile(r"^(\d+) ([+-]) (\d+) = (-?\d+)\.$", re.MULTILINE)  # re-checks start with "Check:"
BOXED = re.compile(r"\\boxed\{([^}]*)\}")
KINDS = ("correct", "result wrong", "boxed != result", "other")


def kind(sample: dict) -> str:
    """The sample's kind, one of :data:`KINDS`."""
    if sample["correct"]:
        return "correct"
    line, boxed = RESULT_LINE.search(sample["text"]), BOXED.search(sample["text"])
    if line is None:
        return "other"
    a, op, b, r = int(line[1]), line[2], int(line[3]), int(line[4])
    if (a + b if op == "+" else a - b) != r:
        return "result wrong"
    if boxed is not None and boxed[1].strip() != line[4]:
        return "boxed != result"
    return "other"


def breakdown(samples: list[dict]) -> dict[str, collections.Counter]:
    """Split ("no re-check" / "re-checks") -> kind -> count."""
    out: dict[str, collections.Counter] = {"no re-check": collections.Counter(), "re-checks": collections.Counter()}
    for s in samples:
        out["re-checks" if "Check:" in s["text"] else "no re-check"][kind(s)] += 1
    return out


def table(rows: dict[str, dict[str, collections.Counter]]) -> str:
    lines = [
        "| model | responses | share | " + " | ".join(KINDS) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in KINDS) + " |",
    ]
    for name, splits in rows.items():
        total = sum(sum(c.values()) for c in splits.values())
        for split, counts in splits.items():
            n = sum(counts.values())
            if n:
                cells = " | ".join(f"{counts[k] / n:.1%}" for k in KINDS)
                lines.append(f"| {name} | {split} ({n}) | {n / total:.0%} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_out", nargs="+", type=Path, help="dler eval --out folders")
    args = parser.parse_args()
    rows = {}
    for folder in args.eval_out:
        files = sorted((folder / "samples").glob("*/*.jsonl"))
        if not files:
            raise SystemExit(f"{folder}: no samples/MODEL/DATA.jsonl (is it a dler eval --out folder?)")
        for path in files:
            samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows[f"{path.parent.name} ({path.stem})"] = breakdown(samples)
    print(table(rows))


if __name__ == "__main__":
    main()
