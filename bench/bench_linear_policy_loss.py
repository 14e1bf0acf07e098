"""Fused-linear policy loss, fwd+bwd from hidden states and the LM head: ours against the three plain
matmuls the computation needs, a chunked-torch baseline (verl's approach), the logits path
(F.linear, then our fused logits kernel), the eager reference, and Liger-Kernel's
LigerFusedLinearGRPOLoss (when installed).

    python bench/bench_linear_policy_loss.py            # CUDA: N=16384, bf16, (H, V) of issue 4
    python bench/bench_linear_policy_loss.py --n 1024 --hidden 256 --vocab 32000 --dtype fp32   # CPU

Per shape one table: median time (triton.testing.do_bench on CUDA, at least 5 timed calls:
cuda_timing; median of timed repeats on the CPU), the ratio to the three matmuls (X W^T, dZ W, dZ^T
X with torch.mm into preallocated outputs, timed in the same run), and the peak memory above inputs,
outputs and gradients, also as % of the N x V logits in the input dtype. CUDA:
torch.cuda.max_memory_allocated. CPU (Linux): in a fresh process, the peak resident set (VmHWM,
reset through /proc/self/clear_refs just before the call) minus the resident set before it, minus
the gradients (glibc returns large freed blocks to the OS, so the resident set follows live
tensors). Every number is measured in this run; an implementation that cannot run here is listed
with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from cpu_memory import peak_growth, peak_in_child
from cuda_timing import median_ms

from dler_kernels import linear_policy_loss, linear_token_logprobs, policy_loss
from dler_kernels.reference import per_token_loss_ref, policy_loss_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ISSUE_SHAPES = [(1536, 151936), (3584, 152064), (4096, 128256)]  # Qwen2.5-1.5B, Qwen2.5-7B, Llama-3-8B heads
LOSS = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0)


def make_inputs(n, hidden_size, vocab, dtype, device, seq_len, temperature):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=g, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, device=device) * (2.0 / hidden_size**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    # old log-probs near the current ones: ratios on both sides of the clip range, as in training
    logp = linear_token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=64)
    old = logp + 0.1 * torch.randn(n, generator=g, device=device)
    adv = torch.randn(n // seq_len, generator=g, device=device).repeat_interleave(seq_len)
    mask = torch.rand(n, generator=g, device=device) > 0.05
    return hidden, weight, targets, old, adv, mask


class _ChunkedTorch(torch.autograd.Function):
    """verl's torch backend for fused linear log-probs, written for this benchmark: the forward
    computes each chunk's logits and loss without keeping them; the backward recomputes each chunk
    under autograd (4 matmuls in all) and accumulates the weight gradient in float32."""

    @staticmethod
    def forward(ctx, x, w, targets, old, adv, mask, chunk, temperature):
        valid = mask.bool()
        total = valid.sum().clamp_min(1).float()
        loss = x.new_zeros((), dtype=torch.float32)
        for r0 in range(0, x.shape[0], chunk):
            sl = slice(r0, r0 + chunk)
            pt, *_ = per_token_loss_ref(x[sl] @ w.t(), targets[sl], old[sl], adv[sl], valid[sl],
                                        temperature=temperature, **LOSS)  # fmt: skip
            loss += pt.sum()
        ctx.save_for_backward(x, w, targets, old, adv, valid)
        ctx.chunk, ctx.temperature, ctx.total = chunk, temperature, total
        return loss / total

    @staticmethod
    def backward(ctx, grad):
        x, w, targets, old, adv, valid = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        scale = grad / ctx.total
        for r0 in range(0, x.shape[0], ctx.chunk):
            sl = slice(r0, r0 + ctx.chunk)
            with torch.enable_grad():
                xc, wc = x[sl].detach().requires_grad_(True), w.detach().requires_grad_(True)
                pt, *_ = per_token_loss_ref(xc @ wc.t(), targets[sl], old[sl], adv[sl], valid[sl],
                                            temperature=ctx.temperature, **LOSS)  # fmt: skip
                gx, gw = torch.autograd.grad(pt.sum() * scale, (xc, wc))
            dx[sl] = gx
            dw += gw
        return dx, dw.to(w.dtype), None, None, None, None, None, None


def implementations(args, inputs, chunk_sizes):
    hidden, weight, targets, old, adv, mask = inputs
    opts = dict(LOSS, temperature=args.temperature)
    impls = {}
    for chunk in chunk_sizes:
        label = "dler linear_policy_loss" + ("" if chunk is None else f" (chunk {chunk})")
        impls[label] = lambda x, w, c=chunk: linear_policy_loss(
            x, w, targets, old, adv, mask, chunk_size=c, **opts
        ).loss.backward()  # fmt: skip
    if args.dtype != "fp32":  # the fp32 LM head: float32 logits from upcast tiles (a no-op on float32 inputs)
        impls["dler linear_policy_loss, fp32_head"] = lambda x, w: linear_policy_loss(
            x, w, targets, old, adv, mask, fp32_head=True, **opts
        ).loss.backward()  # fmt: skip
    impls["chunked torch (verl-style, 512)"] = lambda x, w: _ChunkedTorch.apply(
        x, w, targets, old, adv, mask, 512, args.temperature
    ).backward()  # fmt: skip
    impls["F.linear + dler policy_loss"] = lambda x, w: policy_loss(
        F.linear(x, w), targets, old, adv, mask, **opts
    ).loss.backward()  # fmt: skip
    impls["F.linear + eager reference"] = lambda x, w: policy_loss_ref(
        F.linear(x, w), targets, old, adv, mask, **opts
    )[0].backward()  # fmt: skip
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        b, seq = args.n // args.seq_len, args.seq_len
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, chunk_size=1, epsilon_low=0.2,
                                         epsilon_high=0.28, loss_type="dapo", temperature=args.temperature)  # fmt: skip

        def run_liger(x, w):
            out = liger(x.view(b, seq, -1), w, targets.view(b, seq), mask.view(b, seq).int(), adv.view(b, seq)[:, 0],
                        old_per_token_logps=old.view(b, seq))  # fmt: skip
            (out[0] if isinstance(out, tuple) else out).backward()

        impls["liger LigerFusedLinearGRPOLoss"] = run_liger
    except ImportError:
        impls["liger LigerFusedLinearGRPOLoss"] = "not installed (pip install liger-kernel)"
    except Exception as e:  # another liger version's constructor: that row is not run, the others still are
        impls["liger LigerFusedLinearGRPOLoss"] = f"liger-kernel unusable: {type(e).__name__}: {e}"
    return impls


def time_cuda(fn):
    return median_ms(fn, warmup_ms=10, rep_ms=100)


def time_cpu(fn, repeats):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def three_matmuls(hidden, weight):
    """X W^T, dZ W, dZ^T X into preallocated outputs (dZ: any [N, V] tensor of the dtype)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    z = torch.empty(n, vocab, dtype=hidden.dtype, device=hidden.device)
    dz = torch.randn(n, vocab, device=hidden.device).to(hidden.dtype)
    dx, dw = torch.empty_like(hidden), torch.empty_like(weight)

    def fn():
        torch.mm(hidden, weight.t(), out=z)
        torch.mm(dz, weight, out=dx)
        torch.mm(dz.t(), hidden, out=dw)

    return fn, (z, dz)


def leaves(hidden, weight):
    return hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)


def step(fn, x, w):
    def run():
        x.grad = w.grad = None
        fn(x, w)

    return run


def peak_cuda(fn, x, w):
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x, w)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * x.element_size()


def rss_child(args, impl):
    """Runs in a fresh process: peak RSS growth of one call of ``impl``, minus its gradients."""
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.n, args.hidden, args.vocab, dtype, "cpu", args.seq_len, args.temperature)
    tiny = make_inputs(64, 16, 128, dtype, "cpu", 64, args.temperature)
    impls = implementations(args, inputs, parse_chunks(args.chunk_sizes))
    warm = implementations(argparse.Namespace(**{**vars(args), "n": 64, "seq_len": 64}), tiny,
                           parse_chunks(args.chunk_sizes))[impl]  # fmt: skip
    warm(*leaves(*tiny[:2]))  # lazy initialisation (thread pools, compilation) outside the measure
    x, w = leaves(*inputs[:2])
    peak = peak_growth(lambda: impls[impl](x, w))
    print(json.dumps(dict(peak_bytes=peak - (x.numel() + w.numel()) * x.element_size())))


def peak_cpu(args, impl):
    return peak_in_child(__file__, impl, args, skip=("rss_child", "json", "hidden_sizes"))


def parse_chunks(text):
    return [None if c == "auto" else int(c) for c in text.split(",")]


def bench_shape(args, hidden_size, vocab, device):
    args.hidden, args.vocab = hidden_size, vocab
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.n, hidden_size, vocab, dtype, device, args.seq_len, args.temperature)
    logits_bytes = args.n * vocab * inputs[0].element_size()
    rows, not_run, failed = [], {}, {}
    mm_fn, scratch = three_matmuls(*inputs[:2])
    mm_ms = time_cuda(mm_fn) if device == "cuda" else time_cpu(mm_fn, args.repeats)
    del scratch, mm_fn
    flops = 6 * args.n * vocab * hidden_size
    rows.append(dict(impl="3 matmuls (torch.mm)", ms=mm_ms, tflops=flops / mm_ms / 1e9, peak_bytes=None))
    for name, fn in implementations(args, inputs, parse_chunks(args.chunk_sizes)).items():
        if isinstance(fn, str):
            not_run[name] = fn
            print(f"  {name}: {fn}")
            continue
        try:
            x, w = leaves(*inputs[:2])
            run = step(fn, x, w)
            ms = time_cuda(run) if device == "cuda" else time_cpu(run, args.repeats)
            peak = peak_cuda(fn, x, w) if device == "cuda" else (peak_cpu(args, name) if args.memory else None)
        except Exception as e:  # one implementation failing must not hide the others' numbers
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"  {name}: failed ({failed[name]})")
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        finally:
            x = w = run = None
        rows.append(dict(impl=name, ms=ms, tflops=flops / ms / 1e9, peak_bytes=peak))
    print(f"\nN={args.n} H={hidden_size} V={vocab} {args.dtype}: N x V logits = {logits_bytes / 2**20:.0f} MiB")
    header = f"{'implementation':38s} {'median ms':>10s} {'vs 3 mm':>8s} {'TFLOP/s*':>9s}"
    header += f" {'peak extra':>12s} {'% logits':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = r["peak_bytes"]
        peak_s = f"{peak / 2**20:9.1f} MiB" if peak is not None else f"{'-':>12s}"
        pct = f"{100 * peak / logits_bytes:8.2f}%" if peak is not None else f"{'-':>9s}"
        print(f"{r['impl']:38s} {r['ms']:10.2f} {r['ms'] / mm_ms:7.2f}x {r['tflops']:9.1f} {peak_s} {pct}")
    print("* 6 N V H FLOP (the three matmuls) per fwd+bwd, whatever the implementation actually does")
    return dict(hidden=hidden_size, vocab=vocab, logits_bytes=logits_bytes, rows=rows, not_run=not_run, failed=failed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="tokens")
    p.add_argument("--hidden", type=int, default=None, help="one shape: hidden size (with --vocab)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (Liger's [B, T] layout)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-sizes", default="auto", help="comma list of our chunk_size values ('auto' = default)")
    p.add_argument("--repeats", type=int, default=3, help="CPU only: timed repeats")
    p.add_argument("--memory", type=int, default=1, help="CPU only: 1 = measure peak RSS in subprocesses")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n % args.seq_len:
        args.seq_len = args.n
    return args


def main():
    args = parse_args()
    if args.rss_child:
        return rss_child(args, args.rss_child)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.hidden is not None and args.vocab is not None:
        shapes = [(args.hidden, args.vocab)]
    elif device == "cuda":
        shapes = ISSUE_SHAPES
    else:
        raise SystemExit("on a CPU give one shape: --hidden H --vocab V (the GPU shapes need a GPU)")
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()}"
    else:
        where = f"CPU, {torch.get_num_threads()} threads (backend: {os.environ.get('DLER_BACKEND', 'auto')})"
    print(f"fused-linear policy loss fwd+bwd, torch {torch.__version__} [{where}]")
    results = [bench_shape(args, h, v, device) for h, v in shapes]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=where, shapes=results), f, indent=1)


if __name__ == "__main__":
    main()
