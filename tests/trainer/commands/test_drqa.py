"""DRQA: splitting batched responses, labels, the drqa reward, and `dler drqa-data` end to end."""

import json

import numpy as np
import pytest

from trainer.cli import main
from trainer.commands.drqa import LABELS, batched_prompt, label, split_answers
from trainer.data import Example
from trainer.fsutil import UserError
from trainer.reward.budgets import ConciseLengths
from trainer.reward.rewards import LengthPenaltyConfig, apply_length_penalty


def test_batched_prompt_numbers_the_questions_and_asks_for_markers():
    text = batched_prompt(["What is 1 + 1?", "  What is 2 + 2? "])
    assert "Answer the following 2 questions" in text
    assert "Question 1: What is 1 + 1?\n\nQuestion 2: What is 2 + 2?" in text and "\\boxed{}" in text


def test_split_in_order():
    r = "Question 1: 1 + 1 = 2, so \\boxed{2}.\nQuestion 2: 2 + 2 = 4, so \\boxed{4}."
    assert split_answers(r, 2) == ["Question 1: 1 + 1 = 2, so \\boxed{2}.", "Question 2: 2 + 2 = 4, so \\boxed{4}."]


def test_split_swapped_order_follows_the_numbers():
    r = "**Question 2:** four, \\boxed{4}\n\n**Question 1:** two, \\boxed{2}"
    one, two = split_answers(r, 2)
    assert one.endswith("\\boxed{2}") and "four" not in one
    assert two.endswith("\\boxed{4}") and "two" not in two


def test_split_missing_answer_is_none():
    r = "### Problem 1\nIt is \\boxed{2}.\n"
    assert split_answers(r, 2) == ["### Problem 1\nIt is \\boxed{2}.", None]
    assert split_answers("I do not know.", 2) == [None, None]


def test_split_restated_questions_do_not_hide_the_solutions():
    r = (
        "Question 1: What is 1 + 1?\nQuestion 2: What is 2 + 2?\n\n"
        "Question 1: 1 + 1 = 2. \\boxed{2}\nQuestion 2: 2 + 2 = 4. \\boxed{4}"
    )
    one, two = split_answers(r, 2)
    assert one == "Question 1: 1 + 1 = 2. \\boxed{2}" and two == "Question 2: 2 + 2 = 4. \\boxed{4}"


def test_split_ignores_numbers_beyond_k_and_falls_back_to_boxes():
    r = "Question 3: not asked \\boxed{9}\nQuestion 1: \\boxed{1}"
    assert split_answers(r, 2) == ["Question 1: \\boxed{1}", None]
    # No markers at all: exactly k boxed answers split the response after each box.
    r = "First, 1 + 1 = \\boxed{2}. Then {braces} 2 + 2 = \\boxed{\\frac{8}{2}} done"
    assert split_answers(r, 2) == ["First, 1 + 1 = \\boxed{2}", ". Then {braces} 2 + 2 = \\boxed{\\frac{8}{2}}"]
    assert split_answers("\\boxed{1} \\boxed{2} \\boxed{3}", 2) == [None, None]
    with pytest.raises(ValueError, match="k must be >= 1"):
        split_answers("x", 0)


def test_labels():
    assert label(True, batched=True) == "correct-concise"
    assert label(True, batched=False) == "correct-verbose"
    assert label(False, batched=True) == label(False, batched=False) == "wrong"


# ----------------------------------------------------------------------------------------------- reward


def test_drqa_reward_scores_the_labels():
    cfg = LengthPenaltyConfig(name="drqa", drqa_data="x.jsonl", drqa_verbose_reward=0.25, length_budget=100)
    rewards = apply_length_penalty(cfg, [1, 1, 0, 1], [40, 60, 10, 50], [False, False, False, True], budget=50)
    np.testing.assert_allclose(rewards, [1.0, 0.25, 0.0, 0.25])  # concise, verbose, wrong, cut (not concise)


def test_drqa_reward_needs_its_data_and_excludes_da_dler():
    with pytest.raises(ValueError, match="needs drqa_data"):
        LengthPenaltyConfig(name="drqa")
    from trainer.config import load_config

    cfg = load_config(None, ["reward.penalty.name=drqa", "reward.penalty.drqa_data=d.jsonl"])
    assert cfg.reward.penalty.drqa_data == "d.jsonl"
    with pytest.raises(UserError, match="cannot be combined"):
        load_config(
            None, ["reward.penalty.name=drqa", "reward.penalty.drqa_data=d.jsonl", "reward.da_dler.enabled=true"]
        )


def _records(path, rows):
    path.write_text("".join(json.dumps(dict(zip(("question", "label", "tokens"), r))) + "\n" for r in rows))
    return path


def test_concise_lengths_are_the_median_of_the_concise_chains(tmp_path):
    data = _records(
        tmp_path / "d.jsonl",
        [("q1", "correct-concise", 10), ("q1", "correct-concise", 30), ("q1", "correct-concise", 20),
         ("q1", "correct-verbose", 90), ("q2", "wrong", 5), ("q3", "correct-concise", 5000)],
    )  # fmt: skip
    examples = [Example("q1", "1", "a", "s"), Example("q2", "2", "b", "s"), Example("q3", "3", "c", "s")]
    lengths = ConciseLengths.from_file(data, examples, default=400)
    assert lengths.observe("a", [1], 0) == 20  # median of 10, 30, 20
    assert lengths.observe("b", [1], 0) == 400  # no concise chain: the penalty's budget
    assert lengths.observe("c", [1], 0) == 400  # never above the budget rollouts are generated to
    assert lengths.max_budget == 400 and lengths.state_dict() == {}


def test_concise_lengths_bad_files(tmp_path):
    examples = [Example("q1", "1", "a", "s")]
    with pytest.raises(UserError, match="not found"):
        ConciseLengths.from_file(tmp_path / "none.jsonl", examples, 100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "label": "great", "tokens": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not a DRQA record.*unknown label 'great'"):
        ConciseLengths.from_file(bad, examples, 100)
    only_wrong = _records(tmp_path / "w.jsonl", [("q1", "wrong", 3)])
    with pytest.raises(UserError, match="no correct-concise chain"):
        ConciseLengths.from_file(only_wrong, examples, 100)


# ------------------------------------------------------------------------------------------- end to end


def test_drqa_data_end_to_end_with_the_transformers_engine(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "drqa.jsonl"
    args = ["drqa-data", "--model", str(tiny_llama_dir), "--data", "builtin:toy-arith?size=5", "--out", str(out),
            "--engine", "hf", "--samples", "2", "--max-tokens", "8", "--checker", "exact",
            "--dtype", "float32"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    singles = [r for r in records if r["source"] == "single"]
    assert len(singles) == 5 * 2  # every question alone, 2 samples
    for r in records:
        assert set(r) == {"id", "question", "answer", "chain", "label", "tokens", "source", "group", "position"}
        assert r["label"] in LABELS and r["tokens"] >= 0
        if r["source"] == "single":
            assert r["tokens"] <= 8 and r["label"] != "correct-concise"
        else:
            assert r["group"] in (0, 1) and r["position"] in (0, 1) and r["label"] != "correct-verbose"
    printed = capsys.readouterr().out
    assert "records ->" in printed and "correct-verbose" in printed
    # The output exists: refused without --overwrite, and the file is left as it was.
    before = out.read_text()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err and out.read_text() == before


def test_drqa_data_bad_input_is_exit_2(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "d.jsonl"
    assert main(["drqa-data", "--model", str(tmp_path / "none"), "--data", "builtin:toy-arith", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    rc = main(["drqa-data", "--model", str(tiny_llama_dir), "--data", "builtin:toy-arith?size=1", "--out", str(out)])
    assert rc == 2 and "needs k=2" in capsys.readouterr().err
    assert not out.exists()
