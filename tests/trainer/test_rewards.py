"""Length penalties and DA-DLER budgets against hand-computed values (DESIGN.md section 3)."""

import json

import numpy as np
import pytest

from trainer.budgets import DifficultyBudgets
from trainer.rewards import LENGTH_PENALTIES, LengthPenaltyConfig, apply_length_penalty


def reward(name, correct, lengths, truncated=None, budget=None, **cfg):
    truncated = [False] * len(correct) if truncated is None else truncated
    if name == "drqa":
        cfg.setdefault("drqa_data", "drqa.jsonl")  # the per-question lengths arrive as `budget`
    return apply_length_penalty(LengthPenaltyConfig(name=name, **cfg), correct, lengths, truncated, budget)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- truncation (DLER)


def test_truncation_keeps_responses_that_finish_within_the_budget():
    # finished short, finished exactly at L, wrong, finished past L, cut by max_tokens below L
    correct = [1, 1, 0, 1, 1]
    lengths = [100, 4000, 50, 4001, 3000]
    truncated = [False, False, False, False, True]
    close(reward("truncation", correct, lengths, truncated), [1, 1, 0, 0, 0])
    close(reward("truncation", correct, lengths, truncated, truncation_coef=0.1), [1, 1, 0, 0.1, 0.1])


def test_truncation_empty_response_and_budget_override():
    close(reward("truncation", [0, 1], [0, 0]), [0, 1])
    # a per-prompt budget (DA-DLER) replaces length_budget
    close(reward("truncation", [1, 1], [1500, 2500], budget=2000), [1, 0])


# ----------------------------------------------------------------------------- DAPO overlong


def test_overlong_buffer_is_linear_between_soft_limit_and_budget():
    # L = 4000, L_c = 1000: 0 up to 3000, -0.5 at 3500, -1 at 4000 and beyond
    correct = [1, 1, 1, 1, 0, 0]
    lengths = [2000, 3000, 3500, 4000, 4500, 0]
    close(reward("overlong", correct, lengths, overlong_buffer=1000), [1, 1, 0.5, 0, -1, 0])


def test_overlong_rejects_a_buffer_larger_than_the_budget():
    with pytest.raises(ValueError, match="overlong_buffer"):
        LengthPenaltyConfig(name="overlong", length_budget=100, overlong_buffer=200)


# ----------------------------------------------------------------------------- cosine


def test_cosine_interpolates_from_short_to_long():
    # L = 1000: correct 2 -> 1.5 -> 1, wrong -10 -> -5 -> 0, exceeded -10
    correct = [1, 1, 1, 0, 0, 0, 1, 1]
    lengths = [0, 500, 1000, 0, 500, 1000, 1001, 600]
    truncated = [False] * 7 + [True]
    close(
        reward("cosine", correct, lengths, truncated, length_budget=1000),
        [2, 1.5, 1, -10, -5, 0, -10, -10],
    )


# ----------------------------------------------------------------------------- L1-Max


def test_l1_max_clips_the_linear_length_term():
    # alpha 0.0003, delta 0.5, n_gold = 1000: |o|=1000 -> 0.5, 0 -> 0.8, 3000 -> clip(-0.1) = 0
    close(reward("l1_max", [1, 1, 1, 0], [1000, 0, 3000, 0], length_budget=1000), [0.5, 0.8, 0, 0])
    # far under the target the factor saturates at 1
    close(reward("l1_max", [1], [0], length_budget=4000), [1.0])


# ----------------------------------------------------------------------------- Kimi k1.5


def test_kimi_rewards_the_shortest_and_never_lifts_wrong_answers():
    # lambda = 0.5 - (|o| - 10) / 20 = [0.5, 0, -0.5, 0.5]
    close(reward("kimi", [1, 0, 1, 0], [10, 20, 30, 10]), [1.5, 0, 0.5, 0])
    close(reward("kimi", [1, 0, 0], [10, 20, 30]), [1.5, 0, -0.5])


def test_kimi_all_lengths_equal_gives_no_length_term():
    close(reward("kimi", [1, 0, 1], [7, 7, 7]), [1, 0, 1])
    close(reward("kimi", [1], [0]), [1])


# ----------------------------------------------------------------------------- LASER, none


def test_laser_bonus_for_correct_responses_within_the_target():
    close(reward("laser", [1, 1, 1, 0], [50, 100, 150, 10], length_budget=100), [1.5, 1.5, 1, 0])
    close(reward("laser", [1], [10], length_budget=100, laser_bonus=0.2), [1.2])


def test_none_is_correctness():
    close(reward("none", [1, 0], [10**6, 0], [True, False]), [1, 0])


@pytest.mark.parametrize("name", sorted(LENGTH_PENALTIES))
def test_every_penalty_is_vectorised_and_pure(name):
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, 16).astype(float)
    lengths = rng.integers(0, 5000, 16)
    truncated = lengths >= 4500
    before = (correct.copy(), lengths.copy(), truncated.copy())
    out = reward(name, correct, lengths, truncated)
    assert out.shape == (16,) and np.isfinite(out).all()
    for a, b in zip(before, (correct, lengths, truncated)):
        np.testing.assert_array_equal(a, b)  # inputs untouched
    # element i depends only on response i, except Kimi's group min/max
    if name != "kimi":
        close(out[:4], reward(name, correct[:4], lengths[:4], truncated[:4]))


def test_bad_penalty_input_is_named():
    with pytest.raises(ValueError, match="length penalty name must be one of"):
        LengthPenaltyConfig(name="length")
    with pytest.raises(ValueError, match="truncation_coef"):
        LengthPenaltyConfig(truncation_coef=2)
    with pytest.raises(ValueError, match="correct must hold 0 or 1"):
        reward("truncation", [0.5], [3])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        reward("truncation", [1], [-1])
    with pytest.raises(ValueError, match="1-D of one length"):
        reward("truncation", [1, 0], [3])
    with pytest.raises(ValueError, match="at least one response"):
        reward("truncation", [], [])
    with pytest.raises(ValueError, match="budget must be >= 1"):
        reward("truncation", [1], [3], budget=0)


# ----------------------------------------------------------------------------- DA-DLER


def test_da_dler_paper_setting():
    budgets = DifficultyBudgets()  # threshold 0.5: easy -> 2000, hard -> 4000
    assert budgets.max_budget == 4000
    assert budgets.observe("easy", [1, 1, 0, 1], step=0) == 2000
    assert budgets.observe("half", [1, 0, 1, 0], step=0) == 2000  # c >= threshold is easy
    assert budgets.observe("hard", [1, 0, 0, 0], step=0) == 4000
    assert budgets.observe("none", [0, 0, 0, 0], step=0) == 4000


def test_da_dler_several_thresholds():
    budgets = DifficultyBudgets(thresholds=(0.25, 0.75), budgets=(6000, 4000, 2000))
    assert [budgets.budget_for_ratio(c) for c in (0.0, 0.24, 0.25, 0.5, 0.75, 1.0)] == [
        6000,
        6000,
        4000,
        4000,
        2000,
        2000,
    ]


def test_da_dler_budget_composes_with_the_truncation_penalty():
    budgets = DifficultyBudgets()
    correct, lengths = [1, 1, 1, 0], [1500, 2500, 3900, 100]
    budget = budgets.observe("q", correct, step=3)
    assert budget == 2000  # 3 of 4 correct: easy
    close(reward("truncation", correct, lengths, budget=budget), [1, 0, 0, 0])


def test_da_dler_previous_source_uses_the_last_observed_group():
    budgets = DifficultyBudgets(source="previous")
    assert budgets.observe("q", [1, 1], step=0) == 2000  # never seen: judged by this group
    assert budgets.observe("q", [0, 0], step=1) == 2000  # judged by step 0's group (easy)
    assert budgets.observe("q", [1, 1], step=2) == 4000  # judged by step 1's group (hard)
    current = DifficultyBudgets()
    current.observe("q", [1, 1], step=0)
    assert current.observe("q", [0, 0], step=1) == 4000


def test_da_dler_record_round_trips_through_a_checkpoint():
    budgets = DifficultyBudgets(source="previous")
    budgets.observe("a", [1, 0, 0, 0], step=4)
    budgets.observe("b", [1, 1, 1, 0], step=5)
    restored = DifficultyBudgets(source="previous")
    restored.load_state_dict(json.loads(json.dumps(budgets.state_dict())))
    assert restored.record == {"a": (0.25, 4), "b": (0.75, 5)}
    assert restored.observe("b", [0, 0, 0, 0], step=6) == 2000


def test_da_dler_bad_settings_are_named():
    with pytest.raises(ValueError, match="one entry more than thresholds"):
        DifficultyBudgets(thresholds=(0.5,), budgets=(4000,))
    with pytest.raises(ValueError, match="strictly increasing"):
        DifficultyBudgets(thresholds=(0.7, 0.3), budgets=(1, 2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        DifficultyBudgets(thresholds=(1.5,))
    with pytest.raises(ValueError, match="budgets must be >= 1"):
        DifficultyBudgets(budgets=(4000, 0))
    with pytest.raises(ValueError, match="source"):
        DifficultyBudgets(source="next")
