"""Stages 4 to 6, the benchmarks: the logits-path policy loss (kernel_bench), the fused-linear policy loss
(linear_bench) and the FSDP2 policy update (train_step), on the target shapes, judged against their targets.

The measuring code is the benchmark scripts' own (bench_policy_loss, bench_linear_policy_loss, bench_train_step,
imported by their bare names: the parent puts ROOT/bench on every stage's PYTHONPATH): this module only chooses
shapes and reads their results.
"""

from __future__ import annotations

from .context import StageContext, judge_only_on_a_gpu

# -------------------------------------------------------------------------------------- 4. kernel benchmark

KERNEL_TARGETS = dict(copy_bw=0.80, vs_liger=1.5, vs_eager=8.0, peak_vs_eager=0.25)
# The slowest to measure (it compiles for every shape) and the least important: measured last, so that a stage
# killed at its budget has lost only it.
COMPILED_REFERENCE = "torch.compile reference"


def kernel_implementations(bench_policy_loss, args, device: str) -> list[str]:
    """The benchmark's implementations, in the order they are measured: torch.compile last. Read from
    ``implementations`` on tiny inputs (nothing is run or compiled)."""
    import argparse

    tiny_args = argparse.Namespace(**{**vars(args), "n": 64, "vocab": 128, "seq_len": 64})
    tiny = bench_policy_loss.make_inputs(64, 128, bench_policy_loss.DTYPES[args.dtype], device, 64)
    names = list(bench_policy_loss.implementations(tiny_args, tiny))
    return [n for n in names if n != COMPILED_REFERENCE] + [n for n in names if n == COMPILED_REFERENCE]


def kernel_bench(ctx: StageContext) -> None:
    """bench_policy_loss on the target shapes (bf16, V=151936, N in {4096, 16384}); --smoke: one tiny shape.
    Each implementation is measured in its own ``measure`` call and saved to the stage's JSON at once (a stage
    killed at its budget keeps every figure it measured). torch.compile comes last, compiled afresh for each
    N with static shapes (``torch.compiler.reset`` and no automatic dynamic shapes: a recompile for the second
    N would otherwise trace a dynamic-shape graph, a different program from the one a training loop with a
    fixed shape runs); its compilation happens in the untimed first call."""
    import bench_policy_loss
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    copy_gbps = ctx.earlier("environment").get("copy", {}).get("gbps") if cuda else None
    if ctx.smoke:
        shapes = [["--n", "256", "--vocab", "2048", "--seq-len", "64", "--dtype", "bf16" if cuda else "fp32"]]
    else:
        shapes = [["--n", str(n), "--vocab", "151936", "--dtype", "bf16"] for n in (4096, 16384)]
    exclude = {}
    if ctx.smoke and not cuda:
        exclude[COMPILED_REFERENCE] = "smoke mode on the CPU: compiling takes longer than the whole smoke run"
    results = ctx.record["figures"].setdefault("shapes", [])
    ctx.record["tables"], ctx.record["targets"] = [], []
    for argv in shapes:
        args = bench_policy_loss.parse_args([*argv, "--repeats", "2", "--memory", "0"])
        names = kernel_implementations(bench_policy_loss, args, device)
        result = None
        for name in names:
            alone = {other: "measured in its own call" for other in names if other != name}
            if name == COMPILED_REFERENCE:
                torch.compiler.reset()
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                one = bench_policy_loss.measure(args, copy_gbps=copy_gbps, exclude={**alone, **exclude})
            copy_gbps = one["copy_gbps"]  # measured by the first call when stage 1 had none
            if result is None:
                result = {**one, "rows": [], "not_run": {}, "failed": {}}
                results.append(result)
            result["rows"] += one["rows"]
            result["not_run"].update({k: v for k, v in one["not_run"].items() if k == name})
            result["failed"].update(one["failed"])
            save_kernel_shape(ctx, results, cuda)
        if not cuda:
            result["not_run"]["dler triton"] = "needs CUDA (the interpreter is a correctness tool, not a speed)"
            result["not_run"]["liger triton_grpo_loss"] = "needs CUDA"
            save_kernel_shape(ctx, results, cuda)
        if cuda:
            torch.cuda.empty_cache()
    ctx.record.update(status="passed" if all(r["rows"] for r in results) else "failed",
                      reason="" if all(r["rows"] for r in results) else "no implementation ran")  # fmt: skip
    failed = {k: v for r in results for k, v in r["failed"].items()}
    if failed:
        ctx.record.update(status="failed", reason="failed: " + ", ".join(sorted(failed)))
    ctx.save()


def save_kernel_shape(ctx: StageContext, results: list[dict], cuda: bool) -> None:
    """The tables and targets from every figure measured so far, written to the stage's JSON."""
    for result in results:
        result["targets"] = judge_only_on_a_gpu(ctx, kernel_targets(result), cuda)
    ctx.record["tables"] = [kernel_table(r) for r in results]
    ctx.record["targets"] = [t for r in results for t in r["targets"]]
    ctx.save()


def kernel_targets(result: dict) -> list[dict]:
    rows = {r["impl"]: r for r in result["rows"]}
    n = result["args"]["n"]
    ours = rows.get("dler triton")
    eager, liger = rows.get("eager reference"), rows.get("liger triton_grpo_loss")
    out = []

    def target(what, value, goal, met):
        out.append(dict(target=f"N={n}: {what}", value=value, goal=goal, met=met))

    if ours is None:
        why = result["not_run"].get("dler triton") or result["failed"].get("dler triton") or "not run"
        target("dler triton", None, "-", None)
        out[-1]["reason"] = why
        return out
    copy = result["copy_gbps"]
    target("% of copy bandwidth", 100 * ours["gbps"] / copy if copy else None, ">= 80%",
           ours["gbps"] >= KERNEL_TARGETS["copy_bw"] * copy if copy else None)  # fmt: skip
    target("speed-up over Liger", liger["ms"] / ours["ms"] if liger else None, ">= 1.5x",
           liger["ms"] / ours["ms"] >= KERNEL_TARGETS["vs_liger"] if liger else None)  # fmt: skip
    if not liger:
        why = result["not_run"].get("liger triton_grpo_loss") or result["failed"].get("liger triton_grpo_loss")
        out[-1]["reason"] = f"not run: {why}" if why else "not measured before the stage ended"
    target("speed-up over eager", eager["ms"] / ours["ms"] if eager else None, ">= 8x",
           eager["ms"] / ours["ms"] >= KERNEL_TARGETS["vs_eager"] if eager else None)  # fmt: skip
    peaks = eager and eager["peak_bytes"] and ours["peak_bytes"] is not None
    target("peak memory / eager's", ours["peak_bytes"] / eager["peak_bytes"] if peaks else None, "<= 0.25",
           ours["peak_bytes"] <= KERNEL_TARGETS["peak_vs_eager"] * eager["peak_bytes"] if peaks else None)  # fmt: skip
    return out


def kernel_table(result: dict) -> dict:
    a, copy, logits = result["args"], result["copy_gbps"], result["logits_bytes"]
    eager = next((r["ms"] for r in result["rows"] if r["impl"] == "eager reference"), None)
    rows = []
    for r in result["rows"]:
        rows.append([r["impl"], f"{r['ms']:.3f}", f"{r['gbps']:.1f}", f"{100 * r['gbps'] / copy:.1f}%" if copy else "-",
                     f"{r['peak_bytes'] / logits:.2f}x" if r["peak_bytes"] is not None else "-",
                     f"{eager / r['ms']:.2f}x" if eager else "-"])  # fmt: skip
    for name, why in {**result["not_run"], **result["failed"]}.items():
        status = "failed" if name in result["failed"] else "not run"
        rows.append([name, f"{status}: {why}", "", "", "", ""])
    return dict(title=f"Policy loss fwd+bwd, N={a['n']} V={a['vocab']} {a['dtype']} ({result['device']})",
                columns=["implementation", "median ms", "GB/s", "% copy BW", "peak / logits", "vs eager"],
                rows=rows)  # fmt: skip


# ------------------------------------------------------------------------------------ 5. fused-linear bench


def linear_bench(ctx: StageContext) -> None:
    """bench_linear_policy_loss on the target (H, V) shapes at N=16384, bf16; --smoke: one tiny shape."""
    import bench_linear_policy_loss
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if ctx.smoke:
        argv = ["--n", "256", "--seq-len", "64", "--dtype", "bf16" if cuda else "fp32"]
        shapes = [(32, 1024)]
    else:
        argv, shapes = ["--n", "16384"], bench_linear_policy_loss.ISSUE_SHAPES
    args = bench_linear_policy_loss.parse_args([*argv, "--repeats", "2", "--memory", "0"])
    results = ctx.record["figures"].setdefault("shapes", [])
    ctx.record["tables"] = []
    for hidden, vocab in shapes:
        result = bench_linear_policy_loss.bench_shape(args, hidden, vocab, device)
        result["targets"] = judge_only_on_a_gpu(ctx, linear_targets(result, args.n), cuda)
        results.append(result)
        ctx.record["tables"].append(linear_table(result, args))
        ctx.record.setdefault("targets", []).extend(result["targets"])
        ctx.save()
        if cuda:
            torch.cuda.empty_cache()
    failed = sorted({k for r in results for k in r["failed"]})
    reason = ("failed: " + ", ".join(failed)) if failed else ""
    ctx.record.update(status="failed" if failed else "passed", reason=reason)
    ctx.save()


def linear_targets(result: dict, n: int) -> list[dict]:
    rows = {r["impl"]: r for r in result["rows"]}
    shape = f"N={n} H={result['hidden']} V={result['vocab']}"
    ours, mm = rows.get("dler linear_policy_loss"), rows.get("3 matmuls (torch.mm)")
    liger, chunked = rows.get("liger LigerFusedLinearGRPOLoss"), rows.get("chunked torch (verl-style, 512)")
    if ours is None:
        return [dict(target=f"{shape}: dler linear_policy_loss", value=None, goal="-", met=None, reason="did not run")]
    peak = ours["peak_bytes"]
    out = [
        dict(target=f"{shape}: time / 3 matmuls", value=ours["ms"] / mm["ms"], goal="<= 1.3x",
             met=ours["ms"] <= 1.3 * mm["ms"]),
        dict(target=f"{shape}: peak extra / logits",
             value=None if peak is None else 100 * peak / result["logits_bytes"],
             goal="< 5%", met=None if peak is None else peak < 0.05 * result["logits_bytes"],
             reason="" if peak is not None else "not measured in smoke mode"),
        dict(target=f"{shape}: faster than chunked torch", value=chunked["ms"] / ours["ms"] if chunked else None,
             goal="> 1x", met=chunked["ms"] > ours["ms"] if chunked else None),
        dict(target=f"{shape}: faster than Liger", value=liger["ms"] / ours["ms"] if liger else None, goal="> 1x",
             met=liger["ms"] > ours["ms"] if liger else None,
             reason="" if liger else "not run: " + result["not_run"].get("liger LigerFusedLinearGRPOLoss", "missing")),
    ]  # fmt: skip
    return out


def linear_table(result: dict, args) -> dict:
    mm = next(r["ms"] for r in result["rows"] if r["impl"].startswith("3 matmuls"))
    rows = []
    for r in result["rows"]:
        peak = r["peak_bytes"]
        rows.append([r["impl"], f"{r['ms']:.2f}", f"{r['ms'] / mm:.2f}x", f"{r['tflops']:.1f}",
                     "-" if peak is None else f"{peak / 2**20:.1f} MiB",
                     "-" if peak is None else f"{100 * peak / result['logits_bytes']:.2f}%"])  # fmt: skip
    for name, why in {**result["not_run"], **result["failed"]}.items():
        status = "failed" if name in result["failed"] else "not run"
        rows.append([name, f"{status}: {why}", "", "", "", ""])
    return dict(title=f"Fused-linear policy loss fwd+bwd, N={args.n} H={result['hidden']} V={result['vocab']} "
                      f"{args.dtype}",
                columns=["implementation", "median ms", "vs 3 mm", "TFLOP/s (6NVH)", "peak extra", "% logits"],
                rows=rows)  # fmt: skip


# --------------------------------------------------------------------------------------- 6. train step


def train_step(ctx: StageContext) -> None:
    """bench_train_step under FSDP2 on one process: Qwen2-1.5B config (random weights), bf16 compute, fp32
    master weights; MFU against the datasheet peak (the script's) and the matmul rate of stage 1."""
    import bench_train_step
    import torch

    cuda = torch.cuda.is_available()
    argv = ["--fsdp"]
    if not ctx.smoke:  # the script's CUDA defaults (Qwen2-1.5B, 16 x 4096 tokens) with fewer steps: the budget
        argv += ["--steps", "3", "--warmup", "1"]
    else:
        argv += ["--model-config", "tiny", "--seq-len", "64", "--prompt-len", "16", "--sequences", "2",
                 "--micro-batch-tokens", "128", "--steps", "2", "--warmup", "1",
                 "--old-logprobs", "random"]  # fmt: skip
    args = bench_train_step.parse_args(argv)
    try:
        result = bench_train_step.run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    bench_train_step.print_result(result)
    matmul = ctx.earlier("environment").get("matmul", {}).get("tflops")
    for row in result["rows"]:
        row["mfu_vs_measured_matmul"] = row["tflops"] / matmul if row["tflops"] is not None and matmul else None
    ctx.record["figures"] = {k: v for k, v in result.items() if k not in ("last_metrics",)}
    ctx.record["figures"]["measured_matmul_tflops"] = matmul
    step = next(r for r in result["rows"] if r["phase"] == "fwd+bwd")
    target = dict(target=f"{args.model_config} fwd+bwd MFU (vs {result['peak_source']})",
                  value=None if step["mfu"] is None else 100 * step["mfu"], goal=">= 40%",
                  met=None if step["mfu"] is None else step["mfu"] >= 0.40,
                  reason="" if step["mfu"] is not None else result["peak_source"])  # fmt: skip
    ctx.record["targets"] = judge_only_on_a_gpu(ctx, [target], cuda)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    ctx.record["tables"] = [dict(
        title=f"Policy update, {args.model_config} ({result['params'] / 1e6:.1f}M params), {result['mode']}, "
              f"{result['tokens_per_step']} tokens/step [{result['device']}]",
        columns=["phase", "median s", "tokens/s", "TFLOP/s", "MFU (peak)", "MFU (measured matmul)"],
        rows=[[r["phase"], f"{r['median_s']:.4f}", fmt(r["tokens_per_s"], ".1f"), fmt(r["tflops"], ".3f"),
               fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"),
               fmt(None if r["mfu_vs_measured_matmul"] is None else 100 * r["mfu_vs_measured_matmul"], ".1f")]
              for r in result["rows"]],
    )]  # fmt: skip
    ctx.record["notes"] = [flops_note(result)]
    ctx.record.update(status="passed", reason="")
    ctx.save()


def flops_note(result: dict) -> str:
    """How bench_train_step counts the model FLOPs and which steps it times (its docstring has the detail)."""
    a = result["args"]
    return (f"Model FLOPs per step ({result['flops_per_step'] / 1e12:.3f} TFLOP): 6 * P * T with P the "
            f"{result['non_embedding_params'] / 1e6:.1f}M non-embedding parameters and T the "
            f"{result['tokens_per_step']} tokens, + 6 * V * H * T_resp for the LM head at the "
            f"{result['response_tokens_per_step']} response positions, + the sum over sequences of "
            "6 * layers * d_attn * S^2 for causal attention; recomputation is not counted. Times are medians over "
            f"{a['steps']} timed steps after {a['warmup']} untimed warm-up step(s) (compilation, autotuning and "
            "allocator growth excluded), each between device synchronisations. MFU = FLOPs / median seconds / "
            "peak.")  # fmt: skip
