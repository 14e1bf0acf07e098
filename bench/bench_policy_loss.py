"""Policy loss fwd+bwd on the logits path: our Triton kernel and the kernels of the C++/CUDA
extension (dler_kernels._C) against the eager reference, torch.compile of the reference, and
Liger-Kernel's triton_grpo_loss (when installed).

    python bench/bench_policy_loss.py                       # CUDA: N=16384, V=151936, bf16
    python bench/bench_policy_loss.py --n 2048 --vocab 49152 --dtype fp32   # any shape; CPU works too

Prints one table: median time (triton.testing.do_bench on CUDA, at least 5 timed calls: cuda_timing;
median of timed repeats on the CPU), effective GB/s on the nominal bytes (logits read once +
gradient written once), that as % of the measured device copy bandwidth (CUDA), peak memory above
the inputs (the gradient included; on the CPU the peak resident-set growth of one call in a fresh
process), and the speed-up over eager. Every number is measured in this run; implementations that
cannot run here are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from cpu_memory import peak_growth, peak_in_child
from cuda_timing import median_ms

from dler_kernels import available_backends, policy_loss
from dler_kernels.dispatch import usable_backends
from dler_kernels.reference import policy_loss_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(n, vocab, dtype, device, seq_len):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, vocab, generator=g, device=device).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    old = -torch.rand(n, generator=g, device=device) * 10 - 8
    adv = torch.randn(n // seq_len, generator=g, device=device).repeat_interleave(seq_len)
    mask = torch.rand(n, generator=g, device=device) > 0.05
    return logits, targets, old, adv, mask


def implementations(args, inputs):
    logits, targets, old, adv, mask = inputs
    opts = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, temperature=args.temperature)
    impls = {}

    def ours(backend):
        return lambda x: policy_loss(x, targets, old, adv, mask, backend=backend, **opts).loss.backward()

    def ours_inplace(backend):
        return lambda x: policy_loss(x.detach(), targets, old, adv, mask, inplace_grad=True, backend=backend, **opts)

    def eager(x):
        policy_loss_ref(x, targets, old, adv, mask, **opts)[0].backward()

    if logits.is_cuda:
        impls["dler triton"] = ours("triton")
        impls["dler triton (inplace grad)"] = ours_inplace("triton")
    ext = "cuda" if logits.is_cuda else "cpu"
    if ext in usable_backends(ext):
        impls[f"dler C++ {ext}"] = ours(ext)
        impls[f"dler C++ {ext} (inplace grad)"] = ours_inplace(ext)
    else:
        impls[f"dler C++ {ext}"] = f"dler_kernels._C {ext} kernels unusable: {available_backends()[ext]}"
    impls["eager reference"] = eager
    compiled = torch.compile(lambda x: policy_loss_ref(x, targets, old, adv, mask, **opts)[0])
    impls["torch.compile reference"] = lambda x: compiled(x).backward()
    if logits.is_cuda:
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            b, seq = args.n // args.seq_len, args.seq_len

            def liger(x):
                # Liger takes [B, L+1, V] logits (it drops the last position) and per-sequence advantages.
                x3 = torch.cat([x.view(b, seq, -1), x.view(b, seq, -1)[:, :1]], dim=1)
                out = triton_grpo_loss(
                    x3, old.view(b, seq), None, targets.view(b, seq), adv.view(b, seq)[:, 0], mask.view(b, seq).int(),
                    temperature=args.temperature, beta=0.0, eps_low=0.2, eps_high=0.28, inplace=True,
                )  # fmt: skip
                per_token = out[0] if isinstance(out, tuple) else out  # versions differ: loss or (per-token, ...)
                loss = per_token if per_token.dim() == 0 else (per_token * mask.view(b, seq)).sum() / mask.sum()
                loss.backward()

            impls["liger triton_grpo_loss"] = liger
        except ImportError:
            impls["liger triton_grpo_loss"] = "liger-kernel missing (pip install liger-kernel)"
        except Exception as e:  # another liger version's API: that row is not run, the others still are
            impls["liger triton_grpo_loss"] = f"liger-kernel unusable: {type(e).__name__}: {e}"
    return impls


def time_cuda(fn, x):
    return median_ms(lambda: fn(x), warmup_ms=25, rep_ms=200, grad_to_none=[x])


def time_cpu(fn, x, repeats):
    fn(x)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        x.grad = None
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_cuda(fn, x):
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rss_child(args, impl):
    """Runs in a fresh process: the peak resident-set growth of one call of ``impl`` (after a warm-up on
    tiny inputs), printed as JSON."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = DTYPES[args.dtype]
    tiny_args = argparse.Namespace(**{**vars(args), "n": 64, "vocab": 128, "seq_len": 64})
    tiny = make_inputs(64, 128, dtype, "cpu", 64)
    implementations(tiny_args, tiny)[impl](tiny[0].clone().requires_grad_(True))
    inputs = make_inputs(args.n, args.vocab, dtype, "cpu", args.seq_len)
    fn = implementations(args, inputs)[impl]
    x = inputs[0].requires_grad_(True)
    print(json.dumps(dict(peak_bytes=peak_growth(lambda: fn(x)))))


def peak_memory_cpu(args, impl):
    return peak_in_child(__file__, impl, args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="tokens")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (for Liger's [B, L] layout)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="CPU only: timed repeats")
    p.add_argument("--threads", type=int, default=None, help="CPU only: torch threads (default: torch's)")
    p.add_argument("--memory", type=int, default=1, help="CPU only: 1 = measure peak RSS in subprocesses")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n % args.seq_len:
        args.seq_len = args.n
    return args


def measure(args, copy_gbps=None, exclude=None) -> dict:
    """Times every implementation on one shape. ``copy_gbps``: the device copy bandwidth to compare with
    (measured here on CUDA when not given); ``exclude``: {implementation: why it is not run}. Returns the
    rows, the implementations not run with the reason, and those that failed with their error."""
    exclude = exclude or {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.n, args.vocab, dtype, device, args.seq_len)
    logits = inputs[0]
    nominal_bytes = 2 * logits.numel() * logits.element_size()  # logits read once + gradient written once
    if device == "cuda":
        if copy_gbps is None:
            dst = torch.empty_like(logits)
            copy_ms = time_cuda(lambda _: dst.copy_(logits), logits.detach().requires_grad_(True))
            copy_gbps = nominal_bytes / copy_ms / 1e6
            del dst
        where = f"{torch.cuda.get_device_name()}, copy bandwidth {copy_gbps:.0f} GB/s"
    else:
        where = f"CPU, {torch.get_num_threads()} threads (Triton kernels need CUDA: not timed here)"
    print(f"policy loss fwd+bwd  N={args.n} V={args.vocab} {args.dtype}  torch {torch.__version__}  [{where}]")
    rows, not_run, failed = [], {}, {}
    for name, fn in implementations(args, inputs).items():
        if isinstance(fn, str) or name in exclude:
            not_run[name] = fn if isinstance(fn, str) else exclude[name]
            print(f"  {name}: not run ({not_run[name]})")
            continue
        x = logits.clone().requires_grad_(True)
        try:
            ms = time_cuda(fn, x) if device == "cuda" else time_cpu(fn, x, args.repeats)
            if device == "cuda":
                peak = peak_memory_cuda(fn, x)
            else:
                peak = peak_memory_cpu(args, name) if args.memory else None
        except Exception as e:  # one implementation failing must not hide the others' numbers
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {name}: failed ({failed[name]})")
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(dict(impl=name, ms=ms, gbps=nominal_bytes / ms / 1e6, peak_bytes=peak))
        del x
    return dict(args=vars(args), device=where, copy_gbps=copy_gbps, logits_bytes=nominal_bytes // 2, rows=rows,
                not_run=not_run, failed=failed)  # fmt: skip


def print_table(result: dict) -> None:
    rows, copy_gbps, logits_bytes = result["rows"], result["copy_gbps"], result["logits_bytes"]
    eager_ms = next((r["ms"] for r in rows if r["impl"] == "eager reference"), None)
    columns = ("median ms", 10), ("GB/s", 8), ("% copy BW", 10), ("peak / logits", 14), ("vs eager", 9)
    header = f"{'implementation':30s} " + " ".join(f"{name:>{width}s}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{100 * r['gbps'] / copy_gbps:9.1f}%" if copy_gbps else f"{'-':>10s}"
        peak = f"{r['peak_bytes'] / logits_bytes:13.2f}x" if r["peak_bytes"] is not None else f"{'-':>14s}"
        speedup = f"{eager_ms / r['ms']:8.2f}x" if eager_ms else f"{'-':>9s}"
        print(f"{r['impl']:30s} {r['ms']:10.3f} {r['gbps']:8.1f} {pct} {peak} {speedup}")


def main():
    args = parse_args()
    if args.rss_child:
        return rss_child(args, args.rss_child)
    result = measure(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
