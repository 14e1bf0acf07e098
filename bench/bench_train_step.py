"""Policy-update throughput: forward+backward through ``trainer.update.policy.accumulate_gradients`` (packed
micro-batches, the ``dler_kernels.policy_loss`` loss) and the optimizer step, on synthetic rows.

    python bench/bench_train_step.py                                  # CUDA: Qwen2-1.5B config, bf16, 4096-token seqs
    python bench/bench_train_step.py --fsdp                           # the same under FSDP2 (1-process group)
    python bench/bench_train_step.py --model-config tiny              # CPU: tiny Llama, fp32, 256-token seqs
    python bench/bench_train_step.py --model-config path/to/config.json --seq-len 2048

The model is built from its config with random weights (nothing is downloaded). Master weights are
fp32; on CUDA the compute is bf16: ``torch.autocast`` by default, or with ``--fsdp`` FSDP2
``fully_shard`` (every decoder layer, then the root) with ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` on a 1-process group. On the CPU everything is fp32. ``--fsdp`` is the closer
match to the trainer, whose bf16 compute comes from FSDP2 (``trainer.dist.fsdp``); the autocast context
here also covers the backward, since ``accumulate_gradients`` runs forward and backward in one call.

One step is one mini-batch of ``--sequences`` rows, each ``--seq-len`` tokens (``--prompt-len``
prompt tokens then response tokens, uniform random ids), with random advantages N(0, 1). The old
log-probs are the model's own (``trainer.update.policy.compute_logprobs``, once, untimed) plus N(0, 0.1^2)
noise, so that the ratio is not identically 1 and some tokens clip; ``--old-logprobs random`` uses
-log(V) + N(0, 0.1^2) instead (a randomly initialised model is close to uniform) and skips that
forward. Loss settings are DLER's: eps_low 0.2, eps_high 0.28, clip_c 10, token-mean, no KL.

Timed per step, with the device synchronised at each boundary:
  fwd+bwd    ``accumulate_gradients(model, rows, loss, token_budget=--micro-batch-tokens)``
  optimizer  ``trainer.update.optim.clip_gradients`` (max norm 1.0), then ``step()`` and ``zero_grad()`` of
             ``trainer.update.optim.build_optimizer`` (fused AdamW) with the trainer's default OptimConfig
The table gives medians over ``--steps`` steps after ``--warmup`` untimed ones.

Model FLOPs of one step (the work the update must do; recomputation under gradient checkpointing
is not counted, so the MFU is comparable with and without it):

    FLOPs = 6 * P * T  +  6 * V * H * T_resp  +  sum over sequences i of 6 * L * d_attn * S_i^2

  P       non-embedding parameters: every parameter except the input embedding and the LM head
          (norms and biases included); with tied embeddings the shared matrix is excluded once.
  V * H   the LM head matmul, counted once (tied or not). It is counted only for the T_resp
          positions that predict a response token: the trainer computes logits only there
          (``logits_to_keep``), so counting it for every token would inflate the MFU.
  T       all tokens of the step (prompt + response); T_resp the response tokens.
  L, d_attn  decoder layers and num_attention_heads * head_dim (= hidden size for Qwen2-1.5B and tiny).
  S_i     the length of sequence i. Causal attention scores (QK^T and AV, forward and backward,
          half of the S x S square) cost 12 * L * d_attn * S_i / 2 FLOPs per token; packed
          sequences attend only within themselves, so this is per sequence, not per micro-batch.

MFU = FLOPs / seconds / peak. On CUDA the peak is the dense bf16 tensor-core rate of the device
(H100 SXM and H200: 989 TFLOP/s, from ``torch.cuda.get_device_name()``; ``--peak-tflops``
overrides). On the CPU the peak is MEASURED in the same run: the best rate of a large fp32 matmul
(``--cpu-peak-n``) with the same threads; the CPU MFU is relative to that measured matmul rate,
not to a datasheet number.

Peak memory: CUDA ``torch.cuda.max_memory_allocated()`` over the whole run (weights, gradients,
AdamW state, activations, logits); CPU the growth of the process's max RSS (``resource``) from
just before the model is built to the end of the timed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import tempfile
import time

import torch

from trainer.config import OptimConfig
from trainer.update.optim import build_optimizer, clip_gradients
from trainer.update.packing import UpdateRow
from trainer.update.policy import accumulate_gradients, compute_logprobs

CONFIGS = {
    # Qwen2-1.5B's architecture (its config.json); random weights.
    "qwen2-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # A tiny Llama with SmolLM2's vocabulary, for the CPU.
    "tiny": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=1e5,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        hidden_act="silu",
    ),
}

# DLER's loss settings (the keyword arguments of dler_kernels.policy_loss that a run fixes).
LOSS = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, beta=0.0, temperature=1.0, loss_agg="token-mean")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by substring of the device name; first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

OLD_LOGPROB_NOISE = 0.1


def model_config(name: str):
    from transformers import AutoConfig

    if name in CONFIGS:
        spec = dict(CONFIGS[name])
    else:
        with open(name) as f:
            spec = json.load(f)
        for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "quantization_config"):
            spec.pop(key, None)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_model(config, device: str, attn: str, gradient_checkpointing: bool):
    """fp32 master weights, random init directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def param_counts(model) -> tuple[int, int]:
    """(non-embedding parameters, all parameters), each tensor once (tied weights are one tensor)."""
    embeddings = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embeddings.add(id(head.weight))
    params = {id(p): p for p in model.parameters()}  # parameters() already yields a tied tensor once
    total = sum(p.numel() for p in params.values())
    return total - sum(params[i].numel() for i in embeddings if i in params), total


def apply_fsdp(model, device: str, param_dtype: torch.dtype):
    """FSDP2 on a 1-process group: every decoder layer, then the root (which holds the embeddings)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        init_file = tempfile.NamedTemporaryFile(prefix="bench-pg-", delete=False).name
        os.unlink(init_file)  # the file store creates it
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=0, world_size=1
        )
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def make_rows(n: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0) -> list[UpdateRow]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    adv = torch.randn(n, generator=g)
    return [UpdateRow(ids[i, :prompt_len].tolist(), ids[i, prompt_len:].tolist(), float(adv[i])) for i in range(n)]


def fill_old_logprobs(model, rows, mode: str, vocab: int, token_budget: int, ctx) -> None:
    g = torch.Generator().manual_seed(1)
    if mode == "model":
        with ctx():
            logps = compute_logprobs(model, rows, token_budget=token_budget, temperature=LOSS["temperature"])
    for i, row in enumerate(rows):
        n = len(row.response_ids)
        base = logps[i].float() if mode == "model" else torch.full((n,), -math.log(vocab))
        row.old_logprobs = base + OLD_LOGPROB_NOISE * torch.randn(n, generator=g)


def step_flops(config, rows, non_embedding: int) -> float:
    heads = config.num_attention_heads
    d_attn = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    tokens = sum(r.tokens for r in rows)
    response = sum(len(r.response_ids) for r in rows)
    attention = sum(6 * config.num_hidden_layers * d_attn * r.tokens**2 for r in rows)
    return 6.0 * non_embedding * tokens + 6.0 * config.vocab_size * config.hidden_size * response + attention


def cuda_peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def cpu_matmul_tflops(n: int, repeats: int = 5) -> float:
    """Best fp32 matmul rate of an n x n x n product with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float32
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = model_config(args.model_config)
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    rss_before = max_rss_bytes()

    model = build_model(config, device, args.attn, args.gradient_checkpointing)
    non_embedding, total_params = param_counts(model)
    if args.fsdp:
        apply_fsdp(model, device, dtype)
        mode = f"FSDP2 1-process, param {dtype_name(dtype)} / reduce fp32"
        ctx = contextlib.nullcontext
    elif dtype != torch.float32:
        mode = f"autocast {dtype_name(dtype)}, fp32 master weights"

        def ctx():
            return torch.autocast(device_type=device, dtype=dtype)

    else:
        mode = "fp32"
        ctx = contextlib.nullcontext
    optim_cfg = OptimConfig()  # the trainer's defaults: lr 1e-6, weight decay 0.01, grad clip 1.0
    optimizer = build_optimizer(model, optim_cfg)  # fused AdamW where the device has it

    rows = make_rows(args.sequences, args.seq_len, args.prompt_len, config.vocab_size)
    fill_old_logprobs(model, rows, args.old_logprobs, config.vocab_size, args.micro_batch_tokens, ctx)
    flops = step_flops(config, rows, non_embedding)
    tokens = sum(r.tokens for r in rows)

    fwd_bwd, opt, metrics = [], [], {}
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        with ctx():
            metrics = accumulate_gradients(model, rows, LOSS, token_budget=args.micro_batch_tokens)
        sync()
        t1 = time.perf_counter()
        clip_gradients(model, optim_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)

    if device == "cuda":
        peak_mem = torch.cuda.max_memory_allocated()
        where = torch.cuda.get_device_name()
        peak_tflops = args.peak_tflops or (cuda_peak_tflops(where) if dtype == torch.bfloat16 else None)
        peak_source = (
            "--peak-tflops"
            if args.peak_tflops
            else ("datasheet dense bf16" if peak_tflops else "unknown device/dtype: pass --peak-tflops")
        )
    else:
        peak_mem = max_rss_bytes() - rss_before
        where = f"CPU, {torch.get_num_threads()} threads"
        peak_tflops = args.peak_tflops or cpu_matmul_tflops(args.cpu_peak_n)  # after the RSS reading
        peak_source = "--peak-tflops" if args.peak_tflops else f"measured fp32 {args.cpu_peak_n}^3 matmul, this run"

    t_fb, t_opt = statistics.median(fwd_bwd), statistics.median(opt)
    phases = {"fwd+bwd": t_fb, "optimizer": t_opt, "step": statistics.median(a + b for a, b in zip(fwd_bwd, opt))}
    table = []
    for name, seconds in phases.items():
        has_flops = name != "optimizer"
        tflops = flops / seconds / 1e12 if has_flops else None
        table.append(
            dict(
                phase=name,
                median_s=seconds,
                tokens_per_s=tokens / seconds if has_flops else None,
                tflops=tflops,
                mfu=tflops / peak_tflops if has_flops and peak_tflops else None,
            )
        )
    return dict(
        args=vars(args),
        device=where,
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        mode=mode,
        params=total_params,
        non_embedding_params=non_embedding,
        tokens_per_step=tokens,
        response_tokens_per_step=sum(len(r.response_ids) for r in rows),
        flops_per_step=flops,
        peak_tflops=peak_tflops,
        peak_source=peak_source,
        peak_memory_bytes=peak_mem,
        fwd_bwd_s=fwd_bwd,
        optimizer_s=opt,
        last_metrics=metrics,
        rows=table,
    )


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def print_result(r: dict) -> None:
    a = r["args"]
    print(
        f"policy update  {a['model_config']} ({r['params'] / 1e6:.1f}M params, {r['non_embedding_params'] / 1e6:.1f}M "
        f"non-embedding)  {r['mode']}  torch {r['torch']}  transformers {r['transformers']}  [{r['device']}]"
    )
    print(
        f"  {a['sequences']} seqs x {a['seq_len']} tokens ({a['prompt_len']} prompt) = "
        f"{r['tokens_per_step']} tokens/step, "
        f"micro-batch budget {a['micro_batch_tokens']}, attn {a['attn']}, "
        f"gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}, "
        f"{a['steps']} timed steps after {a['warmup']} warm-up"
    )
    print(f"  model FLOPs/step {r['flops_per_step'] / 1e12:.3f} TFLOP; peak {_fmt(r['peak_tflops'], '.2f')} TFLOP/s "
          f"({r['peak_source']})")  # fmt: skip
    columns = ("median s", 10), ("tokens/s", 11), ("TFLOP/s", 9), ("MFU", 7)
    header = f"{'phase':12s} " + " ".join(f"{name:>{width}s}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for row in r["rows"]:
        mfu = f"{100 * row['mfu']:6.1f}%" if row["mfu"] is not None else f"{'-':>7s}"
        print(
            f"{row['phase']:12s} {row['median_s']:10.4f} {_fmt(row['tokens_per_s'], '11.1f')} "
            f"{_fmt(row['tflops'], '9.3f')} {mfu}"
        )
    fb = r["fwd_bwd_s"]
    print(f"fwd+bwd per step: min {min(fb):.4f} s, max {max(fb):.4f} s over {len(fb)} steps")
    kind = "max allocated (CUDA)" if "CPU" not in r["device"] else "max RSS growth (CPU)"
    print(f"peak memory: {r['peak_memory_bytes'] / 2**30:.2f} GiB {kind}")
    m = r["last_metrics"]
    if m:
        print(
            f"last step: loss {m['loss']:.4f}, clip_frac_low {m.get('clip_frac_low', 0):.3f}, "
            f"clip_frac_high {m.get('clip_frac_high', 0):.3f}, non-finite {m['num_nonfinite']:.0f}"
        )


def _fmt(x, spec: str) -> str:
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return format(x, spec) if x is not None else format("-", f">{width or 1}s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default=None, help="qwen2-1.5b, tiny, or a config.json path "
                   "(default: qwen2-1.5b on CUDA, tiny on the CPU)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096 CUDA, 256 CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per sequence (default min(256, seq/4))")
    p.add_argument("--sequences", type=int, default=None, help="sequences per optimizer step (default 16 CUDA, 4 CPU)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="token budget of a packed micro-batch "
                   "(default 8192 CUDA, 512 CPU)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CUDA, 1 CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard with MixedPrecisionPolicy, 1-process group")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype (auto: bf16 on CUDA, fp32 on the CPU); master weights are fp32")  # fmt: skip
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--old-logprobs", choices=("model", "random"), default="model")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for the MFU, overriding the lookup")
    p.add_argument("--cpu-peak-n", type=int, default=2048, help="CPU: size of the matmul that measures the peak")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    defaults = dict(
        model_config="qwen2-1.5b" if cuda else "tiny",
        seq_len=4096 if cuda else 256,
        sequences=16 if cuda else 4,
        micro_batch_tokens=8192 if cuda else 512,
        steps=5,
        warmup=2 if cuda else 1,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prompt_len is None:
        args.prompt_len = min(256, args.seq_len // 4)
    if not 1 <= args.prompt_len < args.seq_len:
        p.error(f"--prompt-len must be in [1, --seq-len); got {args.prompt_len} with --seq-len {args.seq_len}")
    if args.steps < 1 or args.warmup < 0 or args.sequences < 1 or args.micro_batch_tokens < 1:
        p.error("--steps, --sequences and --micro-batch-tokens must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    finally:
        if args.fsdp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print_result(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
