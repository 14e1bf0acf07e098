"""bench/demo_error_breakdown.py: the demo's errors sorted by kind, on responses written by the warm start's
own chain builder (trainer.models.demo.verbose_chain), then altered by hand."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from demo_error_breakdown import breakdown, kind  # noqa: E402

from trainer.models.demo import verbose_chain  # noqa: E402


def sample(text: str, correct: bool) -> dict:
    return {"text": text, "correct": float(correct)}


def test_each_kind_of_error_is_named():
    right = verbose_chain("What is 2 + 8?", checks=0)  # "<think>\n2 + 8 = 10.\n</think>\n\\boxed{10}"
    assert kind(sample(right, True)) == "correct"
    assert kind(sample(right.replace("= 10.", "= 11.").replace("{10}", "{11}"), False)) == "result wrong"
    assert kind(sample(right.replace("{10}", "{12}"), False)) == "boxed != result"
    assert kind(sample(right.replace("2 + 8 = 10.", "3 + 7 = 10."), False)) == "other"  # operands miscopied
    two_digit = verbose_chain("What is 47 - 19?", checks=2)  # the worked steps end in the result line
    assert kind(sample(two_digit.replace("{28}", "{29}"), False)) == "boxed != result"


def test_samples_split_by_whether_they_re_check():
    samples = [
        sample(verbose_chain("What is 2 + 8?", checks=0), True),
        sample(verbose_chain("What is 2 + 8?", checks=3), True),
        sample(verbose_chain("What is 3 + 4?", checks=0).replace("{7}", "{8}"), False),
    ]
    split = breakdown(samples)
    assert split["no re-check"] == {"correct": 1, "boxed != result": 1}
    assert split["re-checks"] == {"correct": 1}
