"""Evaluation benchmarks from local files: MATH-500, AIME-24, AMC, Minerva, OlympiadBench and the like.

The public releases of these benchmarks name their fields differently, and two of them do not store a
plain answer. One record normaliser reads them all (``.jsonl``/``.json``/``.parquet`` or a ``datasets``
folder, through :func:`trainer.data.load_examples`); the fields it reads, first match wins:

========== ============================================ ====================================
field      names tried                                  releases that use them
========== ============================================ ====================================
question   ``problem``, ``question``, ``Problem``,       MATH-500, AIME (``problem``/``Problem``),
           ``Question``, ``prompt``                     AMC, Minerva, OlympiadBench (``question``)
answer     ``answer``, ``Answer``, ``final_answer``,     ``final_answer`` is OlympiadBench's list
           ``expected_answer``                          (one item, or several joined by ", ")
           else the last ``\\boxed{}`` of ``solution``    Minerva as released with Qwen2.5-Math
id         ``unique_id``, ``id``, ``ID``, ``idx``        (else ``NAME:row``)
========== ============================================ ====================================

Specs: ``PATH`` (named after the file stem), ``NAME=PATH`` to name it, or ``builtin:NAME?...`` for the
generated tasks of :mod:`trainer.data`. A row without a question or an answer is an error, not a skip:
an evaluation that silently drops questions reports a number for another benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..data import BUILTIN_PREFIX, Example, FieldMap, load_examples
from ..fsutil import UserError
from ..reward.answer_extraction import extract_boxed

QUESTION_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "expected_answer")
SOLUTION_FIELDS = ("solution", "Solution")
ID_FIELDS = ("unique_id", "id", "ID", "idx")
# What a user of dler eval / drqa-data can do about a bad row: these commands have no option to skip rows,
# on purpose (see the module docstring), so the hint must not name load_examples' on_bad_row.
BAD_ROW_HINT = (
    "fix or remove the row: a benchmark is scored on all of its questions, so malformed rows are never skipped"
)


def benchmark_record(record: Mapping) -> dict:
    """``record`` as ``{"question", "answer", "id"?}``; raises ValueError naming what is missing."""
    question = next((record[f] for f in QUESTION_FIELDS if record.get(f) is not None), None)
    if question is None:
        raise ValueError(f"no question field (tried {', '.join(QUESTION_FIELDS)})")
    answer = next((record[f] for f in ANSWER_FIELDS if record.get(f) is not None), None)
    if answer is None:
        solution = next((record[f] for f in SOLUTION_FIELDS if isinstance(record.get(f), str)), None)
        answer = extract_boxed(solution) if solution is not None else None
        if answer is None:
            also = "no \\boxed{} in its solution" if solution is not None else f"no {' or '.join(SOLUTION_FIELDS)}"
            raise ValueError(f"no answer field (tried {', '.join(ANSWER_FIELDS)}; {also})")
    if isinstance(answer, (list, tuple)):
        items = [_scalar_text(a) for a in answer]
        if not items or not all(items):
            raise ValueError(f"answer list {list(answer)!r} is empty or has empty items")
        answer = ", ".join(items)
    out = {"question": question, "answer": answer}
    ident = next((record[f] for f in ID_FIELDS if record.get(f) is not None), None)
    if ident is not None:
        out["id"] = ident if isinstance(ident, str) else str(ident)
    return out


def _scalar_text(value) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass(frozen=True)
class Benchmark:
    name: str
    spec: str
    examples: list[Example]


def parse_spec(spec: str) -> tuple[str, str]:
    """``(name, source)`` of ``NAME=PATH``, ``PATH`` or ``builtin:NAME?...``."""
    if spec.startswith(BUILTIN_PREFIX):
        return spec[len(BUILTIN_PREFIX) :].partition("?")[0], spec
    name, eq, path = spec.partition("=")
    if eq and name and "/" not in name:
        return name, path
    return Path(spec).stem, spec


def load_benchmark(spec: str, *, limit: int | None = None, seed: int = 0) -> Benchmark:
    """The examples of one benchmark spec; every malformed row is an error (a ``UserError``)."""
    name, source = parse_spec(spec)
    if not name:
        raise UserError(f"data spec {spec!r} has an empty name; write NAME=PATH or PATH")
    if source.startswith(BUILTIN_PREFIX):
        examples = load_examples(source, limit=limit, seed=seed)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"data set {path} not found (from --data {spec!r})")
        examples = load_examples(
            path,
            fields=FieldMap(question="question", answer="answer", id="id"),
            on_bad_row="error",
            limit=limit,
            prepare=benchmark_record,
            error_hint=BAD_ROW_HINT,
        )
    return Benchmark(name, spec, examples)


def load_benchmarks(specs: list[str], *, limit: int | None = None, seed: int = 0) -> list[Benchmark]:
    benches = [load_benchmark(s, limit=limit, seed=seed) for s in specs]
    names = [b.name for b in benches]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"two data sets are named {dup!r}; name them apart with NAME=PATH")
    return benches
