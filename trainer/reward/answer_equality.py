"""Whether an extracted answer equals the gold one: :func:`exact_match` (normalised text or exact rationals,
linear time, in-process) and :func:`math_equal` (math-verify's equivalence, unbounded: run it under
:class:`~trainer.reward.answers.AnswerChecker`'s time limit for untrusted answers)."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

__all__ = ["MAX_ANSWER_CHARS", "exact_match", "math_equal"]

MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this score 0 without being compared: no reference answer is that long, and
parsing such a blob with sympy is exactly the kind of work that runs away."""

_NUMERAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_LATEX_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _strip_delimiters(s: str) -> str:
    """Drop one pair of surrounding math delimiters (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``)."""
    s = s.strip()
    for left, right in _DELIMITERS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            if right == "$" and s.endswith("\\$"):  # an escaped dollar sign, not a delimiter
                continue
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _normalise_exact(s: str) -> str:
    """Canonical text of an exact answer: no whitespace, delimiters, trailing period, \\text wrappers or
    thousands commas, and ``\\frac{a}{b}`` of integers written ``a/b``."""
    s = "".join(s.split())
    s = _strip_delimiters(s.rstrip("."))
    s = _TEXT_WRAPPER.sub(r"\1", s).rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    fraction = _LATEX_FRACTION.fullmatch(s)
    if fraction:
        s = f"{fraction[1]}{fraction[2]}/{fraction[3]}"
    return s


def _as_number(s: str) -> Fraction | None:
    """``s`` as an exact rational when it is a plain numeral (int, decimal or int/int), else None.

    Long numerals are not parsed (int() of a huge digit string is slow and hits Python's digit limit); they
    are then compared as text, which is exact for them anyway.
    """
    if len(s) > MAX_ANSWER_CHARS or not _NUMERAL.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def exact_match(pred: str, gold: str) -> bool:
    """Whether ``pred`` equals ``gold`` for tasks with an exact answer.

    Both are normalised (see ``_normalise_exact``); when both are numerals they are compared as rationals, so
    ``7``, ``7.0``, ``07`` and ``14/2`` are all equal, otherwise as strings. Linear in the input size.
    """
    pred_n, gold_n = _normalise_exact(pred), _normalise_exact(gold)
    pred_x, gold_x = _as_number(pred_n), _as_number(gold_n)
    if pred_x is not None and gold_x is not None:
        return pred_x == gold_x
    return pred_n == gold_n


def _as_boxed(answer: str) -> str:
    """Wrap a bare answer so that math-verify parses all of it as one LaTeX expression.

    math-verify searches its input for an answer; inside ``\\boxed{}`` it takes the box whole (with ``$..$``
    a ``$`` inside the answer would end the math early).
    """
    return "\\boxed{" + _strip_delimiters(answer) + "}"


@lru_cache(maxsize=1)
def _math_verify_configs() -> tuple:
    """Look for a box first (our wrapper), then any LaTeX / plain expression; built once, as math-verify
    caches its compiled regexes by config."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def math_equal(pred: str, gold: str) -> bool:
    """Whether ``pred`` and ``gold`` are mathematically equivalent according to math-verify.

    Handles fractions vs decimals, LaTeX forms, sets, intervals, equations (``x=5`` vs ``5``) and percentages.
    math-verify's own signal.alarm timeouts are disabled (they raise outside the main thread and cannot stop
    a long C call), so this call is unbounded: use ``AnswerChecker``, which runs it in a worker
    process under a real time limit, for untrusted answers. Any error counts as not equal.
    """
    from math_verify import parse, verify

    configs = _math_verify_configs()
    try:
        gold_parsed = parse(_as_boxed(gold), extraction_config=configs, parsing_timeout=None)
        pred_parsed = parse(_as_boxed(pred), extraction_config=configs, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # math-verify swallows most errors itself; anything left is "not equal"
        return False
