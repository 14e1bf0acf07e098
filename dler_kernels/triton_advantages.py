"""Advantages in one Triton launch: group statistics, the dynamic-sampling keep-mask, DLER's
batch statistics and the per-response values (semantics: ``reference.compute_advantages_ref``).

A single program walks the B responses in tiles, in phases separated by barriers:
1. per group (float atomics into [G] scratch): sum of rewards, size, min and max correctness;
2. (GRPO) per group: sum of squared deviations from the group mean;
3. (DLER) over kept responses: weighted mean, then weighted variance of R - mean_g R;
4. values and keep written per response.
B is a few thousand responses per step, so one program suffices and keeps the phases ordered
without a grid-wide synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelLaunch, launch_device
from .reference import advantage_stats

METHOD_CODES = {"grpo": 0, "dr_grpo": 1, "dler": 2}


@triton.jit
def _centered_and_keep(i, B, rewards_ptr, group_ptr, sum_ptr, size_ptr, cmax_ptr, cmin_ptr, DYNAMIC: tl.constexpr):
    """For responses ``i``: group index, group size, R - mean_g R, and whether dynamic sampling keeps it
    (needs phase 1's group sums)."""
    m = i < B
    g = tl.load(group_ptr + i, mask=m, other=0)
    r = tl.load(rewards_ptr + i, mask=m, other=0.0).to(tl.float32)
    size = tl.load(size_ptr + g, mask=m, other=1.0)
    centered = r - tl.load(sum_ptr + g, mask=m, other=0.0) / size
    keep = m
    if DYNAMIC:
        keep = keep & (tl.load(cmax_ptr + g, mask=m, other=0.0) > tl.load(cmin_ptr + g, mask=m, other=0.0))
    return g, size, centered, keep


@triton.jit
def _advantages_kernel(
    rewards_ptr,
    correct_ptr,
    group_ptr,
    weight_ptr,
    sum_ptr,
    size_ptr,
    cmax_ptr,
    cmin_ptr,
    sq_ptr,
    values_ptr,
    keep_ptr,
    batch_stats_ptr,
    B,
    eps,
    METHOD: tl.constexpr,
    DYNAMIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    for start in range(0, B, BLOCK):
        i = start + offs
        m = i < B
        g = tl.load(group_ptr + i, mask=m, other=0)
        r = tl.load(rewards_ptr + i, mask=m, other=0.0).to(tl.float32)
        c = tl.load(correct_ptr + i, mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(sum_ptr + g, r, mask=m)
        tl.atomic_add(size_ptr + g, tl.full((BLOCK,), 1.0, tl.float32), mask=m)
        tl.atomic_max(cmax_ptr + g, c, mask=m)
        tl.atomic_min(cmin_ptr + g, c, mask=m)
    tl.debug_barrier()
    if METHOD == 0:
        for start in range(0, B, BLOCK):
            i = start + offs
            g, size, centered, keep = _centered_and_keep(
                i, B, rewards_ptr, group_ptr, sum_ptr, size_ptr, cmax_ptr, cmin_ptr, False
            )
            tl.atomic_add(sq_ptr + g, centered * centered, mask=i < B)
        tl.debug_barrier()
    mean_b = 0.0
    std_b = 0.0
    if METHOD == 2:
        total_w = 0.0
        total_wx = 0.0
        for start in range(0, B, BLOCK):
            i = start + offs
            g, size, centered, keep = _centered_and_keep(
                i, B, rewards_ptr, group_ptr, sum_ptr, size_ptr, cmax_ptr, cmin_ptr, DYNAMIC
            )
            w = tl.where(keep, tl.load(weight_ptr + i, mask=i < B, other=0.0).to(tl.float32), 0.0)
            total_w += tl.sum(w, axis=0)
            total_wx += tl.sum(w * centered, axis=0)
        mean_b = total_wx / tl.maximum(total_w, 1.0)
        total_wsq = 0.0
        for start in range(0, B, BLOCK):
            i = start + offs
            g, size, centered, keep = _centered_and_keep(
                i, B, rewards_ptr, group_ptr, sum_ptr, size_ptr, cmax_ptr, cmin_ptr, DYNAMIC
            )
            w = tl.where(keep, tl.load(weight_ptr + i, mask=i < B, other=0.0).to(tl.float32), 0.0)
            total_wsq += tl.sum(w * (centered - mean_b) * (centered - mean_b), axis=0)
        std_b = tl.sqrt(total_wsq / tl.maximum(total_w - 1.0, 1.0))
        tl.store(batch_stats_ptr, mean_b)
        tl.store(batch_stats_ptr + 1, std_b)
    for start in range(0, B, BLOCK):
        i = start + offs
        g, size, centered, keep = _centered_and_keep(
            i, B, rewards_ptr, group_ptr, sum_ptr, size_ptr, cmax_ptr, cmin_ptr, DYNAMIC
        )
        if METHOD == 0:
            std_g = tl.sqrt(tl.load(sq_ptr + g, mask=i < B, other=0.0) / tl.maximum(size - 1.0, 1.0))
            value = centered / (std_g + eps)
        elif METHOD == 1:
            value = centered
        else:
            value = (centered - mean_b) / (std_b + eps)
        tl.store(values_ptr + i, tl.where(keep, value, 0.0), mask=i < B)
        tl.store(keep_ptr + i, keep.to(tl.int8), mask=i < B)


def advantages_launch(rewards, groups, n_groups, *, method, correctness, token_counts, weighting, eps,
                      dynamic_sampling, device=None):  # fmt: skip
    """The launch of the advantages kernel (None when there are no responses) and its buffers
    ``(values, keep, cmax, cmin, batch_stats)``, configured for ``device`` (default:
    ``launch_device(rewards)``). ``groups`` [B]: each response's group index in 0 .. n_groups - 1."""
    dev = rewards.device
    b = rewards.shape[0]
    f32 = dict(dtype=torch.float32, device=dev)
    correct = (correctness if correctness is not None else rewards).to(torch.float32).contiguous()
    if method == "dler" and weighting == "token":
        weights = token_counts.to(torch.float32).contiguous()
    else:
        weights = torch.ones(b, **f32)
    group_sum, group_size, group_sq = (torch.zeros(max(n_groups, 1), **f32) for _ in range(3))
    cmax = torch.full((max(n_groups, 1),), float("-inf"), **f32)
    cmin = torch.full((max(n_groups, 1),), float("inf"), **f32)
    values = torch.empty(b, **f32)
    keep = torch.empty(b, dtype=torch.int8, device=dev)
    batch_stats = torch.zeros(2, **f32)
    buffers = values, keep, cmax, cmin, batch_stats
    if b == 0:
        return None, buffers
    device = launch_device(rewards) if device is None else torch.device(device)
    args = (
        rewards.contiguous(), correct, groups.to(torch.int32).contiguous(), weights,
        group_sum, group_size, cmax, cmin, group_sq, values, keep, batch_stats, b, eps,
    )  # fmt: skip
    constexprs = dict(METHOD=METHOD_CODES[method], DYNAMIC=dynamic_sampling, BLOCK=1024)
    return KernelLaunch(_advantages_kernel, (1,), args, constexprs, 4, device, "advantages"), buffers


def triton_advantages(rewards, group_ids, *, method, correctness, token_counts, weighting, eps, dynamic_sampling):
    """Arguments already validated by ``compute_advantages``. Returns ``(values, keep, stats)``."""
    dev = rewards.device
    b = rewards.shape[0]
    _, groups = torch.unique(group_ids, return_inverse=True)
    n_groups = int(groups.max()) + 1 if b else 0
    launch, (values, keep, cmax, cmin, batch_stats) = advantages_launch(
        rewards, groups, n_groups, method=method, correctness=correctness, token_counts=token_counts,
        weighting=weighting, eps=eps, dynamic_sampling=dynamic_sampling,
    )  # fmt: skip
    if launch is not None:
        launch.run()
    keep = keep.bool()
    group_keep = (
        cmax[:n_groups] > cmin[:n_groups] if dynamic_sampling else torch.ones(n_groups, dtype=torch.bool, device=dev)
    )
    stats = advantage_stats(rewards, values, keep, group_keep)
    if method == "dler":
        stats["batch_mean"], stats["batch_std"] = batch_stats[0], batch_stats[1]
    return values, keep, stats
