"""Answer checking for rewards (trainer.reward.answers): extraction, exact and math-verify equivalence, and the worker
process that keeps a runaway sympy call from hanging the training loop.

Tests that need a worker share module-scoped checkers (a worker start costs about half a second)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.reward import answers
from trainer.reward.answer_equality import MAX_ANSWER_CHARS, exact_match
from trainer.reward.answer_extraction import answer_region, extract_answer, extract_boxed
from trainer.reward.answers import AnswerChecker, check_answer

TIMEOUT_S = 1.0
# Uncontrolled (math_equal, math-verify's timeouts off, 2-core CPU) each runs for minutes: 9^{9^{9}} did not
# finish in 300 s (sympy computes the exact 370-million-digit power); nested braces parse as nested FiniteSets
# whose evalf grows steeply with depth: 12 levels 1.6 s, 16 levels 8.5 s, 18 levels 35 s, 20 levels > 100 s.
EXPLODING_POWER = "\\boxed{9^{9^{9}}}"
EXPLODING_SETS = "\\boxed{" + "{" * 20 + "1" + "}" * 20 + "}"


@pytest.fixture(scope="module")
def checkers():
    """Checkers by (mode, require_think, fallback_last_number), created on first use, closed at the end."""
    made: dict[tuple, AnswerChecker] = {}

    def get(mode="math", require_think=False, fallback_last_number=False):
        key = (mode, require_think, fallback_last_number)
        if key not in made:
            made[key] = AnswerChecker(
                mode, require_think=require_think, fallback_last_number=fallback_last_number, timeout_s=TIMEOUT_S
            )
        return made[key]

    yield get
    for checker in made.values():
        checker.close()


@pytest.fixture(scope="module")
def math_checker(checkers):
    return checkers("math")


def _worker_pid(checker: AnswerChecker) -> int | None:
    proc = checker._workers[0].proc
    return None if proc is None else proc.pid


# --------------------------------------------------------------------------------------------- table

THINK = "<think>Try 4: no. So \\boxed{4} is wrong.</think>"
M = {"mode": "math"}
M_THINK = {"mode": "math", "require_think": True}
M_FALLBACK = {"mode": "math", "fallback_last_number": True}
E = {"mode": "exact"}
E_FALLBACK = {"mode": "exact", "fallback_last_number": True}
E_THINK_FALLBACK = {"mode": "exact", "require_think": True, "fallback_last_number": True}

CASES = [
    # equivalent forms (math-verify)
    ("fraction vs decimal", "so \\boxed{1/2}", "0.5", M, 1.0),
    ("decimal vs frac", "\\boxed{0.5}", "\\frac{1}{2}", M, 1.0),
    ("dfrac shorthand", "\\boxed{\\dfrac12}", "\\frac{1}{2}", M, 1.0),
    ("int vs float", "\\boxed{3}", "3.0", M, 1.0),
    ("set order", "\\boxed{\\{1,2\\}}", "\\{2,1\\}", M, 1.0),
    ("set with bare braces", "\\boxed{{1, 2}}", "\\{2,1\\}", M, 1.0),
    ("half-open interval", "\\boxed{[0, 1)}", "[0,1)", M, 1.0),
    ("closed vs half-open interval", "\\boxed{[0,1]}", "[0,1)", M, 0.0),
    ("sqrt forms", "\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", M, 1.0),
    ("nested braces, rationalised", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", M, 1.0),
    ("assignment vs value", "\\boxed{x=5}", "5", M, 1.0),
    ("value vs assignment gold", "\\boxed{5}", "x=5", M, 1.0),
    ("equation of a line", "\\boxed{y=2x+1}", "2x+1", M, 1.0),
    ("percent vs fraction", "\\boxed{10\\%}", "0.1", M, 1.0),
    ("percent vs its number (math-verify accepts both)", "\\boxed{10\\%}", "10", M, 1.0),
    ("expanded polynomial", "\\boxed{x^2+2x+1}", "(x+1)^2", M, 1.0),
    ("power evaluated", "\\boxed{2^{10}}", "1024", M, 1.0),
    ("pi numerically", "\\boxed{2\\pi}", "6.283185307", M, 1.0),
    ("rounded too coarsely", "\\boxed{1/3}", "0.333", M, 0.0),
    ("thousands comma", "\\boxed{1,000}", "1000", M, 1.0),
    ("ordered pair order matters", "\\boxed{(1,2)}", "(2,1)", M, 0.0),
    ("choice letter in text", "\\boxed{\\text{(A)}}", "A", M, 1.0),
    ("inline math around the box", "The answer is $\\boxed{-3}$.", "-3", M, 1.0),
    ("i is not read as sqrt(-1)", "\\boxed{i}", "\\sqrt{-1}", M, 0.0),
    ("integer gold from a dataset", "\\boxed{42}", 42, M, 1.0),
    # wrong, missing and malformed answers
    ("wrong", "\\boxed{3}", "4", M, 0.0),
    ("no box", "The answer is 3.", "3", M, 0.0),
    ("no box, last-number fallback", "The answer is 3.", "3", M_FALLBACK, 1.0),
    ("empty box", "\\boxed{}", "5", M, 0.0),
    ("unbalanced box", "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", M, 0.0),
    ("last box wins", "First \\boxed{2}, then \\boxed{3}.", "3", M, 1.0),
    ("earlier box ignored", "First \\boxed{2}, then \\boxed{3}.", "2", M, 0.0),
    ("fbox", "\\fbox{7}", "7", M, 1.0),
    ("bare-token box", "so \\boxed 5 is it", "5", M, 1.0),
    # DeepSeek-R1 format
    ("R1: answer after think", THINK + " The answer is \\boxed{5}.", "5", M_THINK, 1.0),
    ("R1: box only inside think", "<think>it is \\boxed{5}</think> done", "5", M_THINK, 0.0),
    ("no think required: box inside think counts", "<think>it is \\boxed{5}</think> done", "5", M, 1.0),
    ("R1: think never closed", "<think>it is \\boxed{5}", "5", M_THINK, 0.0),
    ("no think required, never closed", "<think>it is \\boxed{5}", "5", M, 1.0),
    ("R1: last </think> starts the answer", "</think>\\boxed{5}</think>\\boxed{6}", "6", M_THINK, 1.0),
    # exact mode
    ("exact: 7 vs 7.0", "\\boxed{7}", "7.0", E, 1.0),
    ("exact: 14/2 vs 7", "\\boxed{14/2}", "7", E, 1.0),
    ("exact: leading zero", "\\boxed{07}", "7", E, 1.0),
    ("exact: thousands comma", "\\boxed{1,000}", "1000", E, 1.0),
    ("exact: frac vs decimal", "\\boxed{\\frac{1}{2}}", "0.5", E, 1.0),
    ("exact: dollars and period", "\\boxed{$8$.}", "8", E, 1.0),
    ("exact: text wrapper", "\\boxed{\\text{Monday}}", "Monday", E, 1.0),
    ("exact: spaces", "\\boxed{x = 5}", "x=5", E, 1.0),
    ("exact: wrong", "\\boxed{7}", "8", E, 0.0),
    ("exact: no symbolic equivalence", "\\boxed{\\sqrt{4}}", "2", E, 0.0),
    ("exact: fallback number with commas", "In total 1,000 apples.", "1000", E_FALLBACK, 1.0),
    ("exact: fallback off", "In total 1,000 apples.", "1000", E, 0.0),
    ("exact: fallback takes the last number", "3 apples and 4 pears make 7, no, 8", "8", E_FALLBACK, 1.0),
    ("exact: fallback fraction", "so x = -3/4.", "-0.75", E_FALLBACK, 1.0),
    ("exact: box beats fallback", "\\boxed{5} and then 6", "5", E_FALLBACK, 1.0),
    ("exact: R1 fallback only after think", "<think>12</think> no number", "12", E_THINK_FALLBACK, 0.0),
]


@pytest.mark.parametrize(("response", "gold", "options", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_score_table(checkers, response, gold, options, expected):
    assert checkers(**options).score([response], [gold]) == [expected]


def test_score_batch_matches_the_table(checkers):
    """One call with every math case of the table gives the per-item answers, in order."""
    cases = [c for c in CASES if c[3] is M]
    scores = checkers("math").score([c[1] for c in cases], [c[2] for c in cases])
    assert scores == [c[4] for c in cases]


# ---------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{a\\}b}", "a\\}b"),
        ("\\boxed{x\\\\}y}", "x\\\\"),
        ("\\boxed {7}", "7"),
        ("\\boxed 5", "5"),
        ("\\boxed 5$.", "5"),
        ("\\boxed -3.", "-3"),
        ("\\fbox{A}", "A"),
        ("\\boxed{1} \\fbox{2}", "2"),
        ("\\fbox{2} \\boxed{1}", "1"),
        ("\\boxed{1} \\fboxsep=3pt", "1"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{}", ""),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed{1} and \\boxed{2", None),
        ("\\boxed", None),
        ("\\boxed }", None),
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_answer_region():
    assert answer_region("a</think>b</think>c", require_think=True) == "c"
    assert answer_region("a</think>", require_think=True) == ""
    assert answer_region("no think", require_think=True) is None
    assert answer_region("a</think>b", require_think=False) == "a</think>b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x is -3", "-3"),
        ("x=-3", "-3"),
        ("pages 3-4", "4"),
        ("f(2)-5", "5"),
        ("it costs 2.5 dollars.", "2.5"),
        ("ratio 3/4", "3/4"),
        ("1,000,000 ants", "1000000"),
        ("1,2,3", "3"),
        ("12345", "12345"),
        ("no digits", None),
    ],
)
def test_extract_answer_last_number(text, expected):
    assert extract_answer(text, fallback_last_number=True) == expected
    assert extract_answer(text) is None


def test_extract_answer_strips_and_rejects_empty():
    assert extract_answer("\\boxed{  5 }") == "5"
    assert extract_answer("\\boxed{ } 7", fallback_last_number=True) is None


def test_extraction_is_linear_on_huge_and_deeply_nested_text():
    mega = "x" * 10**6
    deep = "\\boxed{" + "{" * 10**4 + "1" + "}" * 10**4 + "}"
    cases = [
        (mega + "\\boxed{5}", "5"),
        (deep, "{" * 10**4 + "1" + "}" * 10**4),
        ("\\boxed{" + "{" * 10**6, None),
        ("\\boxed{" + "\\{" * 10**6 + "}", "\\{" * 10**6),
        ("\\boxedx" * 10**5, None),
    ]
    start = time.perf_counter()
    for text, expected in cases:
        assert extract_boxed(text) == expected
    assert extract_answer(mega + " 1,000", fallback_last_number=True) == "1000"
    assert time.perf_counter() - start < 2.0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\{}$ boxedfx01234,./-</think>")) | st.characters(), max_size=60))
def test_extraction_and_exact_never_raise(text):
    answer = extract_answer(text, require_think=False, fallback_last_number=True)
    assert answer is None or isinstance(answer, str)
    assert isinstance(exact_match(text, text[::-1]), bool)
    assert exact_match(text, text)


# --------------------------------------------------------------------------------------------- exact


def test_exact_match_numbers():
    assert exact_match("7", "7.0") and exact_match("7", "14/2") and exact_match("07", "7")
    assert exact_match("$1,000$", "1000") and exact_match("\\text{ 12 }.", "12")
    assert exact_match("-\\frac{3}{4}", "-0.75")
    assert not exact_match("7", "7.01")
    assert not exact_match("1,2", "12")  # a list, not a thousands separator
    assert exact_match("1/0", "1/0") and not exact_match("1/0", "2/0")  # not numbers: compared as text


def test_exact_match_is_fast_and_safe_on_huge_numerals():
    huge = "1" * 10**6
    start = time.perf_counter()
    assert not exact_match(huge, "1")
    assert not exact_match(huge, huge + "1")
    assert exact_match(huge, huge)  # identical text
    assert not exact_match("1e999999999", "1")  # no exponent notation: never builds 10**999999999
    assert time.perf_counter() - start < 1.0


# -------------------------------------------------------------------------------------- adversarial


def _timed_score(checker, responses, golds):
    start = time.perf_counter()
    scores = checker.score(responses, golds)
    return scores, time.perf_counter() - start


@pytest.mark.parametrize("response", [EXPLODING_POWER, EXPLODING_SETS], ids=["tower-power", "nested-sets"])
def test_runaway_sympy_is_killed_and_the_worker_restarts(math_checker, response):
    math_checker.score(["\\boxed{1}"], ["1.0"])  # a warm worker, so that only the runaway call is timed
    pid = _worker_pid(math_checker)
    scores, elapsed = _timed_score(math_checker, [response], ["5"])
    assert scores == [0.0] and elapsed < 3.0
    assert _worker_pid(math_checker) is None  # killed
    assert math_checker.score(["\\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]
    assert _worker_pid(math_checker) not in (None, pid)


def test_each_item_has_its_own_budget(math_checker):
    """A runaway item between normal ones costs one timeout; the items after it are checked normally."""
    responses = ["\\boxed{0.5}", EXPLODING_POWER, "\\boxed{[0, 1)}", EXPLODING_SETS, "\\boxed{3}"]
    golds = ["1/2", "5", "[0,1)", "1", "4"]
    scores, elapsed = _timed_score(math_checker, responses, golds)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert elapsed < 2 * TIMEOUT_S + 4.0  # two timeouts and two worker restarts


def test_huge_responses_score_fast(math_checker):
    mega = "z" * 10**6
    responses = [
        mega,  # no answer: no IPC at all
        mega + "\\boxed{\\frac{1}{2}}",
        "\\boxed{" + mega + "}",  # longer than MAX_ANSWER_CHARS: not even tried
        "\\boxed{" + "{" * 10**4 + "1" + "}" * 10**4 + "}",
        "\\boxed{" + "{" * 10**4,
    ]
    scores, elapsed = _timed_score(math_checker, responses, ["1/2"] * 5)
    assert scores == [0.0, 1.0, 0.0, 0.0, 0.0] and elapsed < 3.0


def test_answer_length_bound(math_checker):
    at_bound = "1" + "+0" * ((MAX_ANSWER_CHARS - 1) // 2)
    assert len(at_bound) <= MAX_ANSWER_CHARS
    assert math_checker.score(["\\boxed{" + at_bound + "}"], ["1"]) == [1.0]
    too_long = "1" * (MAX_ANSWER_CHARS + 1)
    assert math_checker.score(["\\boxed{" + too_long + "}"], [too_long]) == [0.0]  # even when identical


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{\\}",
        "\\boxed{\\frac{}{}}",
        "\\boxed{$}",
        "\\boxed{\\begin{matrix}}",
        "\\boxed{\\left(}",
        "\\boxed{\x00\ud800\U0001f600}",
        "\\boxed{^^^^}",
        "\\boxed{1/0}",
        "\\boxed{\\sqrt[0]{0}}",
        "\\boxed{0^{-1}}",
    ],
)
def test_malformed_answers_score_zero(math_checker, response):
    assert math_checker.score([response], ["2"]) == [0.0]


def test_non_string_response_scores_zero(math_checker):
    assert math_checker.score([None, b"\\boxed{2}", "\\boxed{2}"], ["2", "2", "2"]) == [0.0, 0.0, 1.0]


def test_a_worker_killed_while_idle_is_replaced(math_checker):
    math_checker.score(["\\boxed{1}"], ["1.0"])
    pid = _worker_pid(math_checker)
    os.kill(pid, signal.SIGKILL)
    math_checker._workers[0].proc.wait()
    assert math_checker.score(["\\boxed{0.25}"], ["1/4"]) == [1.0]
    assert _worker_pid(math_checker) != pid


def test_a_worker_dying_mid_check_scores_that_pair_zero():
    with AnswerChecker(timeout_s=30.0) as checker:
        checker.score(["\\boxed{1}"], ["1.0"])
        pid = _worker_pid(checker)
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        scores, elapsed = _timed_score(checker, [EXPLODING_POWER, "\\boxed{2}"], ["5", "2.0"])
        assert scores == [0.0, 1.0] and elapsed < 5.0  # well before the 30 s limit


def test_parallel_workers():
    with AnswerChecker(timeout_s=TIMEOUT_S, workers=2) as checker:
        responses = [EXPLODING_POWER, EXPLODING_SETS, "\\boxed{0.5}", "\\boxed{3}", "\\boxed{\\{2,1\\}}"]
        scores = checker.score(responses, ["5", "1", "1/2", "4", "\\{1,2\\}"])
        assert scores == [0.0, 0.0, 1.0, 0.0, 1.0]
        assert all(w.proc is None or w.proc.poll() is None for w in checker._workers)
    assert all(w.proc is None for w in checker._workers)


def test_a_worker_that_cannot_start_raises(monkeypatch):
    """An environment failure is loud, not a silent 0 for every response."""
    monkeypatch.setattr(answers.sys, "executable", "/bin/false")
    checker = AnswerChecker()
    with pytest.raises(RuntimeError, match="worker died while starting"):
        checker.score(["\\boxed{1}"], ["2"])
    assert all(w.proc is None for w in checker._workers)
    checker.close()


def test_close_is_idempotent_and_the_checker_restarts():
    checker = AnswerChecker(timeout_s=TIMEOUT_S)
    assert checker.score(["\\boxed{2}"], ["2.0"]) == [1.0]
    proc = checker._workers[0].proc
    checker.close()
    checker.close()
    assert proc.poll() is not None
    assert checker.score(["\\boxed{2}"], ["2.0"]) == [1.0]
    checker.close()


def test_exact_mode_starts_no_worker():
    checker = AnswerChecker("exact")
    assert checker.score(["\\boxed{7.0}"], ["7"]) == [1.0] and checker._workers == []


def test_check_answer():
    assert check_answer("\\boxed{\\frac{2}{4}}", "0.5") == 1.0
    assert check_answer("\\boxed{3}", "4") == 0.0
    assert check_answer("<think>\\boxed{7}</think>", "7", mode="exact", require_think=True) == 0.0
    assert check_answer("it is 1,000", "1000", mode="exact", fallback_last_number=True) == 1.0


def test_importing_answers_is_light():
    """The worker imports trainer.reward.answers: it must not pull in torch (or sympy before it is needed)."""
    code = "import sys, trainer.reward.answers; print(sorted({'torch', 'sympy', 'math_verify'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "fuzzy"}, "mode must be one of 'math', 'exact'; got 'fuzzy'"),
        ({"timeout_s": 0}, "timeout_s must be"),
        ({"timeout_s": -1.0}, "timeout_s must be"),
        ({"timeout_s": float("nan")}, "timeout_s must be"),
        ({"timeout_s": float("inf")}, "timeout_s must be"),
        ({"timeout_s": "2"}, "timeout_s must be"),
        ({"workers": 0}, "workers must be"),
        ({"workers": 1.5}, "workers must be"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnswerChecker(**kwargs)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="responses and golds must have the same length; got 2 responses and 1 golds"):
        AnswerChecker("exact").score(["a", "b"], ["a"])
