"""Reading a data set into validated examples (:func:`load_examples`): ``.jsonl``/``.ndjson``, ``.json``,
``.parquet``, a Hugging Face ``datasets`` folder (``save_to_disk``), or a generated ``builtin:`` set. Every
row is validated, and a malformed one is reported by file and line (skipped with one warning, or an error).
Problems the user can fix (bad path, malformed data) raise :class:`~trainer.fsutil.UserError`; bad argument
values raise ``ValueError``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import UserError
from .bad_rows import check_on_bad_row, report_bad_rows
from .builtin import BUILTIN_PREFIX, load_builtin
from .examples import Example, FieldMap

# Every integer up to 2**53 is exact as a float: below it an integral float is the integer that was stored.
_EXACT_FLOAT_INTS = 2**53
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
    check_on_bad_row(on_bad_row)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    fields = FieldMap() if fields is None else fields

    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        examples = load_builtin(text, seed)
        return examples[:limit] if limit is not None else examples

    path = Path(text).expanduser()
    name, rows = _open_rows(path, None if prepare is not None else fields, split)
    examples, bad = _validate_rows(rows, fields, name, prepare)
    report_bad_rows(bad, on_bad_row, total=len(examples) + len(bad), path=str(path), hint=error_hint)
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
        if value.is_integer() and abs(value) < _EXACT_FLOAT_INTS:
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


def _no_examples_message(path: str, bad: list[str]) -> str:
    if not bad:
        return f"{path} has no rows; expected at least one example with a question and an answer"
    return f"{path} has no usable examples: all {len(bad)} rows are malformed (first: {bad[0]})"
