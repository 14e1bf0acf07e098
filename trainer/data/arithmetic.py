"""The toy-arithmetic task: generated questions with exact integer answers and a difficulty knob
(:func:`toy_arith`), for demos and tests that have no data set to download."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .examples import Example
from .stable_random import randint


def parse_difficulty(text: str | int | tuple[int, int]) -> tuple[int, int]:
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


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits; single digits start at 1 (0 makes trivial questions)."""
    return randint(rng, 10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)


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
        return [_number(rng, 2), randint(rng, 2, 9)], ["*"]
    digits = 2 + (difficulty - 4) // 2
    operands, operators = [_number(rng, digits)], []
    for _ in range(difficulty - 2):
        op = "+-*"[randint(rng, 0, 2)]
        operators.append(op)
        operands.append(randint(rng, 2, 9) if op == "*" else _number(rng, digits))
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
    lo, hi = parse_difficulty(difficulty)
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
