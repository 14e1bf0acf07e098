"""Rollout throughput: VLLMEngine vs HFEngine on the same prompts, and the weight-sync time.

Each engine runs in its own process (vLLM pins its threads; sharing a process would slow the
other engine), warms up on one short request, then samples ``--n`` responses for each of
``--prompts`` toy-arith prompts (R1 template, chat format) at temperature 1. Throughput is
generated tokens / wall seconds of the one ``generate`` call. The weight sync pushes every
tensor of the model (from a transformers copy, as the trainer would) into the running vLLM
engine, ``--sync-repeats`` times; the median is reported.

    python bench/bench_rollout.py                     # SmolLM2, 64 prompts x 8 samples x 256 tokens
    python bench/bench_rollout.py --prompts 8 --n 4 --max-tokens 64 --engines vllm
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from trainer.data import build_prompts, load_examples
    from trainer.models.resolve import resolve_model
    from trainer.rollout.hf_engine import HFEngine
    from trainer.rollout.vllm_engine import VLLMEngine

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(f"builtin:toy-arith?difficulty=2&size={args.prompts}")
    prompts = [p.token_ids for p in build_prompts(tokenizer, examples, template="r1")]
    start = time.perf_counter()
    if args.child == "vllm":
        engine = VLLMEngine(model_dir, dtype=args.dtype, max_model_len=1024, gpu_memory_utilization=args.mem)
    else:
        engine = HFEngine(model_dir, dtype=args.dtype, batch_size=args.hf_batch)
    startup = time.perf_counter() - start
    engine.generate(prompts[:1], n=1, max_tokens=8, temperature=1.0, seed=0)  # warm-up

    start = time.perf_counter()
    groups = engine.generate(prompts, n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=1)
    seconds = time.perf_counter() - start
    samples = [s for g in groups for s in g]
    result = {
        "engine": args.child,
        "device": engine.device_name,
        "startup_s": startup,
        "samples": len(samples),
        "tokens": sum(len(s.token_ids) for s in samples),
        "truncated": sum(s.finish_reason == "length" for s in samples),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    result["tokens_per_s"] = result["tokens"] / seconds
    if args.child == "vllm" and args.sync_repeats:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        times, stats = [], None
        for _ in range(args.sync_repeats):
            stats = engine.update_weights((n, p.detach()) for n, p in policy.named_parameters())
            times.append(stats.seconds)
        result["sync"] = {"tensors": stats.tensors, "bytes": stats.bytes, "median_s": statistics.median(times)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model folder or alias")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mem", type=float, default=0.2, help="vLLM gpu_memory_utilization (CPU: of host memory)")
    parser.add_argument("--hf-batch", type=int, default=64, help="HFEngine sequences per generate call")
    parser.add_argument("--engines", default="vllm,hf")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    results = {}
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, *sys.argv[1:]]
        print(f"== {engine}: {args.prompts} prompts x {args.n} samples x <= {args.max_tokens} tokens", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])

    header = ("engine", "device", "samples", "tokens", "trunc", "seconds", "tokens/s")
    print("\n{:8s} {:8s} {:>8s} {:>8s} {:>6s} {:>9s} {:>9s}".format(*header))
    for r in results.values():
        print(
            f"{r['engine']:8s} {r['device']:8s} {r['samples']:8d} {r['tokens']:8d} {r['truncated']:6d} "
            f"{r['seconds']:9.1f} {r['tokens_per_s']:9.1f}"
        )
    if "vllm" in results and "hf" in results:
        ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"\nvLLM / HF throughput: {ratio:.2f}x")
    if "sync" in results.get("vllm", {}):
        s = results["vllm"]["sync"]
        print(f"weight sync: {s['tensors']} tensors, {s['bytes'] / 2**20:.0f} MiB, median {s['median_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
