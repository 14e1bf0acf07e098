"""pytest-benchmark on the CPU: the eager reference against torch.compile of it.

    make bench          # or: .venv/bin/python -m pytest bench/ --benchmark-only

(The Triton kernels are timed only on CUDA, by bench_policy_loss.py: the interpreter that runs
them on a CPU is a correctness tool, not a speed.)
"""

import pytest
import torch

from dler_kernels.reference import policy_loss_ref

N, V = 512, 49152


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    old = -torch.rand(N, generator=g) * 10 - 8
    return logits, targets, old, torch.randn(N, generator=g), torch.rand(N, generator=g) > 0.05


def _fwd_bwd(fn, inputs):
    logits, targets, old, adv, mask = inputs
    x = logits.clone().requires_grad_(True)

    def step():
        x.grad = None
        fn(x, targets, old, adv, mask)[0].backward()

    return step


@pytest.mark.benchmark(group="policy-loss-cpu")
def test_eager_reference(benchmark, inputs):
    benchmark(_fwd_bwd(policy_loss_ref, inputs))


@pytest.mark.benchmark(group="policy-loss-cpu")
def test_compiled_reference(benchmark, inputs):
    step = _fwd_bwd(torch.compile(policy_loss_ref), inputs)
    step()  # compile outside the timing
    benchmark(step)
