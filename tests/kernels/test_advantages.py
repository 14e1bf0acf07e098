"""compute_advantages (Triton kernel through the interpreter, and the reference) against hand
computations and numpy."""

import numpy as np
import pytest
import torch
from oracle_checks import advantage_inputs

import dler_kernels
from dler_kernels import compute_advantages, reference

BACKENDS = ["triton", "reference"] if dler_kernels.HAS_TRITON else ["reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DLER_BACKEND", request.param)
    return request.param


def test_dr_grpo_and_dynamic_sampling_by_hand(backend):
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = compute_advantages(rewards, groups, method="dr_grpo")
    assert out.keep.tolist() == [True, True, False, False, False, False, True, True]
    assert out.values.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5, 0.5]
    assert out.stats["num_groups"].item() == 4 and out.stats["num_kept_groups"].item() == 2


def test_grpo_uses_the_unbiased_group_std(backend):
    rewards = torch.tensor([1.0, 0.0, 0.0])
    out = compute_advantages(rewards, torch.zeros(3, dtype=torch.long), method="grpo", eps=0.0)
    std = np.std([1.0, 0.0, 0.0], ddof=1)
    np.testing.assert_allclose(out.values.numpy(), (np.array([1.0, 0.0, 0.0]) - 1 / 3) / std, rtol=1e-6)


def test_correctness_decides_dynamic_sampling_not_the_penalised_reward(backend):
    # All four correct, but one truncated (penalised to 0.1): R' has spread, R has none -> dropped.
    rewards = torch.tensor([1.0, 1.0, 0.1, 1.0])
    correct = torch.ones(4)
    groups = torch.zeros(4, dtype=torch.long)
    assert not compute_advantages(rewards, groups, method="dr_grpo", correctness=correct).keep.any()
    assert compute_advantages(rewards, groups, method="dr_grpo").keep.all()  # correctness defaults to rewards
    kept = compute_advantages(rewards, groups, method="dr_grpo", correctness=correct, dynamic_sampling=False)
    assert kept.keep.all() and kept.values[2].item() == pytest.approx(0.1 - 3.1 / 4)


def _expanded_reference(rewards, groups, counts, keep):
    """Token weighting == sample weighting over the batch where each response appears once per token."""
    centered = []
    for r, g, n, k in zip(rewards, groups, counts, keep):
        if k:
            members = [x for x, h in zip(rewards, groups) if h == g]
            centered += [r - np.mean(members)] * int(n)
    return np.mean(centered), np.std(centered, ddof=1)


@pytest.mark.parametrize("seed", range(4))
def test_dler_token_weighting_equals_replicating_each_response_per_token(backend, seed):
    g = torch.Generator().manual_seed(seed)
    n_prompts, group = 7, 4
    rewards = (torch.rand(n_prompts * group, generator=g) > 0.5).float() * torch.where(
        torch.rand(n_prompts * group, generator=g) > 0.8, 0.1, 1.0
    )
    groups = torch.arange(n_prompts).repeat_interleave(group)[torch.randperm(n_prompts * group, generator=g)]
    counts = torch.randint(1, 60, (n_prompts * group,), generator=g)
    out = compute_advantages(rewards, groups, method="dler", token_counts=counts, eps=0.0)
    mean_b, std_b = _expanded_reference(rewards.tolist(), groups.tolist(), counts.tolist(), out.keep.tolist())
    assert out.stats["batch_mean"].item() == pytest.approx(mean_b, abs=1e-6)
    assert out.stats["batch_std"].item() == pytest.approx(std_b, rel=1e-5)
    kept = out.keep
    c = np.array([r - rewards[groups == gid].mean().item() for r, gid in zip(rewards.tolist(), groups.tolist())])
    np.testing.assert_allclose(out.values[kept].numpy(), (c[kept.numpy()] - mean_b) / std_b, rtol=1e-5, atol=1e-6)
    assert (out.values[~kept] == 0).all()


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dler"])
@pytest.mark.parametrize("weighting", ["token", "sample"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_matches_float64_reference(backend, method, weighting, dynamic):
    rewards, groups, correct, counts = advantage_inputs()
    kw = dict(method=method, correctness=correct, token_counts=counts, weighting=weighting, dynamic_sampling=dynamic)
    out = compute_advantages(rewards, groups, **kw)
    values64, keep64, stats64 = reference.compute_advantages_ref(rewards.double(), groups, **kw)
    assert torch.equal(out.keep, keep64)
    torch.testing.assert_close(out.values.double(), values64, rtol=1e-5, atol=1e-5)
    for key, value in stats64.items():
        assert out.stats[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_empty_batch_and_all_dropped(backend):
    out = compute_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]), token_counts=torch.ones(4))
    assert not out.keep.any() and (out.values == 0).all() and torch.isfinite(out.values).all()
    empty = compute_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), method="grpo")
    assert empty.values.shape == (0,)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="ppo"), "method must be one of"),
        (dict(weighting="seq"), "weighting must be one of"),
        (dict(token_counts=None), "token_counts is required"),
        (dict(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids must have 4 entries"),
        (dict(group_ids=torch.zeros(4)), "group_ids must be an integer"),
        (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), "rewards must be finite"),
        (dict(token_counts=torch.tensor([1, -2, 3, 4])), "token_counts must be >= 0"),
        (dict(eps=-1.0), "eps must be >= 0"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                token_counts=torch.tensor([3, 4, 5, 6]))  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_advantages(**args)
