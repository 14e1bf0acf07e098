"""The final answer of a model's response: the last box (``\\boxed{}``/``\\fbox{}``) of its answer region,
or its last number. Linear-time string scanning, safe on any input (megabytes of text, braces nested
thousands deep), so it runs in the calling process."""

from __future__ import annotations

import re
from collections import deque

__all__ = ["answer_region", "extract_answer", "extract_boxed"]

THINK_END = "</think>"

# A box macro, not a longer name such as \\fboxsep.
_BOX_MACRO = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# One regex match per brace or backslash escape: the scan skips plain text in C and ignores \{ and \}.
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"[^\s${}]+")
# A minus sign right after a digit, letter or ")" is subtraction or a range ("3-4"), not part of the number.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Models put the final answer in the last box; earlier boxes are intermediate results. ``\\boxed 5`` (a
    single bare token, as LaTeX allows) is accepted too. Braces are matched by one linear scan that skips
    escaped ``\\{`` ``\\}``, so deeply nested or huge inputs cost O(n); an unbalanced last box (a response
    cut off mid-answer) gives None.
    """
    last = _last_match(_BOX_MACRO, text)
    return None if last is None else _box_argument(text, last.end())


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last non-overlapping match of ``pattern`` in ``text``, found in one pass."""
    tail = deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def _box_argument(text: str, pos: int) -> str | None:
    """The argument of a box macro whose name ends at ``pos``: a braced group or one bare token."""
    start = _SPACES.match(text, pos).end()
    if text.startswith("{", start):
        return _braced_group(text, start)
    token = _BARE_TOKEN.match(text, start)
    if token is None:
        return None
    return token.group().rstrip(".,;:!?") or None


def _braced_group(text: str, open_pos: int) -> str | None:
    """Content between the ``{`` at ``open_pos`` and its matching ``}``; None when it is never closed."""
    depth = 0
    for match in _BRACE_OR_ESCAPE.finditer(text, open_pos):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : match.start()]
    return None


def answer_region(text: str, require_think: bool) -> str | None:
    """The part of a response that may hold the final answer.

    In the DeepSeek-R1 format the answer follows the reasoning, closed by ``</think>``; a box inside the
    reasoning is a draft, and a response that never closes its reasoning has no answer (None). Without
    ``require_think`` the whole text is the region.
    """
    if not require_think:
        return text
    pos = text.rfind(THINK_END)
    return None if pos < 0 else text[pos + len(THINK_END) :]


def extract_answer(text: str, *, require_think: bool = False, fallback_last_number: bool = False) -> str | None:
    """The final answer of a response: the last box in its answer region, stripped.

    An empty box counts as no answer. With ``fallback_last_number`` a region without any box falls back to
    its last number (``-3``, ``2.5``, ``3/4``, ``1,000``; thousands commas are dropped), which suits models
    that answer plain arithmetic without boxing.
    """
    region = answer_region(text, require_think)
    if region is None:
        return None
    boxed = extract_boxed(region)
    if boxed is not None:
        return boxed.strip() or None
    if not fallback_last_number:
        return None
    last = _last_match(_NUMBER, region)
    return None if last is None else last.group().replace(",", "")
