"""Prompt datasets for RL training: loading, the built-in toy task, prompt templates, and a resumable order.

What the trainer needs from data is small: a list of (question, reference answer) pairs with a stable id
each, token ids of the prompts the rollout engine is fed, and an order of prompts that is deterministic
and can be resumed from a checkpoint exactly where it stopped. This module provides those four things:

- :func:`load_examples` reads ``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, a Hugging Face ``datasets``
  folder (``save_to_disk``), or a built-in generator (``builtin:toy-arith?difficulty=1-3&size=500``),
  validates every row, and reports malformed rows by file and line (skipped with one warning, or an error).
- :func:`toy_arith` generates exact-answer arithmetic with a difficulty knob, for demos and tests
  that have no data set to download.
- :data:`TEMPLATES`, :func:`format_prompt` and :func:`build_prompts` turn examples into token ids,
  dropping (and reporting, by file and line) prompts that are too long; a question is measured in characters
  before it is tokenised, so one huge row costs a few copies of its text, never its tokens.
- :class:`PromptStream` hands out examples in a per-epoch permutation, ``k`` at a time, and saves and
  restores its cursor as a plain JSON-serialisable dict.

Problems the user can fix (bad path, malformed data, a checkpoint of another data set) raise
:class:`~trainer.fsutil.UserError`; programming errors (bad argument values) raise ``ValueError``.
Recoverable data problems are reported as :class:`DataWarning` through :mod:`warnings`, so that they are
visible without logging configuration and can be turned into errors with ``-W error::trainer.data.DataWarning``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from trainer.chunking import chunks_by_size
from trainer.fsutil import UserError

__all__ = [
    "BUILTIN_PREFIX",
    "QUESTION_FALLBACKS",
    "TEMPLATES",
    "DataWarning",
    "Example",
    "FieldMap",
    "Prompt",
    "PromptStream",
    "build_prompts",
    "fingerprint",
    "format_prompt",
    "load_examples",
    "max_prompt_chars",
    "toy_arith",
]


class DataWarning(UserWarning):
    """Rows or prompts were dropped; training goes on without them."""


@dataclass(frozen=True)
class Example:
    """One training prompt: the question, its reference answer, a unique id, and where it came from.

    ``answer`` is always a string (the reward function compares text); ``id`` is unique within a loaded
    data set, which per-prompt state (such as DA-DLER difficulty) can be keyed by. ``where`` is the row's
    location in its file (``data.jsonl:17``) for messages about it; empty for generated examples. It is not
    part of an example's identity (equality, :func:`fingerprint`): the same row moved in its file is the same
    example.
    """

    question: str
    answer: str
    id: str
    source: str
    where: str = field(default="", compare=False)


# Column names tried, in order, for the question when FieldMap.question is left unset. They are the
# names common math data sets use (GSM8K: question, MATH: problem, many RL sets: prompt). There is no
# such list for the answer: "solution" columns hold whole worked solutions, not a checkable answer.
QUESTION_FALLBACKS = ("question", "problem", "prompt")


@dataclass(frozen=True)
class FieldMap:
    """Which field of a row holds what.

    ``question=None`` (the default) means "the first of ``question``, ``problem``, ``prompt`` that the
    row has"; naming a field explicitly turns that guessing off, so a typo is reported rather than
    silently matched to another column. ``id`` and ``source`` are optional columns: when unset, or when
    a row lacks them (or has null), the id is ``f"{dataset name}:{row index}"`` and the source is the
    dataset name (the file stem, folder name, or builtin name).
    """

    question: str | None = None
    answer: str = "answer"
    id: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        for name in ("question", "answer", "id", "source"):
            value = getattr(self, name)
            if value is None and name != "answer":
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"FieldMap.{name} must be a non-empty field name, got {value!r}")

    @property
    def question_candidates(self) -> tuple[str, ...]:
        return QUESTION_FALLBACKS if self.question is None else (self.question,)

    def columns(self) -> tuple[str, ...]:
        """Every field name this map may read: columnar readers load only these columns."""
        optional = tuple(name for name in (self.id, self.source) if name is not None)
        return (*self.question_candidates, self.answer, *optional)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

BUILTIN_PREFIX = "builtin:"
_ON_BAD_ROW = ("skip", "error")
_SHOWN_BAD_ROWS = 5  # locations quoted in the skip warning; the rest are only counted
_SKIP_BAD_HINT = "fix the data or pass on_bad_row='skip' (in a dler train config: data.on_bad_row=skip)"
_EXPECTED = "a .jsonl/.ndjson, .json or .parquet file, a datasets folder written by save_to_disk, or builtin:toy-arith"


@dataclass(frozen=True)
class _Row:
    """A raw record as a reader found it, before validation."""

    index: int  # 0-based record index in the source: the suffix of a default id
    where: str  # location for messages: "data.jsonl:17" (line), "data.parquet[16]" (row index)
    value: Any  # the parsed record; should be a dict
    error: str | None = None  # a problem found while parsing (invalid JSON), reported like a bad row


def load_examples(
    spec: str | Path,
    *,
    fields: FieldMap | None = None,
    on_bad_row: str = "skip",
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    prepare: Callable[[Mapping], Mapping] | None = None,
    error_hint: str | None = None,
) -> list[Example]:
    """Load and validate the examples of a data file, a ``datasets`` folder, or a builtin generator.

    ``spec`` is a path (format chosen by its suffix, or a folder for ``datasets``) or
    ``builtin:NAME?key=value&...`` (see :func:`toy_arith` for ``toy-arith``'s keys; ``seed`` there overrides
    the ``seed`` argument, which only builtins use; builtins also ignore ``fields`` and ``on_bad_row``, since
    their rows are valid by construction). ``split`` picks the split of a ``DatasetDict`` folder
    and is ignored otherwise. ``limit`` keeps the first ``limit`` valid examples in source order: shuffling
    is :class:`PromptStream`'s job, so that a limit is a stable prefix.

    A row is malformed when it is not an object, lacks the question or answer field, the question is not a
    non-empty string, the answer is not a non-empty string or a finite number, an id/source value is not a
    string (or int, for ids), or its id repeats an earlier row's. ``on_bad_row="skip"`` drops such rows with
    one :class:`DataWarning` that counts them and quotes the first few; ``"error"`` raises
    :class:`UserError` for the first one. Either way the location is ``file:line`` for JSON Lines and
    ``file[row index]`` for JSON lists, parquet and ``datasets`` folders.

    ``prepare`` rewrites each record (a mapping) before validation, for formats whose fields need more than a
    name (a list answer, an answer inside a solution); a ``ValueError`` it raises marks the row bad with its
    message. With ``prepare`` every column is read, since it may look at any.

    ``error_hint`` is what the error for a bad row (``on_bad_row="error"``) tells the user to do. The default
    names ``on_bad_row`` (and ``data.on_bad_row`` of a ``dler train`` config); a caller whose users have no
    such option (``dler eval`` reads a benchmark whole) says what they can do instead.
    """
    _check_on_bad_row(on_bad_row)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    fields = FieldMap() if fields is None else fields

    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        examples = _load_builtin(text, seed)
        return examples[:limit] if limit is not None else examples

    path = Path(text).expanduser()
    name, rows = _open_rows(path, None if prepare is not None else fields, split)
    examples, bad = _validate_rows(rows, fields, name, prepare)
    _report_bad_rows(bad, on_bad_row, total=len(examples) + len(bad), path=str(path), hint=error_hint)
    if not examples:
        raise UserError(_no_examples_message(str(path), bad))
    return examples[:limit] if limit is not None else examples


def _open_rows(path: Path, fields: FieldMap | None, split: str) -> tuple[str, list[_Row]]:
    """Pick the reader for ``path``; return the data set's name (the default source) and its raw rows.
    Columnar readers load only the columns ``fields`` may read (every column when it is None)."""
    if not path.exists():
        raise UserError(f"data set {path} not found; expected {_EXPECTED}")
    if path.is_dir():
        return path.name, _read_datasets_folder(path, fields, split)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json}
    suffix = path.suffix.lower()
    if suffix in readers:
        return path.stem, readers[suffix](path)
    if suffix == ".parquet":
        return path.stem, _read_parquet(path, fields)
    raise UserError(f"cannot read {path}: unknown file type {path.suffix or '(no suffix)'!r}; expected {_EXPECTED}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path) -> list[_Row]:
    """One JSON value per line; blank lines are ignored and do not count as rows (but do count as lines).

    Lines end at ``\n`` only (a ``\r`` before it is JSON whitespace): ``str.splitlines`` would also split
    at U+2028 and other separators that ``json.dumps(ensure_ascii=False)`` leaves raw inside strings.
    The file is read one line at a time, so a huge row is held at most as its bytes, its text and its
    parsed value at once, never next to a copy of the whole file.
    """
    rows = []
    offset = 0  # of the line in the file, for the byte position of a decoding error
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):  # binary lines end at b"\n" only
                start, offset = offset, offset + len(raw)
                try:
                    # -sig on the first line: tolerate the BOM some editors write
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} is not UTF-8 text (byte {start + e.start}); save it as UTF-8") from None
                del raw
                if not line or line.isspace():  # not line.strip(): that would copy a huge line once more
                    continue
                where = f"{path}:{line_no}"
                try:
                    rows.append(_Row(len(rows), where, json.loads(line)))
                except json.JSONDecodeError as e:
                    # The column within the line: the parser also saw its "\n" (slicing it off would copy the line).
                    column = min(e.pos, len(line) - line.endswith("\n")) + 1
                    rows.append(_Row(len(rows), where, None, error=f"invalid JSON ({e.msg} at column {column})"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return rows


def _read_json(path: Path) -> list[_Row]:
    """A JSON list of objects. A ``.json`` file holding JSON Lines is read as such.

    ``datasets``' ``to_json`` and pandas' ``to_json(lines=True)`` both write JSON Lines into files named
    ``.json``; refusing them would be pedantic when the intent is unambiguous.
    """
    text = _read_text(path)
    json_lines = False
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # The first non-blank character, without text.lstrip(): that would copy the whole file.
        if not (e.msg == "Extra data" and next((c for c in text if not c.isspace()), "") == "{"):
            raise UserError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); expected a list of objects"
            ) from None
        json_lines = True
    if json_lines:
        del text  # the lines reader streams the file: the whole text need not stay alive meanwhile
        return _read_jsonl(path)
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects (one per example)")
    return [_Row(i, f"{path}[{i}]", value) for i, value in enumerate(data)]


def _read_parquet(path: Path, fields: FieldMap | None) -> list[_Row]:
    """Rows through pyarrow (not pandas: an int column with nulls would turn 7 into 7.0)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    records: list = []
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        columns = None if fields is None else [c for c in dict.fromkeys(fields.columns()) if c in names]
        # Batch by batch: the Arrow copy of one batch, not of the whole table, lives next to the Python rows.
        for batch in parquet.iter_batches(columns=columns):
            records.extend(batch.to_pylist())
            del batch
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt or foreign file
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    return [_Row(i, f"{path}[{i}]", value) for i, value in enumerate(records)]


def _read_datasets_folder(path: Path, fields: FieldMap | None, split: str) -> list[_Row]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then ``split`` is used)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise UserError(
            f"{path} is a folder but not a datasets folder (no state.json or dataset_dict.json); expected {_EXPECTED}"
        )
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise UserError(f"reading {path} needs the datasets package: pip install datasets") from None
    try:
        data = load_from_disk(str(path))
    except Exception as e:  # a damaged folder fails in many ways inside datasets/pyarrow
        raise UserError(f"cannot load the datasets folder {path}: {e}") from None
    where = str(path)
    if isinstance(data, DatasetDict):
        if split not in data:
            raise UserError(f"{path} has no split {split!r}; available splits: {', '.join(data.keys())}")
        data, where = data[split], f"{path}:{split}"
    if fields is not None:
        data = data.select_columns([c for c in dict.fromkeys(fields.columns()) if c in data.column_names])
    records = data.to_list()
    return [_Row(i, f"{where}[{i}]", value) for i, value in enumerate(records)]


class _BadRow(Exception):
    """What is wrong with one row (a one-line message); caught per row, never escapes this module."""


def _validate_rows(
    rows: Iterable[_Row], fields: FieldMap, name: str, prepare: Callable[[Mapping], Mapping] | None = None
) -> tuple[list[Example], list[str]]:
    """Turn raw rows into examples; collect a ``"where: problem"`` message for each bad row, in order."""
    examples: list[Example] = []
    bad: list[str] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        try:
            if row.error is not None:
                raise _BadRow(row.error)
            if prepare is not None and isinstance(row.value, Mapping):
                try:
                    row = _Row(row.index, row.where, prepare(row.value))
                except ValueError as e:
                    raise _BadRow(str(e)) from None
            example = _to_example(row, fields, name)
            if example.id in first_seen:
                raise _BadRow(f"duplicate id {example.id!r} (first at {first_seen[example.id]})")
        except _BadRow as e:
            bad.append(f"{row.where}: {e}")
            continue
        first_seen[example.id] = row.where
        examples.append(example)
    return examples, bad


def _to_example(row: _Row, fields: FieldMap, name: str) -> Example:
    """The example of one row; raises :class:`_BadRow` saying what is wrong with it."""
    record = row.value
    if not isinstance(record, Mapping):
        raise _BadRow(f"row is not an object (got {_type_name(record)})")
    return Example(
        question=_question_text(record, fields.question_candidates),
        answer=_answer_text(record, fields.answer),
        id=_optional_text(record, fields.id, default=f"{name}:{row.index}", allow_int=True),
        source=_optional_text(record, fields.source, default=name, allow_int=False),
        where=row.where,
    )


def _question_text(record: Mapping, candidates: Sequence[str]) -> str:
    field = next((f for f in candidates if f in record), None)
    if field is None:
        also = f" (also tried {', '.join(map(repr, candidates[1:]))})" if len(candidates) > 1 else ""
        raise _BadRow(f"missing field {candidates[0]!r}{also}")
    question = record[field]
    if not isinstance(question, str):
        raise _BadRow(f"field {field!r} must be a string, got {_type_name(question)}")
    if not question.strip():
        raise _BadRow(f"field {field!r} is empty")
    return question


def _answer_text(record: Mapping, field: str) -> str:
    """The answer as text.

    Numbers become their ``str``; a float with an integral value is written as an int (parquet and
    ``datasets`` store a column that mixes ints and floats, or ints and nulls, as floats, and the
    reference answer 7 must not turn into "7.0"). Answers are stripped: they are compared, not shown.
    """
    if field not in record:
        raise _BadRow(f"missing field {field!r}")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(f"field {field!r} must be a string or a number, got {_type_name(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadRow(f"field {field!r} is {value}")
        if value.is_integer() and abs(value) < 2**53:
            value = int(value)
    text = str(value).strip()
    if not text:
        raise _BadRow(f"field {field!r} is empty")
    return text


def _optional_text(record: Mapping, field: str | None, *, default: str, allow_int: bool) -> str:
    """An optional id/source value as text: ``default`` when the field is unset, absent or null."""
    if field is None or record.get(field) is None:
        return default
    value = record[field]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kinds = "a string or an integer" if allow_int else "a string"
        raise _BadRow(f"field {field!r} must be {kinds}, got {_type_name(value)}")
    if not value.strip():
        raise _BadRow(f"field {field!r} is empty")
    return value


def _type_name(value: Any) -> str:
    """JSON-ish names in messages: the user wrote JSON or a table, not Python."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
    if isinstance(value, Mapping):
        return "object"
    return names.get(type(value), type(value).__name__)


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(map(repr, _ON_BAD_ROW))}, got {on_bad_row!r}")


def _report_bad_rows(bad: list[str], on_bad_row: str, *, total: int, path: str, hint: str | None) -> None:
    if not bad:
        return
    if on_bad_row == "error":
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more}; {hint or _SKIP_BAD_HINT}")
    shown = "; ".join(bad[:_SHOWN_BAD_ROWS])
    more = f"; and {len(bad) - _SHOWN_BAD_ROWS} more" if len(bad) > _SHOWN_BAD_ROWS else ""
    warnings.warn(f"skipped {len(bad)} of {total} rows of {path}: {shown}{more}", DataWarning, stacklevel=3)


def _no_examples_message(path: str, bad: list[str]) -> str:
    if not bad:
        return f"{path} has no rows; expected at least one example with a question and an answer"
    return f"{path} has no usable examples: all {len(bad)} rows are malformed (first: {bad[0]})"


# ----------------------------------------------------------------------------------------------------
# Built-in data sets
# ----------------------------------------------------------------------------------------------------


def _load_builtin(spec: str, seed: int) -> list[Example]:
    """``builtin:NAME?key=value&key=value``: a URL-query syntax, familiar and free of shell quoting."""
    name, _, query = spec[len(BUILTIN_PREFIX) :].partition("?")
    if name not in _BUILTINS:
        raise UserError(f"unknown builtin data set {name!r} in {spec!r}; available: {', '.join(sorted(_BUILTINS))}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise UserError(f"cannot parse the parameters of {spec!r}; write them as ?key=value&key=value") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise UserError(f"parameter {key!r} is given twice in {spec!r}")
        params[key] = value
    allowed = _BUILTIN_PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(f"unknown parameter {unknown[0]!r} in {spec!r}; {name} takes: {', '.join(allowed)}")
    try:
        kwargs = {"seed": seed, **{key: _BUILTIN_PARAMS[name][key](value) for key, value in params.items()}}
        return _BUILTINS[name](**kwargs)
    except ValueError as e:
        raise UserError(f"{spec}: {e}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_difficulty(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``3`` or ``"3"`` -> (3, 3); ``"1-3"`` -> (1, 3); a (lo, hi) tuple passes through. Validates the range."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int) and not isinstance(text, bool):
        lo = hi = text
    elif isinstance(text, str):
        low, dash, high = text.partition("-")
        try:
            lo = int(low)
            hi = int(high) if dash else lo
        except ValueError:
            raise ValueError(f"difficulty must be an integer or a range like 1-3, got {text!r}") from None
    else:
        raise ValueError(f"difficulty must be an integer or a range like '1-3', got {text!r}")
    if lo < 1 or hi < lo:
        raise ValueError(f"difficulty must be >= 1 and a range must run low-high, got {text!r}")
    return lo, hi


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from ``rng.random()`` alone.

    ``random.random()`` is the one part of the module whose sequence Python promises to keep across
    versions (``randint``/``shuffle`` may change), so generated data and orders survive an upgrade.
    """
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits; single digits start at 1 (0 makes trivial questions)."""
    return _randint(rng, 10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)


def _evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """``a op b op c ...`` with the usual precedence (``*`` before ``+``/``-``), exactly, without eval."""
    total, sign, term = 0, 1, operands[0]
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            term *= value
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), value
    return total + sign * term


def _arith_problem(rng: random.Random, difficulty: int) -> tuple[list[int], list[str]]:
    """Operands and operators of one problem of the given difficulty.

    1: a + b, single digits (1-9).  2: a + b or a - b, two digits, never negative.
    3: a * b, a two-digit, b single-digit (2-9).
    4+: ``difficulty - 1`` operands joined by random +, -, *; operands have ``2 + (difficulty - 4) // 2``
    digits, except that the right operand of a * is a single digit (2-9) so products stay checkable by hand.
    Precedence makes these multi-step; results may be negative.
    """
    if difficulty == 1:
        return [_number(rng, 1), _number(rng, 1)], ["+"]
    if difficulty == 2:
        a, b = _number(rng, 2), _number(rng, 2)
        if rng.random() < 0.5:
            return [a, b], ["+"]
        return [max(a, b), min(a, b)], ["-"]
    if difficulty == 3:
        return [_number(rng, 2), _randint(rng, 2, 9)], ["*"]
    digits = 2 + (difficulty - 4) // 2
    operands, operators = [_number(rng, digits)], []
    for _ in range(difficulty - 2):
        op = "+-*"[_randint(rng, 0, 2)]
        operators.append(op)
        operands.append(_randint(rng, 2, 9) if op == "*" else _number(rng, digits))
    return operands, operators


def toy_arith(*, size: int = 1000, difficulty: int | str | tuple[int, int] = 1, seed: int = 0) -> list[Example]:
    """Procedural arithmetic with exact integer answers: "What is 3 + 4?" -> "7".

    A task that needs no download and whose difficulty can be tuned to the model, so the RL loop can be
    shown to learn on a CPU. ``difficulty`` is an int >= 1 (forms in :func:`_arith_problem`) or a range
    ``"lo-hi"``: example ``i`` then has difficulty ``lo + i % (hi - lo + 1)``, an exact even mix, so a weak
    model's groups get the spread of right and wrong answers that dynamic sampling keeps. The same
    ``seed`` always gives the same data (a private ``random.Random``; global state is never touched).
    Ids are ``toy-arith:{difficulty}:{i}``; the source is ``toy-arith``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    lo, hi = _parse_difficulty(difficulty)
    rng = random.Random(seed)
    examples = []
    for i in range(size):
        level = lo + i % (hi - lo + 1)
        operands, operators = _arith_problem(rng, level)
        expression = " ".join([str(operands[0]), *(f"{op} {v}" for op, v in zip(operators, operands[1:]))])
        examples.append(
            Example(
                question=f"What is {expression}?",
                answer=str(_evaluate(operands, operators)),
                id=f"toy-arith:{level}:{i}",
                source="toy-arith",
            )
        )
    return examples


_BUILTINS = {"toy-arith": toy_arith}
# Per builtin: the parameters its spec string takes, and how each value is parsed from text.
_BUILTIN_PARAMS = {"toy-arith": {"size": _parse_int, "difficulty": _parse_difficulty, "seed": _parse_int}}


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------

# str.format templates with a {question} field (write literal braces as {{ }}). "r1" is the instruction
# DeepSeek-R1 and its distilled models were trained and evaluated with, which the DLER recipe keeps.
TEMPLATES = {
    "r1": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "plain": "{question}",
}


def format_prompt(question: str, template: str = "r1") -> str:
    """The user message for ``question`` under the named template."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(question=question)


@dataclass(frozen=True)
class Prompt:
    """An example with the token ids fed to the rollout engine (chat template and generation prompt included)."""

    example: Example
    token_ids: list[int]


_ENCODE_BATCH = 512  # conversations per tokenizer call: batching is several times faster than one by one
# Characters of questions per tokenizer call: a tokenizer holds a few hundred bytes per token of its input
# (ids, offsets, token strings), so a call's memory follows its characters, not its number of texts.
_ENCODE_CHARS = 1 << 20
# Unicode normalisation (NFC, NFKC), which some tokenizers apply before splitting, folds at most 4 code
# points into one character (the longest canonical decomposition), so one token may stand for 4 times the
# characters of its vocabulary entry.
_NORMALISATION_FOLD = 4
_SKIP_LONG_HINT = (
    "raise max_prompt_tokens or pass on_bad_row='skip' (in a dler train config: data.max_prompt_tokens, "
    "data.on_bad_row=skip)"
)


def max_prompt_chars(tokenizer, max_prompt_tokens: int) -> int | None:
    """An upper bound on the characters of a text of at most ``max_prompt_tokens`` tokens under ``tokenizer``.

    A question longer than this is too long for certain, and is known to be so without tokenising it (which
    costs a few hundred bytes per token: a 5 MB question took 2 GB). A token never stands for more characters
    than its longest vocabulary entry has: byte-level BPE entries have one character per byte of the text
    they stand for (at least one per character), SentencePiece entries one per character, byte-fallback
    entries (``<0xE2>``) six for one byte. A normalising tokenizer may fold characters (see
    ``_NORMALISATION_FOLD``). This assumes no token swallows a whole run of text, as the unknown token of a
    word-level vocabulary can; the byte-level and byte-fallback tokenizers of causal LMs never do. None when
    the tokenizer has no vocabulary to measure.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    longest = max(map(len, get_vocab()), default=0) if callable(get_vocab) else 0
    if longest < 1:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fold = 1 if backend is not None and getattr(backend, "normalizer", "unknown") is None else _NORMALISATION_FOLD
    return max_prompt_tokens * longest * fold


def build_prompts(
    tokenizer,
    examples: Sequence[Example],
    *,
    template: str = "r1",
    chat: bool = True,
    max_prompt_tokens: int | None = None,
    on_bad_row: str = "skip",
) -> list[Prompt]:
    """Token ids of each example's prompt; prompts over ``max_prompt_tokens`` are dropped with a warning.

    ``chat=True`` wraps the text as one user message in the tokenizer's chat template with the assistant
    generation prompt appended, as the model saw in instruction tuning; ``chat=False`` encodes the bare
    text, with whatever special tokens (BOS) the tokenizer adds by default. Dropping rather than
    truncating: a cut question has a different answer, and the reward would then teach the wrong thing.
    A question is measured in characters before it is tokenised (:func:`max_prompt_chars`): one too long
    for certain is dropped without ever being tokenised, so memory stays bounded by ``max_prompt_tokens``
    whatever the data holds. Dropped prompts are reported by id and location (``file:line``) in one
    :class:`DataWarning`; ``on_bad_row="error"`` raises :class:`UserError` for the first one instead, as
    :func:`load_examples` does for malformed rows. Returns only the surviving prompts, in the order of
    ``examples``.
    """
    if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}")
    _check_on_bad_row(on_bad_row)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; set chat=False to encode prompts as plain text")
    encode = _encode_chat if chat else _encode_plain
    char_limit = None if max_prompt_tokens is None else max_prompt_chars(tokenizer, max_prompt_tokens)
    too_long: list[tuple[int, Example, int | None]] = []  # (position in examples, example, tokens if counted)
    measured: list[tuple[int, Example]] = []
    for i, example in enumerate(examples):
        if char_limit is not None and len(example.question) > char_limit:
            too_long.append((i, example, None))
        else:
            measured.append((i, example))
    prompts: list[tuple[int, Prompt]] = []
    for batch in _batches(measured):
        texts = [format_prompt(example.question, template) for _, example in batch]
        for (i, example), seq in zip(batch, encode(tokenizer, texts)):
            if max_prompt_tokens is not None and len(seq) > max_prompt_tokens:
                too_long.append((i, example, len(seq)))
            else:
                prompts.append((i, Prompt(example, seq)))
    kept = [prompt for _, prompt in prompts]  # measured in order, so already in the order of examples
    if too_long:
        _report_long(sorted(too_long, key=lambda item: item[0]), kept, max_prompt_tokens, on_bad_row)
    return kept


def _batches(items: list[tuple[int, Example]]) -> Iterator[list[tuple[int, Example]]]:
    """Consecutive runs of at most ``_ENCODE_BATCH`` examples and (unless one alone is longer)
    ``_ENCODE_CHARS`` characters of questions."""
    for run in chunks_by_size(items, lambda item: len(item[1].question), _ENCODE_CHARS):
        for start in range(0, len(run), _ENCODE_BATCH):
            yield run[start : start + _ENCODE_BATCH]


def _encode_chat(tokenizer, texts: list[str]) -> list[list[int]]:
    conversations = [[{"role": "user", "content": text}] for text in texts]
    result = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
    return _plain_ids(result)


def _encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    return _plain_ids(tokenizer(texts))


def _plain_ids(result: Any) -> list[list[int]]:
    """``list[list[int]]`` from what a tokenizer returned.

    transformers 5 returns a ``BatchEncoding`` from ``apply_chat_template(tokenize=True)`` (its
    ``return_dict`` now defaults to True); 4.x returned the lists themselves. Both are accepted.
    """
    if isinstance(result, Mapping):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    return [[int(t) for t in seq] for seq in result]


def _size(example: Example, tokens: int | None) -> str:
    return f"{tokens} tokens" if tokens is not None else f"{len(example.question)} characters, not tokenised"


def _report_long(
    too_long: list[tuple[int, Example, int | None]], kept: list[Prompt], max_prompt_tokens: int, on_bad_row: str
) -> None:
    """Warn about the dropped prompts, or raise for the first one (``on_bad_row="error"``, or none left).
    Sizes are tokens where the prompt was tokenised, characters where it was too long to be."""
    total = len(too_long) + len(kept)
    if on_bad_row == "error":
        _, example, tokens = too_long[0]
        where = example.where or f"prompt {example.id!r}"
        more = f" (and {len(too_long) - 1} more too long)" if len(too_long) > 1 else ""
        raise UserError(
            f"{where}: the prompt is longer than max_prompt_tokens={max_prompt_tokens} ({_size(example, tokens)})"
            f"{more}; shorten or remove the row, or {_SKIP_LONG_HINT}"
        )
    counted = [tokens for _, _, tokens in too_long if tokens is not None]
    uncounted = [len(example.question) for _, example, tokens in too_long if tokens is None]
    if not kept:
        shortest = f"{min(counted)} tokens" if counted else f"{min(uncounted)} characters"
        raise UserError(
            f"all {total} prompts are longer than max_prompt_tokens={max_prompt_tokens} "
            f"(shortest: {shortest}); raise max_prompt_tokens"
        )
    longest = f"{max(uncounted)} characters" if uncounted else f"{max(counted)} tokens"
    shown = [f"{e.id} at {e.where}" if e.where else e.id for _, e, _ in too_long[:_SHOWN_BAD_ROWS]]
    more = ", ..." if len(too_long) > _SHOWN_BAD_ROWS else ""
    warnings.warn(
        f"dropped {len(too_long)} of {total} prompts longer than max_prompt_tokens={max_prompt_tokens} "
        f"(longest: {longest}; ids: {', '.join(shown)}{more})",
        DataWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------------


def fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the examples' content and order.

    A saved cursor means "position p of the permutation of this list", so it is only valid for the same
    examples in the same order; ids alone are not enough (toy-arith of another seed has the same ids).
    """
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.question, example.answer, example.source]).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Fisher-Yates from ``random.Random(f"{seed}:{epoch}")`` using only ``random()``.

    A string seed is hashed with SHA-512 (independent of PYTHONHASHSEED), and ``random()`` is the
    sequence Python keeps stable across versions, so a checkpoint resumes the same order after an upgrade.
    Each epoch's order depends on (seed, epoch) alone: computing epoch 7 needs no epochs 0-6.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _randint(rng, 0, i)
        order[i], order[j] = order[j], order[i]
    return order


_STATE_VERSION = 1


class PromptStream:
    """Examples in a fresh permutation each epoch, handed out ``k`` at a time, with a resumable cursor.

    The dynamic sampler keeps asking for more prompts until its batch is full, so requests cross epoch
    boundaries; ``take`` does that seamlessly (the tail of one epoch, then the head of the next). Every
    example appears exactly once per epoch. The cursor (``epoch``, ``position`` within it) plus the seed is
    the whole state: :meth:`state_dict` saves it as plain JSON-able data and :meth:`load_state_dict` on a
    stream over the same examples continues exactly where the original would have.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int, shuffle: bool = True) -> None:
        if len(examples) == 0:
            raise ValueError("PromptStream needs at least one example")
        self._examples = list(examples)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._fingerprint = fingerprint(self._examples)
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next example comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many examples of the current epoch have been handed out (0 <= position < len(examples))."""
        return self._position

    @property
    def num_examples(self) -> int:
        return len(self._examples)

    def _order(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(len(self._examples)))
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, _permutation(len(self._examples), self._seed, epoch))
        return self._order_cache[1]

    def take(self, k: int) -> list[Example]:
        """The next ``k`` examples, continuing into the next epoch(s) as needed."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"take(k) needs an integer k >= 0, got {k!r}")
        out: list[Example] = []
        n = len(self._examples)
        while len(out) < k:
            order = self._order(self._epoch)
            stop = min(n, self._position + k - len(out))
            out.extend(self._examples[i] for i in order[self._position : stop])
            self._position = stop
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return self.take(1)[0]

    def state_dict(self) -> dict:
        """The cursor as plain JSON-serialisable data, for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._position,
            "num_examples": len(self._examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`; the saved seed and shuffle flag replace this stream's own.

        They replace them because a resumed run must continue the order it was following, whatever the
        constructor was given. A state from another data set (other size or content) is refused.
        """
        expected = {"version": int, "seed": int, "shuffle": bool, "epoch": int, "position": int, "num_examples": int}
        for key, kind in {**expected, "fingerprint": str}.items():
            value = state.get(key) if isinstance(state, Mapping) else None
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(
                    f"the data cursor in the checkpoint is damaged: {key!r} is missing or not a {kind.__name__}"
                )
        if state["version"] != _STATE_VERSION:
            raise UserError(f"the data cursor has format version {state['version']}; this dler reads {_STATE_VERSION}")
        if state["num_examples"] != len(self._examples) or state["fingerprint"] != self._fingerprint:
            raise UserError(
                f"the data cursor was saved for another data set ({state['num_examples']} examples, "
                f"fingerprint {state['fingerprint']}); this one has {len(self._examples)} examples, "
                f"fingerprint {self._fingerprint}: resume with the same data, filters and limit"
            )
        if state["epoch"] < 0 or not 0 <= state["position"] < len(self._examples):
            raise UserError(f"the data cursor is damaged: epoch {state['epoch']}, position {state['position']}")
        self._seed, self._shuffle = state["seed"], state["shuffle"]
        self._epoch, self._position = state["epoch"], state["position"]
        self._order_cache = None
