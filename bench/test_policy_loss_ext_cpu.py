"""pytest-benchmark on the CPU: the C++ kernels of dler_kernels._C against the eager reference, policy
loss fwd+bwd at the target shape, N=2048, V=49152, fp32, 2 threads (logits: 384 MiB).

    make bench          # or: .venv/bin/python -m pytest bench/ --benchmark-only

Peak memory is measured in fresh processes (bench_policy_loss.py's ``peak_memory_cpu``: the growth of
the peak resident set over one call, the gradient included) and recorded in extra_info. The last test
asserts the targets on numbers measured side by side in this run: ours >= 3x faster than
eager (medians), ours <= 1.5x the logits in peak memory. (The in-place variant, which needs no
gradient buffer, is in bench_policy_loss.py's table.)
"""

import argparse

import pytest
import torch
from bench_policy_loss import implementations, make_inputs, peak_memory_cpu

from dler_kernels import available_backends
from dler_kernels.dispatch import usable_backends

N, V, THREADS = 2048, 49152, 2
ARGS = argparse.Namespace(n=N, vocab=V, dtype="fp32", seq_len=512, temperature=1.0, repeats=1, threads=THREADS,
                          json=None, rss_child=None)  # fmt: skip
OURS, EAGER = "dler C++ cpu", "eager reference"
LOGITS_BYTES = N * V * 4
measured: dict[str, dict] = {}

pytestmark = pytest.mark.skipif(
    "cpu" not in usable_backends("cpu"), reason=f"cpu backend: {available_backends()['cpu']}"
)


@pytest.fixture(scope="module")
def impls():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    inputs = make_inputs(N, V, torch.float32, "cpu", ARGS.seq_len)
    yield inputs, implementations(ARGS, inputs)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [OURS, EAGER])  # eager last: it checks the targets
@pytest.mark.benchmark(group="policy-loss-ext-cpu")
def test_fwd_bwd(benchmark, impls, name):
    inputs, fns = impls
    x = inputs[0].clone().requires_grad_(True)

    def step():
        x.grad = None
        fns[name](x)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    peak = peak_memory_cpu(ARGS, name)
    benchmark.extra_info.update(peak_bytes=peak, peak_x_logits=peak / LOGITS_BYTES)
    measured[name] = dict(median=benchmark.stats.stats.median, peak=peak)
    if name == EAGER and OURS in measured:
        speedup = measured[EAGER]["median"] / measured[OURS]["median"]
        peak_ratio = measured[OURS]["peak"] / LOGITS_BYTES
        benchmark.extra_info.update(ours_speedup=speedup, ours_peak_x_logits=peak_ratio)
        print(f"\nC++ fused fwd+bwd vs eager: {speedup:.2f}x faster; peak memory {peak_ratio:.2f}x the logits")
        assert speedup >= 3.0, f"{speedup:.2f}x"
        assert peak_ratio <= 1.5, f"{peak_ratio:.2f}x"
