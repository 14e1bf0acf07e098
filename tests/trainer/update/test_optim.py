"""AdamW construction, the learning-rate schedule's shape, gradient clipping, the weights' norm, and the
learning rate of a resume."""

import math

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.update.optim import apply_config, build_optimizer, build_scheduler, clip_gradients, lr_factor, weight_norm


def lrs(cfg: OptimConfig, total_steps: int, steps: int | None = None) -> list[float]:
    """The learning rate each training step runs at, as the trainer uses the scheduler: read the
    rate, step the optimizer, then ``scheduler.step()`` once per training step."""
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    seen = []
    for _ in range(total_steps if steps is None else steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_linear_warmup_then_constant():
    got = lrs(OptimConfig(lr=0.1, warmup_steps=4, schedule="constant", min_lr_ratio=0.5), total_steps=8)
    assert got == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])  # constant ignores min_lr_ratio


def test_no_warmup_starts_at_the_full_rate():
    assert lrs(OptimConfig(lr=0.1, schedule="constant"), total_steps=3) == pytest.approx([0.1] * 3)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_min_lr_at_the_last_step(schedule):
    cfg = OptimConfig(lr=0.1, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    got = lrs(cfg, total_steps=11, steps=13)
    assert got[:3] == pytest.approx([0.05, 0.1, 0.1])  # warmup, then the decay starts at the full rate
    assert got[10] == pytest.approx(0.01)  # the last step (10) is at lr * min_lr_ratio ...
    assert got[11:] == pytest.approx([0.01, 0.01])  # ... and stays there beyond it
    assert all(a > b for a, b in zip(got[2:11], got[3:11]))  # strictly decreasing in between
    # half way through the decay (step 6 of 2..10) both shapes are at the middle of lr and min lr
    assert got[6] == pytest.approx(0.055)
    quarter = 0.01 + 0.09 * (0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75)
    assert got[4] == pytest.approx(quarter)


def test_one_step_runs_at_the_final_rate():
    assert lr_factor(0, OptimConfig(schedule="cosine", min_lr_ratio=0.2), total_steps=1) == pytest.approx(0.2)


@pytest.mark.parametrize("total_steps", [0, 2.0, True])
def test_total_steps_must_be_a_positive_int(total_steps):
    optimizer = build_optimizer(nn.Linear(2, 2), OptimConfig())
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        build_scheduler(optimizer, OptimConfig(), total_steps)


def test_optimizer_takes_the_config_and_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    cfg = OptimConfig(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    (group,) = optimizer.param_groups
    assert group["params"] == list(model[1].parameters())
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.1)
    assert group["fused"]  # float CPU tensors: the fused kernel

    # the fused step is AdamW's: compare with the plain for-loop implementation
    plain = nn.Linear(4, 2)
    plain.load_state_dict(model[1].state_dict())
    reference = torch.optim.AdamW(
        plain.parameters(), lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False
    )
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for net, opt in ((model[1], optimizer), (plain, reference)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for got, want in zip(model[1].parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)

    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, cfg)


def two_models_with_gradients(scale: float = 1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    (model(torch.randn(32, 8)).square().sum() * scale).backward()
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    for a, b in zip(model.parameters(), twin.parameters()):
        b.grad = a.grad.clone()
    return model, twin


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_gradients_matches_torch(max_norm):
    model, twin = two_models_with_gradients()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
    got = clip_gradients(model, max_norm)
    assert isinstance(got, float) and got == pytest.approx(float(want), rel=1e-6)
    assert got > 0.5  # so that max_norm 0.5 clips and 1e6 does not
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_no_max_norm_measures_without_clipping():
    model, twin = two_models_with_gradients()
    assert clip_gradients(model, None) == pytest.approx(
        float(torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]))
    )
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_norm_is_returned_and_gradients_are_left_alone(bad):
    model, twin = two_models_with_gradients()
    model[0].weight.grad[0, 0] = bad
    twin[0].weight.grad[0, 0] = bad
    norm = clip_gradients(model, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) == math.isnan(bad))
    for a, b in zip(model.parameters(), twin.parameters()):  # not scaled by 1/inf = 0 nor by nan
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def test_no_gradients_have_norm_zero():
    model = nn.Linear(2, 2)
    assert clip_gradients(model, 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_gradients(model, 0.0)


def _stepped(cfg: OptimConfig, steps: int):
    """A model, optimizer and scheduler after ``steps`` training steps."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for _ in range(steps):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def test_a_resume_with_another_learning_rate_trains_at_it_on_the_same_schedule():
    """`dler train --resume RUN optim.lr=...` (a diverged run's way on): the restored optimizer and scheduler bring
    back the rate they were saved with; the config's replaces it from the next step, at the same point of the
    schedule. With the same config nothing changes (an unchanged resume stays exact)."""
    saved_cfg = OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine", weight_decay=0.01)
    _, saved_opt, saved_sched = _stepped(saved_cfg, 3)
    for cfg in (saved_cfg, OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.0)):
        _, optimizer, scheduler = _stepped(cfg, 0)
        optimizer.load_state_dict(saved_opt.state_dict())
        scheduler.load_state_dict(saved_sched.state_dict())
        assert optimizer.param_groups[0]["lr"] == saved_opt.param_groups[0]["lr"]  # what a restore alone gives
        apply_config(optimizer, scheduler, cfg)
        group = optimizer.param_groups[0]
        assert group["lr"] == scheduler.get_last_lr()[0] == cfg.lr * lr_factor(3, cfg, 10)
        assert group["weight_decay"] == cfg.weight_decay
        if cfg is saved_cfg:
            assert {k: v for k, v in group.items() if k != "params"} == {
                k: v for k, v in saved_opt.param_groups[0].items() if k != "params"
            }
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(4, cfg, 10), rel=1e-12)


def test_weight_norm_is_the_norm_of_all_the_weights():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.fill_(4.0)
    assert weight_norm(model) == pytest.approx(5.0, abs=1e-6)
