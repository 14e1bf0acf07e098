"""How the Triton kernels are launched (``dler_kernels._launch``): every launch runs under a guard for its
inputs' device (Triton launches on the *current* CUDA device otherwise), and the recording mode the AOT
check uses configures launches for another device without running them."""

import contextlib

import pytest
import torch

import dler_kernels
from dler_kernels import _launch, compute_advantages, linear_policy_loss, policy_loss, token_logprobs

pytestmark = pytest.mark.skipif(not dler_kernels.HAS_TRITON, reason="triton is not installed")


def test_the_guard_makes_a_cuda_tensors_device_current_and_is_empty_elsewhere():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without a GPU; entered only on one
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_triton_launch_runs_under_a_guard_for_its_inputs_device(monkeypatch):
    """Runs every Triton kernel (interpreted, CPU tensors) through the public ops; the guard factory and the
    kernels are wrapped to record, at each launch, the device of the guard in force."""
    from dler_kernels import triton_advantages, triton_policy_loss

    monkeypatch.setenv("DLER_BACKEND", "triton")
    in_force = []  # the device of the innermost guard entered (a stack: guards do not nest here, but could)
    launches = []

    @contextlib.contextmanager
    def recording_guard(device):
        in_force.append(torch.device(device))
        try:
            yield
        finally:
            in_force.pop()

    class Spy:
        """Stands for a kernel: records the guard in force when it is launched, then launches it."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, in_force[-1] if in_force else None))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(_launch, "device_guard", recording_guard)
    for module, name in ((triton_policy_loss, "_policy_loss_kernel"), (triton_policy_loss, "_slab_grad_kernel"),
                         (triton_advantages, "_advantages_kernel")):  # fmt: skip
        monkeypatch.setattr(module, name, Spy(getattr(module, name)))

    g = torch.Generator().manual_seed(0)
    n, h, v = 6, 8, 40
    targets, old, adv = torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    logits = torch.randn(n, v, generator=g).requires_grad_(True)
    policy_loss(logits, targets, old, adv, mask).loss.backward()
    token_logprobs(logits.detach(), targets)
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).to(torch.bfloat16).requires_grad_(True)  # bf16: the vocab (slab) pass
    linear_policy_loss(hidden, weight, targets, old, adv, mask, chunk_size=4).loss.backward()
    compute_advantages(torch.rand(n, generator=g), torch.arange(n) // 3, token_counts=torch.full((n,), 5))

    assert {name for name, _ in launches} == {"_policy_loss_kernel", "_slab_grad_kernel", "_advantages_kernel"}
    assert all(device == torch.device("cpu") for _, device in launches), launches


def test_recording_configures_launches_for_its_device_and_runs_none():
    from dler_kernels.triton_policy_loss import slab_grad_

    slab = torch.randn(3, 40)
    before = slab.clone()
    f = torch.zeros(3)
    with _launch.recording(torch.device("cuda")) as launches:
        slab_grad_(slab, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.int8), f, f, f, f, 0, 1.0)
    assert torch.equal(slab, before)  # not run
    assert len(launches) == 1 and launches[0].device == torch.device("cuda")
    # The GPU's configuration, not the interpreter's: a 40-column row is one 64-column tile on either, but
    # a 151936-column one is 4096-column tiles on a GPU and 16384 in the interpreter.
    wide = torch.empty(2, 151936, device="meta")
    with _launch.recording(torch.device("cuda")) as launches:
        slab_grad_(wide, *([torch.empty(2, device="meta")] * 6), 0, 1.0)
    assert launches[0].constexprs["BLOCK_V"] == 4096 and launches[0].num_warps == 8
