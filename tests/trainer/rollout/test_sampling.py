"""Dynamic sampling: the batch is filled exactly, only zero-spread groups are dropped, the round
cap stops it. A scripted engine makes every group's correctness known in advance; the answer
checker is the real one. The same sampler on the real vLLM engine: tests/integrations/test_rollout.py."""

import warnings

import numpy as np
import pytest

from trainer.data import Example, PromptStream
from trainer.reward.answers import AnswerChecker
from trainer.reward.budgets import BudgetSchedule, DifficultyBudgets, ScheduledBudgets
from trainer.reward.rewards import LengthPenaltyConfig
from trainer.rollout.contract import Sample
from trainer.rollout.sampling import DynamicSampler, RolloutBatch, SamplingConfig, SamplingWarning, gfpo_retain


class ScriptedEngine:
    """Answers prompt [i] with the pattern script[i]: 'R' a right answer, 'W' a wrong one, 'T' a
    right answer cut by max_tokens. Response j of a group has 10 * (j + 1) tokens, or lengths[i][j]."""

    def __init__(self, script: dict[int, str], golds: dict[int, str], lengths: dict[int, list[int]] | None = None):
        self.script, self.golds, self.lengths, self.calls = script, golds, lengths or {}, []

    def generate(self, prompts, *, n, max_tokens, temperature, top_p, seed):
        self.calls.append({"prompts": [p[0] for p in prompts], "n": n, "max_tokens": max_tokens, "seed": seed})
        groups = []
        for (i,) in prompts:
            pattern = self.script[i]
            assert len(pattern) == n
            group = []
            for j, kind in enumerate(pattern):
                answer = self.golds[i] if kind in "RT" else "-1"
                length = self.lengths[i][j] if i in self.lengths else 10 * (j + 1)
                group.append(Sample([5] * length, f"so \\boxed{{{answer}}}", "length" if kind == "T" else "stop", []))
            groups.append(group)
        return groups

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def sleep(self):
        pass

    def wake_up(self, tags=None):
        pass


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(mode="exact") as c:
        yield c


def make_sampler(checker, script, *, penalty=None, budgets=None, seed=0, another_round=bool, lengths=None, **config):
    examples = [Example(f"q{i}", str(i + 100), f"id{i}", "test") for i in range(len(script))]
    engine = ScriptedEngine(dict(enumerate(script)), {i: str(i + 100) for i in range(len(script))}, lengths)
    stream = PromptStream(examples, seed=seed, shuffle=False)
    prompt_ids = lambda exs: [[int(e.id[2:])] for e in exs]
    penalty = penalty or LengthPenaltyConfig(name="truncation", length_budget=100)
    sampler = DynamicSampler(
        engine, stream, prompt_ids, checker, penalty, SamplingConfig(**config), budgets, another_round=another_round
    )
    return sampler, engine


def test_fills_the_batch_exactly_and_drops_only_zero_spread_groups(checker):
    script = ["RRRR", "RWRW", "WWWW", "RRRW", "WWWW", "RRRR", "WRWW", "RWWW", "RRWW", "RRRR", "WWWR", "RWRR"]
    sampler, engine = make_sampler(checker, script, prompts_per_step=4, samples_per_prompt=4, max_rounds=10)
    batch, stats = sampler.collect(step=0)
    assert len(batch) == 4
    assert [g.example.id for g in batch] == ["id1", "id3", "id6", "id7"]  # stream order, spread only
    generated = [i for call in engine.calls for i in call["prompts"]]
    dropped = set(generated) - {int(g.example.id[2:]) for g in batch}
    assert all(len(set(script[i])) == 1 for i in dropped)  # every dropped group had zero spread
    # round 1 asks for 4 prompts (2 kept), round 2 for 2 / 0.5 = 4 (2 more kept): 8 generated
    assert [len(c["prompts"]) for c in engine.calls] == [4, 4] and stats.rounds == 2
    assert stats.prompts_generated == 8 and stats.groups_with_spread == 4 and stats.kept_fraction == 0.5
    assert stats.groups_all_correct == 2 and stats.groups_all_wrong == 2
    assert len({c["seed"] for c in engine.calls}) == 2  # each round samples afresh
    assert not stats.capped


def test_cuts_to_exactly_the_target_when_a_round_overshoots(checker):
    script = ["RWRW"] * 10
    sampler, engine = make_sampler(checker, script, prompts_per_step=3, samples_per_prompt=4, oversample=2.0)
    batch, stats = sampler.collect(step=0)
    assert [len(c["prompts"]) for c in engine.calls] == [6]
    assert len(batch) == 3 and stats.groups_with_spread == 6
    assert sampler.stream.position == 6  # the extra prompts were drawn and are not drawn again


def test_stops_at_the_round_cap_with_a_warning(checker):
    script = ["WWWW"] * 30 + ["RWWW"] * 2
    sampler, engine = make_sampler(
        checker, script, prompts_per_step=4, samples_per_prompt=4, max_rounds=3, max_prompts_per_round=8
    )
    # the counts in the message are of this collect call (they were zero before the summary ran first)
    message = r"only 0 of 4 prompts .* after 3 rounds \(20 prompts generated: 0 all correct, 20 all wrong\)"
    with pytest.warns(SamplingWarning, match=message):
        batch, stats = sampler.collect(step=0)
    assert batch == [] and stats.capped and stats.rounds == 3 and len(engine.calls) == 3
    # with nothing kept, later rounds grow to the per-round cap
    assert [len(c["prompts"]) for c in engine.calls] == [4, 8, 8]
    assert stats.groups_all_wrong == 20 and stats.accuracy == 0.0


def test_partial_batch_at_the_cap(checker):
    script = ["RWWW", "WWWW", "WWWW", "WWWW", "RRRR", "WWWW", "WWWW", "WWWW"]
    sampler, _ = make_sampler(checker, script, prompts_per_step=4, samples_per_prompt=4, max_rounds=1)
    with pytest.warns(SamplingWarning, match="only 1 of 4"):
        batch, stats = sampler.collect(step=0)
    assert [g.example.id for g in batch] == ["id0"] and stats.capped


def test_without_dynamic_sampling_every_group_is_kept(checker):
    script = ["WWWW", "RRRR", "RWRW", "WWWW"]
    sampler, engine = make_sampler(checker, script, prompts_per_step=4, samples_per_prompt=4, dynamic_sampling=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch, stats = sampler.collect(step=0)
    assert len(batch) == 4 and len(engine.calls) == 1 and stats.groups_with_spread == 1


def test_a_full_sampler_joins_the_rounds_other_ranks_need_with_no_prompts(checker):
    """Rounds are collective: engines of several ranks may step in lockstep (vLLM data parallelism), so
    a rank whose batch is full still calls generate, with no prompts, while another rank is short."""
    script = ["RWRW"] * 8
    others_short = [True, True, False]  # another rank needs two more rounds after this one's first
    asked = []

    def another_round(short: bool) -> bool:
        asked.append(short)
        return short or others_short.pop(0)

    sampler, engine = make_sampler(
        checker, script, prompts_per_step=2, samples_per_prompt=4, oversample=1.0, another_round=another_round
    )
    batch, stats = sampler.collect(step=0)
    assert [len(c["prompts"]) for c in engine.calls] == [2, 0, 0]
    assert asked == [True, False, False, False]  # full after the first round; the fourth vote ends it
    assert len(batch) == 2 and stats.rounds == 1 and stats.prompts_generated == 2
    assert sampler.stream.position == 2  # empty rounds draw nothing


def test_statistics_and_rewards_of_the_batch(checker):
    # lengths 10, 20, 30, 40; budget 25: responses 3 and 4 of a group exceed it
    script = ["RTWR", "RRRW"]
    sampler, engine = make_sampler(
        checker,
        script,
        penalty=LengthPenaltyConfig(name="truncation", length_budget=25, truncation_coef=0.1),
        prompts_per_step=2,
        samples_per_prompt=4,
        max_tokens=50,
    )
    batch, stats = sampler.collect(step=0)
    assert engine.calls[0]["max_tokens"] == 50
    np.testing.assert_array_equal(batch[0].correct, [1, 1, 0, 1])  # 'T' is right but truncated
    np.testing.assert_array_equal(batch[0].truncated, [False, True, False, False])
    np.testing.assert_allclose(batch[0].rewards, [1, 0.1, 0, 0.1])
    np.testing.assert_allclose(batch[1].rewards, [1, 1, 0.1, 0])
    assert stats.samples == 8 and stats.accuracy == 6 / 8 and stats.mean_length == 25.0
    assert stats.truncation_rate == 1 / 8 and stats.generated_tokens == 200
    assert stats.mean_reward == pytest.approx((1.2 + 2.1) / 8)
    flat = RolloutBatch.from_groups(batch)
    assert len(flat) == 8 and flat.group_ids.tolist() == [0] * 4 + [1] * 4
    np.testing.assert_allclose(flat.rewards, np.concatenate([g.rewards for g in batch]))
    assert flat.lengths.tolist() == [10, 20, 30, 40] * 2 and flat.prompt_ids[5] == [1]
    assert stats.as_dict()["kept_fraction"] == 1.0


def test_da_dler_budgets_in_the_sampler(checker):
    # paper setting scaled down: c >= 0.5 -> budget 20, else 35; rollouts go to the larger budget
    budgets = DifficultyBudgets(thresholds=(0.5,), budgets=(35, 20))
    script = ["RRRW", "RWWW"]
    sampler, engine = make_sampler(
        checker,
        script,
        penalty=LengthPenaltyConfig(name="truncation"),
        budgets=budgets,
        prompts_per_step=2,
        samples_per_prompt=4,
    )
    batch, stats = sampler.collect(step=7)
    assert engine.calls[0]["max_tokens"] == 35
    assert [g.budget for g in batch] == [20, 35]
    np.testing.assert_allclose(batch[0].rewards, [1, 1, 0, 0])  # easy: 30 and 40 tokens exceed 20
    np.testing.assert_allclose(batch[1].rewards, [1, 0, 0, 0])
    assert budgets.record == {"id0": (0.75, 7), "id1": (0.25, 7)}
    assert stats.budgets == {20: 1, 35: 1}


def test_sampler_settings_are_checked(checker):
    with pytest.raises(ValueError, match="max_tokens .* must be >= the largest DA-DLER budget"):
        make_sampler(checker, ["RW"], budgets=DifficultyBudgets(), samples_per_prompt=2, max_tokens=100)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        SamplingConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="prompts_per_step must be >= 1"):
        SamplingConfig(prompts_per_step=0)
    with pytest.raises(ValueError, match="oversample must be >= 1"):
        SamplingConfig(oversample=0.5)
    with pytest.raises(ValueError, match="max_prompts_per_round"):
        SamplingConfig(prompts_per_step=8, max_prompts_per_round=4)


def test_gfpo_retains_the_shortest_or_the_most_efficient_responses():
    lengths, rewards = [40, 10, 30, 10, 0], [1, 0, 1, 1, 0]
    # shortest: 0 (index 4), 10 (index 1, earlier of the tie), 10 (index 3); returned in group order
    assert gfpo_retain(lengths, rewards, 3, "length").tolist() == [1, 3, 4]
    # reward per token: 1/10 (3), 1/30 (2), 1/40 (0); the empty wrong response counts as 1 token (0 / 1)
    assert gfpo_retain(lengths, rewards, 3, "token_efficiency").tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        gfpo_retain(lengths, rewards, 6)
    with pytest.raises(ValueError, match="metric must be one of"):
        gfpo_retain(lengths, rewards, 2, "reward")


def test_gfpo_samples_the_larger_group_and_trains_on_the_retained_responses(checker):
    # 6 responses of 10..60 tokens; the 3 shortest of "WRWRRW" are W R W (spread); of "RRRWWW" R R R (no
    # spread: dropped by dynamic sampling although the whole group had one)
    script = ["RRRWWW", "WRWRRW"]
    sampler, engine = make_sampler(
        checker,
        script,
        prompts_per_step=1,
        samples_per_prompt=3,
        gfpo_sample_size=6,
        max_rounds=2,
        max_prompts_per_round=1,
    )
    batch, stats = sampler.collect(step=0)
    assert [c["n"] for c in engine.calls] == [6, 6]
    assert [g.example.id for g in batch] == ["id1"]
    np.testing.assert_array_equal(batch[0].correct, [0, 1, 0])
    assert batch[0].lengths.tolist() == [10, 20, 30] and len(batch[0].samples) == 3
    # the rollout statistics cover every sampled response; the batch only the retained ones
    assert stats.samples == 12 and stats.accuracy == 6 / 12 and stats.mean_reward == pytest.approx(1 / 3)
    assert len(RolloutBatch.from_groups(batch)) == 3
    # the group counts judge what dynamic sampling judged: "RRRWWW" kept R R R (all correct), not its mixed whole
    assert stats.groups_all_correct == 1 and stats.groups_all_wrong == 0


def test_gfpo_advantages_are_normalised_over_the_retained_responses(checker):
    from trainer.update.global_batch import global_advantages

    sampler, _ = make_sampler(checker, ["WRWRRW"], prompts_per_step=1, samples_per_prompt=3, gfpo_sample_size=6)
    batch, _ = sampler.collect(step=0)
    rows, stats = global_advantages(batch, dict(method="grpo", eps=1e-6, dynamic_sampling=True))
    # retained rewards 0, 1, 0 (the filtered-out 1, 1, 0 play no part): mean 1/3, unbiased std
    # sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3), grpo's convention
    mean, std = 1 / 3, np.sqrt(1 / 3)
    expected = [(r - mean) / (std + 1e-6) for r in (0, 1, 0)]
    np.testing.assert_allclose([row.advantage for row in rows], expected, rtol=1e-6)  # float32 kernel
    assert stats["batch_responses"] == 3


def test_gfpo_settings_are_checked():
    with pytest.raises(ValueError, match=r"gfpo_sample_size \(8\) must be larger than samples_per_prompt \(8\)"):
        SamplingConfig(samples_per_prompt=8, gfpo_sample_size=8)
    with pytest.raises(ValueError, match="gfpo_metric must be one of"):
        SamplingConfig(gfpo_metric="reward")


# ------------------------------------------------------------------ what dynamic sampling judges: reward or correctness

# Groups whose responses are all correct but whose rewards the length penalty separates: each the first prompt of
# its script, followed by an all-correct group of equal rewards (dropped under either rule) and a mixed one.
LENGTH_SIGNAL_CASES = {
    # DA-DLER: all 4 correct, lengths 1500..3000; easy (c = 1 >= 0.5) -> budget 2000: rewards [1, 1, 0, 0]
    "da_dler": dict(
        lengths=[1500, 1800, 2500, 3000],
        budgets=lambda: DifficultyBudgets(thresholds=(0.5,), budgets=(4000, 2000)),
        penalty=LengthPenaltyConfig(name="truncation", length_budget=4000),
        max_tokens=4000,
        rewards=[1, 1, 0, 0],
    ),
    # a budget schedule at budget 30 (generation limit 80): lengths 20, 25, 50, 70 -> rewards [1, 1, 0, 0]
    "schedule": dict(
        lengths=[20, 25, 50, 70],
        budgets=lambda: ScheduledBudgets(BudgetSchedule(decay=0.375, every=1, min_budget=30), default=80),
        penalty=LengthPenaltyConfig(name="truncation", length_budget=80),
        max_tokens=80,
        rewards=[1, 1, 0, 0],
    ),
    # ALP (all correct: the solve rate is 1, every response pays beta * length / L): rewards differ
    "alp": dict(
        lengths=[20, 40, 60, 80],
        budgets=lambda: None,
        penalty=LengthPenaltyConfig(name="alp", length_budget=80),
        max_tokens=80,
        rewards=None,
    ),
}


@pytest.mark.parametrize("case", sorted(LENGTH_SIGNAL_CASES))
@pytest.mark.parametrize("on", ["reward", "correctness"])
def test_a_group_the_length_penalty_separates_is_kept_on_reward_and_dropped_on_correctness(checker, case, on):
    spec = LENGTH_SIGNAL_CASES[case]
    script = ["RRRR", "RRRR", "RWRW"]
    lengths = {0: spec["lengths"], 1: [5, 5, 5, 5], 2: [5, 5, 5, 5]}
    sampler, engine = make_sampler(
        checker, script, penalty=spec["penalty"], budgets=spec["budgets"](), lengths=lengths, prompts_per_step=1,
        samples_per_prompt=4, max_tokens=spec["max_tokens"], max_rounds=3, max_prompts_per_round=1,
        dynamic_sampling_on=on,
    )  # fmt: skip
    batch, stats = sampler.collect(step=2)
    if on == "reward":
        assert [g.example.id for g in batch] == ["id0"] and len(engine.calls) == 1
        rewards = batch[0].rewards
        assert len(set(rewards.tolist())) > 1 and batch[0].correct.tolist() == [1, 1, 1, 1]
        if spec["rewards"] is not None:
            np.testing.assert_allclose(rewards, spec["rewards"])
        assert stats.groups_with_spread == 1 and stats.groups_length_signal == 1 and stats.groups_all_correct == 0
    else:
        # the release's rule: both all-correct groups dropped, the mixed third prompt kept
        assert [g.example.id for g in batch] == ["id2"] and len(engine.calls) == 3
        assert stats.groups_all_correct == 2 and stats.groups_length_signal == 0


def test_the_advantages_keep_the_groups_the_sampler_kept(checker):
    """The kernel's dynamic-sampling keep-mask judges what the sampler judged: judging correctness there would zero
    the advantages of the all-correct group the sampler kept for its reward spread."""
    from trainer.update.global_batch import global_advantages

    spec = LENGTH_SIGNAL_CASES["da_dler"]
    sampler, _ = make_sampler(
        checker, ["RRRR"], penalty=spec["penalty"], budgets=spec["budgets"](), lengths={0: spec["lengths"]},
        prompts_per_step=1, samples_per_prompt=4, max_tokens=4000,
    )  # fmt: skip
    batch, _ = sampler.collect(step=1)
    kwargs = dict(method="dr_grpo", eps=1e-6, dynamic_sampling=True)
    rows, _ = global_advantages(batch, kwargs, spread_on="reward")
    assert [row.advantage for row in rows] == [0.5, 0.5, -0.5, -0.5]
    rows, _ = global_advantages(batch, kwargs, spread_on="correctness")
    assert [row.advantage for row in rows] == [0.0, 0.0, 0.0, 0.0]


def test_the_correct_response_boost_is_added_after_the_normalisation(checker):
    """The DLER release's boost: + correct_boost to every response the checker scored correct, also one the penalty
    zeroed (the release judges its verifier score before the stop-properly penalty); none to a wrong one."""
    from trainer.update.global_batch import global_advantages

    sampler, _ = make_sampler(checker, ["RTWR"], prompts_per_step=1, samples_per_prompt=4, max_tokens=100)
    batch, _ = sampler.collect(step=0)
    np.testing.assert_allclose(batch[0].rewards, [1, 0, 0, 1])  # 'T' is right but cut by max_tokens
    kwargs = dict(method="dr_grpo", eps=1e-6, dynamic_sampling=True)
    plain, _ = global_advantages(batch, kwargs)
    boosted, stats = global_advantages(batch, kwargs, correct_boost=0.1)
    assert [row.advantage for row in plain] == [0.5, -0.5, -0.5, 0.5]
    np.testing.assert_allclose([row.advantage for row in boosted], [0.6, -0.4, -0.5, 0.6], rtol=1e-6)
    assert stats["advantage_max"] == pytest.approx(0.6) and stats["advantage_min"] == pytest.approx(-0.5)
    # with the DLER batch normalisation the boost comes after it: the boosted values are the plain ones + 0.1
    kwargs = dict(method="dler", eps=1e-6, dynamic_sampling=True, weighting="sample")
    plain, _ = global_advantages(batch, kwargs)
    boosted, _ = global_advantages(batch, kwargs, correct_boost=0.1)
    diff = [b.advantage - p.advantage for b, p in zip(boosted, plain)]
    np.testing.assert_allclose(diff, [0.1, 0.1, 0.0, 0.1], atol=1e-6)
