"""What a training example is: :class:`Example` (question, reference answer, id, source, location) and
:class:`FieldMap` (which columns of a row hold them)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """The question's column (None: the first of :data:`QUESTION_FALLBACKS` the row has)."""
    answer: str = "answer"
    """The reference answer's column."""
    id: str | None = None
    """The id's column (None, or absent in a row: ``{data set name}:{row index}``)."""
    source: str | None = None
    """The source's column (None, or absent in a row: the data set's name)."""

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
