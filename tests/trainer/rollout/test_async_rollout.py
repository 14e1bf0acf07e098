"""The asynchronous loop's schedule (trainer/rollout/async_rollout.py): batch b is sampled with the weights of
step max(s0, b-1-k), whatever the timing; dynamic sampling fills it exactly; a checkpoint's pending batches
resume the same run; batches older than k are dropped and counted; the producer's errors reach the trainer.
The engine here is a double whose answers depend on the weights version it holds; the real engine process:
tests/trainer/rollout/test_engine_process.py, the whole loop: tests/e2e/test_train_async.py."""

import hashlib
import json
import random
import time

import pytest
import torch

from trainer.data import Example, PromptStream
from trainer.reward.answers import AnswerChecker
from trainer.reward.rewards import LengthPenaltyConfig
from trainer.rollout.async_rollout import AsyncRollout, decode_batch, encode_batch
from trainer.rollout.contract import Sample
from trainer.rollout.sampling import DynamicSampler, SamplingConfig

PROMPTS = 400


class VersionedEngine:
    """Response j to prompt i under seed s, with weights version v: right or wrong, and its length, by a hash
    of (i, j, s, v). ``jitter`` sleeps up to that many seconds per call, to vary the timing."""

    def __init__(self, jitter: float = 0.0, fail_at_call: int | None = None):
        self.version, self.jitter, self.fail_at_call, self.calls = 0, jitter, fail_at_call, 0

    def generate(self, prompts, *, n, max_tokens, temperature, top_p, seed):
        self.calls += 1
        if self.fail_at_call == self.calls:
            raise ValueError("the engine failed")
        if self.jitter:
            time.sleep(random.random() * self.jitter)
        groups = []
        for (i,) in prompts:
            group = []
            for j in range(n):
                h = hashlib.sha256(f"{i}/{j}/{seed}/{self.version}".encode()).digest()
                answer = str(i + 100) if h[0] % 2 else "-1"
                length = 5 + h[1] % 30
                group.append(Sample([7] * length, f"so \\boxed{{{answer}}}", "stop", [-0.5] * length))
            groups.append(group)
        return groups

    def update_weights(self, named):
        self.version = int(dict(named)["version"].item())


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(mode="exact") as c:
        yield c


def make_rollout(checker, engine, k, *, start=0, last=8, pending=(), state=None, prompts_per_step=3):
    examples = [Example(f"q{i}", str(i + 100), f"id{i}", "test") for i in range(PROMPTS)]
    stream = PromptStream(examples, seed=0, shuffle=True)
    if state is not None:
        stream.load_state_dict(state["stream"])
    config = SamplingConfig(prompts_per_step=prompts_per_step, samples_per_prompt=4, max_rounds=3, oversample=1.5)
    sampler = DynamicSampler(
        engine, stream, lambda exs: [[int(e.id[2:])] for e in exs], checker,
        LengthPenaltyConfig(name="truncation", length_budget=30), config,
    )  # fmt: skip
    engine.version = start
    rollout = AsyncRollout(
        sampler, engine, staleness=k, start_step=start, last_step=last, seed_of=lambda b: 1000 + b,
        state_of=lambda: {"stream": stream.state_dict(), "budgets": None}, timeout_s=30, pending=pending,
    )  # fmt: skip
    rollout.publish(start, weights(start))
    return rollout


def weights(version: int):
    return [("version", torch.tensor(version))]


def train(rollout, steps, *, jitter=0.0, checkpoint_at=None):
    """The trainer's side: take each step's batch, 'update', publish; the batches and a checkpoint's state."""
    batches, saved = [], None
    rollout.start()
    try:
        for step in steps:
            batch, _ = rollout.take(step)
            batches.append(batch)
            if jitter:
                time.sleep(random.random() * jitter)
            rollout.publish(step, weights(step))
            if step == checkpoint_at:
                saved = json.loads(json.dumps(rollout.checkpoint_state(step)))  # as state.json holds it
    finally:
        rollout.close()
    return batches, saved


def content(batch):
    """A batch without its wall-clock figures."""
    data = encode_batch(batch)
    data["stats"] = {k: v for k, v in data["stats"].items() if not k.endswith("_seconds")}
    return data


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batch_b_is_sampled_with_the_weights_of_step_b_minus_1_minus_k_and_filled_exactly(checker, k):
    batches, _ = train(make_rollout(checker, VersionedEngine(), k), range(1, 9))
    assert [b.version for b in batches] == [max(0, b - 1 - k) for b in range(1, 9)]
    assert [b.staleness for b in batches] == [min(k, b - 1) for b in range(1, 9)]
    for b in batches:
        assert len(b.groups) == 3, "dynamic sampling fills the batch exactly"
        assert all(g.has_spread() for g in b.groups)
        assert b.stats.prompts_generated >= 3


def test_the_run_does_not_depend_on_timing_and_equals_the_synchronous_sampler_on_the_same_weights(checker):
    fast, _ = train(make_rollout(checker, VersionedEngine(), 2), range(1, 9))
    slow_engine, _ = train(make_rollout(checker, VersionedEngine(jitter=0.02), 2), range(1, 9))
    slow_trainer, _ = train(make_rollout(checker, VersionedEngine(), 2), range(1, 9), jitter=0.02)
    assert [content(b) for b in fast] == [content(b) for b in slow_engine] == [content(b) for b in slow_trainer]
    # The synchronous sampler, stepping through the same schedule by hand, draws the same batches.
    engine = VersionedEngine()
    rollout = make_rollout(checker, engine, 2)
    for b, batch in zip(range(1, 9), fast):
        engine.version = max(0, b - 3)
        groups, _ = rollout.sampler.collect(b, seed=1000 + b)
        assert [g.example.id for g in groups] == [g.example.id for g in batch.groups]
        assert [g.rewards.tolist() for g in groups] == [g.rewards.tolist() for g in batch.groups]


def test_a_checkpoint_holds_the_batches_in_flight_and_a_resume_continues_the_same_run(checker):
    straight, _ = train(make_rollout(checker, VersionedEngine(), 2), range(1, 9))
    first, saved = train(make_rollout(checker, VersionedEngine(), 2), range(1, 4), checkpoint_at=3)
    assert [p["step"] for p in saved["pending"]] == [4, 5]
    pending = [decode_batch(p) for p in saved["pending"]]
    resumed = make_rollout(checker, VersionedEngine(), 2, start=3, pending=pending, state=saved["state"])
    assert resumed.dropped_groups == 0
    rest, _ = train(resumed, range(4, 9))
    assert [content(b) for b in first + rest] == [content(b) for b in straight]


def test_a_resume_with_a_smaller_k_drops_the_stale_batches_and_counts_them(checker):
    _, saved = train(make_rollout(checker, VersionedEngine(), 2), range(1, 4), checkpoint_at=3)
    pending = [decode_batch(p) for p in saved["pending"]]  # steps 4 and 5, sampled with steps 1 and 2
    resumed = make_rollout(checker, VersionedEngine(), 1, start=3, pending=pending, state=saved["state"])
    assert resumed.dropped_groups == 6  # both batches: 4 was sampled 2 versions before its update
    rest, _ = train(resumed, range(4, 7))
    assert [b.version for b in rest] == [3, 3, 4]  # sampled again from the resumed weights on: max(3, b - 2)
    assert [b.staleness for b in rest] == [0, 1, 1]
    kept_ids = {g.example.id for b in rest for g in b.groups}
    assert not kept_ids & {g.example.id for b in pending for g in b.groups}, "dropped prompts are not trained on"


def test_an_error_of_the_producer_reaches_the_trainer_at_its_next_wait(checker):
    rollout = make_rollout(checker, VersionedEngine(fail_at_call=3), 1)
    with pytest.raises(ValueError, match="the engine failed"):
        train(rollout, range(1, 9))


def test_a_wait_for_weights_never_published_fails_instead_of_hanging(checker):
    rollout = make_rollout(checker, VersionedEngine(), 1)
    rollout.start()
    try:
        rollout.take(1)
        rollout.take(2)  # sampled with step 0's weights
        with pytest.raises(RuntimeError, match="waits for the weights of step 1, which are not published"):
            rollout.take(3)  # needs step 1's, which this 'trainer' never gave
    finally:
        rollout.close()


def test_staleness_must_be_at_least_one(checker):
    with pytest.raises(ValueError, match="staleness must be >= 1"):
        make_rollout(checker, VersionedEngine(), 0)


class WrongEngine(VersionedEngine):
    """Every answer wrong: no group has spread, every batch is short."""

    def generate(self, prompts, **sampling):
        groups = super().generate(prompts, **sampling)
        return [[Sample(s.token_ids, "so \\boxed{-1}", s.finish_reason, s.logprobs) for s in g] for g in groups]


def test_a_short_batch_carries_its_message_to_the_step_and_warns_no_other_thread(checker, recwarn):
    batches, _ = train(make_rollout(checker, WrongEngine(), 1), range(1, 3))
    for b in batches:
        assert b.stats.capped and len(b.warnings) == 1
        assert b.warnings[0].startswith("dynamic sampling: only 0 of 3 prompts have a reward spread after 3 rounds")
    assert not [w for w in recwarn if "dynamic sampling" in str(w.message)]
