"""DRQA data (``dler drqa-data``): concise chains from batched prompts, verbose ones from single prompts.

A model asked several questions in one prompt reasons more briefly about each (the idea of
"Dynamic Reasoning Quota Allocation", DRQA).
This module turns that into labelled data (the reward that reads it is described in point 4):

1. Questions are grouped ``k`` at a time (k = 2 by default) into one prompt that asks for the solutions in
   order, each opened by a ``Question i:`` line and closed by its answer in ``\\boxed{}``
   (:func:`batched_prompt`). The same questions are also asked alone, with the training template.
2. :func:`split_answers` cuts a batched response into its per-question chains: by the ``Question i`` /
   ``Problem i`` markers (in whatever order the model wrote them; when a number appears more than once, the
   last of its parts that holds a boxed answer, else its last part), or, when there are no markers, at the
   boxed answers if there are exactly k of them. A question it cannot find gets no chain.
3. Labels: a correct chain from a batched prompt is ``correct-concise``, a correct response to a single prompt
   ``correct-verbose``; every wrong one is ``wrong``. Records (jsonl): ``question``, ``answer``, ``id``,
   ``chain``, ``label``, ``tokens`` (of the chain, by the model's tokenizer), ``source`` (batched/single),
   ``group`` and ``position`` (which prompt, which slot).
4. The ``drqa`` reward (``reward.penalty.name=drqa``, ``reward.penalty.drqa_data=FILE``; its budgets are
   :class:`trainer.reward.budgets.ConciseLengths`) labels a rollout the same way: correct and no longer than the
   question's concise length (the median tokens of its correct-concise chains) scores 1, correct but
   longer ``drqa_verbose_reward``, wrong 0.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..fsutil import UserError, atomic_file, check_output
from ..reward.budgets import LABELS

_MARKER = re.compile(r"^[ \t>*#_]*(?:question|problem|q)[ \t]*(\d{1,3})\b[ \t]*[:.)]?", re.IGNORECASE | re.MULTILINE)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def batched_prompt(questions: Sequence[str]) -> str:
    """One user message asking ``len(questions)`` questions, to be answered in order with markers."""
    k = len(questions)
    body = "\n\n".join(f"Question {i}: {q.strip()}" for i, q in enumerate(questions, start=1))
    return (
        f"Answer the following {k} questions. Solve them one after another. Begin the solution of question i "
        "with a line 'Question i:' and end it with its final answer within \\boxed{}.\n\n" + body
    )


def split_answers(response: str, k: int) -> list[str | None]:
    """The chain of each of the ``k`` questions in one batched response (None where it is missing)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    marks = [(m.start(), int(m.group(1))) for m in _MARKER.finditer(response)]
    marks = [(pos, i) for pos, i in marks if 1 <= i <= k]
    chains: list[str | None] = [None] * k
    if marks:
        for (pos, i), nxt in zip(marks, [*marks[1:], (len(response), 0)]):
            part = response[pos : nxt[0]].strip()
            current = chains[i - 1]
            # A restated question (no answer yet) must not hide the worked solution that follows it.
            if current is None or _BOX.search(part) or not _BOX.search(current):
                chains[i - 1] = part
        return chains
    ends = [_box_end(response, m.end()) for m in _BOX.finditer(response)]
    if len(ends) == k:
        starts = [0, *ends[:-1]]
        return [response[a:b].strip() or None for a, b in zip(starts, ends)]
    return chains


def _box_end(text: str, pos: int) -> int:
    """Index just past the brace group opened at or after ``pos`` (``len(text)`` if unclosed)."""
    depth, i = 0, pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def label(correct: bool, batched: bool) -> str:
    if not correct:
        return "wrong"
    return "correct-concise" if batched else "correct-verbose"


# ----------------------------------------------------------------------------------------- the data set


def build_drqa_data(
    model: str,
    data: str,
    out: Path,
    *,
    k: int = 2,
    samples: int = 4,
    max_tokens: int = 1024,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    limit: int | None = None,
    template: str = "r1",
    checker: str = "math",
    engine: str = "auto",
    engine_options: Mapping | None = None,
    overwrite: bool = False,
) -> dict:
    """Generate, split, check and label; write the jsonl ``out`` atomically; return a summary."""
    from ..data import Example, build_prompts
    from ..model_files.hf_folder import load_tokenizer
    from ..reward.answers import AnswerChecker
    from ..rollout.engines import make_engine, resolve_engine
    from .benchmarks import load_benchmark
    from .evaluate import ModelSpec, parse_model

    if k < 1 or samples < 1 or max_tokens < 1:
        raise UserError(f"-k, --samples and --max-tokens must be >= 1, got {k}, {samples}, {max_tokens}")
    out = Path(out).expanduser()
    check_output(out, "drqa-data", overwrite=overwrite, kind="file")
    spec: ModelSpec = parse_model(model)
    inputs = [("--model", spec.path)] + ([("--data", Path(data))] if Path(data).exists() else [])
    check_output(out, "drqa-data", overwrite=overwrite, kind="file", inputs=inputs)
    examples = load_benchmark(data, limit=limit, seed=seed).examples
    if len(examples) < k:
        raise UserError(f"{data} has {len(examples)} questions; a batched prompt needs k={k}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    groups = [[examples[j] for j in order[i : i + k]] for i in range(0, len(order) - k + 1, k)]

    tokenizer = load_tokenizer(spec.path)
    chat = bool(getattr(tokenizer, "chat_template", None))
    # A batched prompt is already the whole user message: the "plain" template passes it through.
    batched = [Example(batched_prompt([e.question for e in g]), "", f"batch:{i}", "drqa") for i, g in enumerate(groups)]
    batched_ids = [p.token_ids for p in build_prompts(tokenizer, batched, template="plain", chat=chat)]
    single_ids = [p.token_ids for p in build_prompts(tokenizer, examples, template=template, chat=chat)]
    kind = resolve_engine(engine)
    options = dict(engine_options or {})
    if kind == "vllm":
        options.setdefault("max_model_len", max(map(len, batched_ids + single_ids)) + max_tokens)
    eng = make_engine(kind, spec.path, seed=seed, **options)
    started = time.perf_counter()
    sampling = dict(n=samples, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    batched_out = eng.generate(batched_ids, seed=seed, **sampling)
    # Another seed for the single prompts: their samples are not drawn from the batched prompts' stream.
    single_out = eng.generate(single_ids, seed=seed + 1, **sampling)
    seconds = time.perf_counter() - started

    records, missing = [], 0
    pending = []  # (record, gold) to check in one call
    for gi, (group, outs) in enumerate(zip(groups, batched_out)):
        for sample in outs:
            for pos, (example, chain) in enumerate(zip(group, split_answers(sample.text, k))):
                if chain is None:
                    missing += 1
                    continue
                pending.append((_record(example, chain, "batched", gi, pos), example.answer))
    for example, outs in zip(examples, single_out):
        for sample in outs:
            rec = _record(example, sample.text, "single", None, 0)
            rec["tokens"] = len(sample.token_ids)
            pending.append((rec, example.answer))
    with AnswerChecker(checker) as check:
        scores = check.score([r["chain"] for r, _ in pending], [g for _, g in pending])
    for (rec, _), score in zip(pending, scores):
        rec["label"] = label(score > 0, rec["source"] == "batched")
        if rec["tokens"] is None:
            rec["tokens"] = len(tokenizer(rec["chain"], add_special_tokens=False).input_ids)
        records.append(rec)

    with atomic_file(out) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return summarise(records, missing=missing, seconds=seconds)


def _record(example, chain: str, source: str, group: int | None, position: int) -> dict:
    return {
        "id": example.id,
        "question": example.question,
        "answer": example.answer,
        "chain": chain,
        "label": None,
        "tokens": None,
        "source": source,
        "group": group,
        "position": position,
    }


def summarise(records: Sequence[Mapping], *, missing: int = 0, seconds: float | None = None) -> dict:
    """Counts and mean tokens per label, and accuracy and mean tokens per source."""
    out: dict = {"records": len(records), "missing_chains": missing}
    if seconds is not None:
        out["generate_seconds"] = round(seconds, 2)
    for name in LABELS:
        tokens = [r["tokens"] for r in records if r["label"] == name]
        out[name] = {"count": len(tokens), "mean_tokens": statistics.fmean(tokens) if tokens else None}
    for source in ("batched", "single"):
        rs = [r for r in records if r["source"] == source]
        out[source] = {
            "chains": len(rs),
            "accuracy": sum(r["label"] != "wrong" for r in rs) / len(rs) if rs else None,
            "mean_tokens": statistics.fmean(r["tokens"] for r in rs) if rs else None,
        }
    return out
