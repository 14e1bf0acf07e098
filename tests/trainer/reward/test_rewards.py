"""Length penalties and DA-DLER budgets against hand-computed values (each penalty's docstring)."""

import json

import numpy as np
import pytest

from trainer.reward.budgets import BudgetSchedule, DifficultyBudgets, ScheduledBudgets
from trainer.reward.rewards import LENGTH_PENALTIES, LengthPenaltyConfig, apply_length_penalty


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


def test_shorter_better_pulls_towards_the_shortest_correct_response():
    # budget 40: the correct 50-token response did not finish within it, so it is not correct;
    # SOL = 20 (the shortest correct): 2 - 0.01*10, 2 - 0, 0 - 0.01*10, 0 - 0.01*30
    out = reward("shorter_better", [1, 1, 0, 1], [30, 20, 10, 50], budget=40, shorter_better_beta=0.01)
    close(out, [1.9, 2.0, -0.1, -0.3])


def test_shorter_better_without_a_correct_response_uses_the_mean_length():
    # SOL = mean(10, 30) = 20: both are 10 tokens away
    close(reward("shorter_better", [0, 0], [10, 30], shorter_better_beta=0.01), [-0.1, -0.1])
    # a truncated correct response is not correct: SOL = 30, the other one's length
    out = reward("shorter_better", [1, 1], [10, 30], [True, False], budget=100, shorter_better_beta=0.01)
    close(out, [-0.2, 2.0])
    close(reward("shorter_better", [1, 0], [10, 30], shorter_better_alpha=1.0, shorter_better_beta=0), [1, 0])


def test_alp_penalty_scales_with_the_solve_rate_and_the_budget():
    # p_solved = 2/4 = 0.5 >= 1/K: penalty 0.5 * 0.5 * len / 400 = len / 1600
    correct, lengths = [1, 1, 0, 0], [100, 200, 50, 400]
    close(reward("alp", correct, lengths, budget=400), [0.9375, 0.875, -0.03125, -0.25])
    # half the budget doubles the penalty per token
    close(reward("alp", correct, lengths, budget=200), [0.875, 0.75, -0.0625, -0.5])


def test_alp_unsolved_prompt_pays_the_floor_rate_one_over_k():
    # p_solved = 0 < 1/K = 1/4: 0.5 * 0.25 * 400 / 400 = 0.125
    close(reward("alp", [0, 0, 0, 0], [400, 0, 400, 800], budget=400), [-0.125, 0, -0.125, -0.25])
    # every response right: p = 1, the highest rate, 1 - 0.5 * 200 / 400
    close(reward("alp", [1, 1], [200, 0], budget=400), [0.75, 1.0])


def test_new_penalty_parameters_are_checked_by_name():
    for key in ("shorter_better_alpha", "shorter_better_beta", "alp_beta"):
        with pytest.raises(ValueError, match=f"{key} must be >= 0"):
            LengthPenaltyConfig(**{key: -1.0})


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
    # element i depends only on response i, except where the group sets a scale: Kimi's min/max,
    # ShorterBetter's sample optimal length, ALP's solve rate
    if name not in ("kimi", "shorter_better", "alp"):
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


# ----------------------------------------------------------------------------- budget schedule


def test_budget_schedule_shrinks_stepwise_to_its_floor():
    # B(t) = max(30, round(100 * 0.5^floor((t-1)/10))): steps 1-10 keep 100, 11-20 50, 21- the floor
    schedule = BudgetSchedule(decay=0.5, every=10, min_budget=30)
    assert [schedule.budget(100, t) for t in (0, 1, 10, 11, 20, 21, 100)] == [100, 100, 100, 50, 50, 30, 30]
    assert BudgetSchedule(decay=0.8, every=5).budget(80, 16) == 41  # 80 * 0.8^3 = 40.96, rounded
    assert BudgetSchedule(decay=1.0, every=1).budget(80, 1000) == 80  # decay 1: a fixed budget


def test_budget_schedule_without_per_prompt_budgets_scales_the_fixed_budget():
    budgets = ScheduledBudgets(BudgetSchedule(decay=0.5, every=10), None, default=80)
    assert budgets.max_budget == 80  # rollouts still reach the unscheduled budget
    assert budgets.observe("q", [1, 0], step=11) == 40
    assert budgets.state_dict() == {}
    close(reward("truncation", [1, 1], [30, 50], budget=budgets.observe("q", [1, 1], step=11)), [1, 0])


def test_budget_schedule_scales_each_da_dler_budget_and_keeps_their_record():
    inner = DifficultyBudgets()  # easy 2000, hard 4000
    budgets = ScheduledBudgets(BudgetSchedule(decay=0.5, every=10), inner, default=4000)
    assert budgets.max_budget == 4000
    assert budgets.observe("easy", [1, 1, 1, 0], step=11) == 1000
    assert budgets.observe("hard", [1, 0, 0, 0], step=11) == 2000
    assert budgets.observe("hard", [1, 0, 0, 0], step=3) == 4000
    restored = ScheduledBudgets(BudgetSchedule(decay=0.5, every=10), DifficultyBudgets(), default=4000)
    restored.load_state_dict(json.loads(json.dumps(budgets.state_dict())))
    assert restored.inner.record == {"easy": (0.75, 11), "hard": (0.25, 3)}


def test_budget_schedule_bad_settings_are_named():
    with pytest.raises(ValueError, match="decay must be in"):
        BudgetSchedule(decay=0)
    with pytest.raises(ValueError, match="decay must be in"):
        BudgetSchedule(decay=1.5)
    with pytest.raises(ValueError, match="every must be >= 1"):
        BudgetSchedule(every=0)
    with pytest.raises(ValueError, match="min_budget must be >= 1"):
        BudgetSchedule(min_budget=0)
