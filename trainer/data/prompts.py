"""Prompts from examples: the templates (:data:`TEMPLATES`, :func:`format_prompt`) and the token ids the
rollout engine is fed (:func:`build_prompts`), dropping (and reporting, by file and line) prompts that are
too long. A question is measured in characters before it is tokenised, so one huge row costs a few copies
of its text, never its tokens."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..chunking import chunks_by_size
from ..fsutil import UserError
from .bad_rows import SHOWN_BAD_ROWS, DataWarning, check_on_bad_row
from .examples import Example

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
    check_on_bad_row(on_bad_row)
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
    shown = [f"{e.id} at {e.where}" if e.where else e.id for _, e, _ in too_long[:SHOWN_BAD_ROWS]]
    more = ", ..." if len(too_long) > SHOWN_BAD_ROWS else ""
    warnings.warn(
        f"dropped {len(too_long)} of {total} prompts longer than max_prompt_tokens={max_prompt_tokens} "
        f"(longest: {longest}; ids: {', '.join(shown)}{more})",
        DataWarning,
        stacklevel=3,
    )
