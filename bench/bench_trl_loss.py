"""Peak memory and time of one TRL GRPO loss step (``compute_loss`` + ``backward``): TRL's own path
(``trl.GRPOTrainer``: its chunked fused LM head for the log-probs, then the loss on [B, C] tensors)
against ``DLERGRPOTrainer`` (``dler_kernels.linear_policy_loss`` on the hidden states), same model,
same batch, measured side by side in one run.

    python bench/bench_trl_loss.py                                   # CPU: tiny Llama, V=151936, fp32
    python bench/bench_trl_loss.py --completions 16 --completion-len 2048 --layers 4 --hidden 1024   # CUDA

The model is a Llama built from a config with random weights (Qwen2's vocabulary size by default, so that
the LM head dominates as in real RL); ``dapo`` loss, beta 0, old log-probs given (vLLM-style), eps
0.2 / 0.28. Memory: on CUDA the allocator's peak above what was allocated before the step
(``torch.cuda.max_memory_allocated``); on the CPU the growth of the process's peak resident set
(``bench/cpu_memory.py``), each path in its own fresh process. Times are medians over ``--repeats``
steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_memory import peak_growth, run_in_child  # noqa: E402

PATHS = ("trl", "dler")


def build(args, path, workdir):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from dler_kernels.integrations.trl import DLERGRPOTrainer

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model_dir = os.path.join(workdir, "model")
    if not os.path.exists(model_dir):
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          max_position_embeddings=args.prompt_len + args.completion_len + 8,
                          tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2}, unk_token="a")),
        pad_token="<pad>", eos_token="</s>",
    )  # fmt: skip
    import datasets

    config = GRPOConfig(
        output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=args.completions,
        num_generations=args.completions, max_completion_length=args.completion_len, report_to="none",
        use_cpu=not cuda, bf16=cuda, gradient_accumulation_steps=1, loss_type="dapo", beta=0.0,
        epsilon=0.2, epsilon_high=0.28,
    )  # fmt: skip
    cls = GRPOTrainer if path == "trl" else DLERGRPOTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=LlamaForCausalLM.from_pretrained(model_dir), reward_funcs=lambda completions, **kw: [0.0],
            args=config, train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 2}), processing_class=tok,
        )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    dev = trainer.accelerator.device
    g = torch.Generator().manual_seed(1)
    b, p, c = args.completions, args.prompt_len, args.completion_len
    completion_mask = torch.ones(b, c, dtype=torch.long)
    for i in range(b):  # completions of varied lengths
        completion_mask[i, int(c * (0.5 + 0.5 * (i + 1) / b)) :] = 0
    inputs = {
        "prompt_ids": torch.randint(2, args.vocab, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(2, args.vocab, (b, c), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": completion_mask.sum(),
        # a randomly initialised model is near uniform: -log V plus noise, so that some ratios clip
        "old_per_token_logps": -torch.log(torch.tensor(float(args.vocab))) + 0.1 * torch.randn(b, c, generator=g),
    }
    return trainer, {k: v.to(dev) for k, v in inputs.items()}


def step(trainer, inputs):
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    trainer.model.zero_grad(set_to_none=False)  # gradients stay allocated: both paths hold the same ones
    return loss.item()


def run_path(args, path):
    """(peak bytes of one step above what was live before it, median seconds, loss, completion tokens)."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer, inputs = build(args, path, workdir)
        loss = step(trainer, inputs)  # warm-up; allocates the gradients
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            step(trainer, inputs)
            sync()
            times.append(time.perf_counter() - t0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(trainer, inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = peak_growth(lambda: step(trainer, inputs))
    return peak, statistics.median(times), loss, int(inputs["completion_mask"].sum())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--completion-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-child", choices=PATHS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.rss_child:
        peak, seconds, loss, tokens = run_path(args, args.rss_child)
        print(json.dumps({"peak_bytes": peak, "seconds": seconds, "loss": loss, "tokens": tokens}))
        return

    import trl

    # each in a fresh process: peak memory, time and loss of its own step
    results = {path: run_in_child(os.path.abspath(__file__), path, args) for path in PATHS}
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tokens = results["trl"]["tokens"]
    print(f"TRL {trl.__version__} GRPO loss step (dapo), {cuda}, torch {torch.__version__}: V={args.vocab}, "
          f"H={args.hidden}, {args.layers} layers, {args.completions} x {args.completion_len} completion slots "
          f"({tokens} completion tokens), {'bf16' if torch.cuda.is_available() else 'fp32'}")  # fmt: skip
    print(f"{'path':<34}{'peak memory (MiB)':>18}{'time (ms)':>12}{'loss':>14}")
    names = {"trl": "trl.GRPOTrainer", "dler": "DLERGRPOTrainer (linear_policy_loss)"}
    for path in PATHS:
        r = results[path]
        print(f"{names[path]:<34}{r['peak_bytes'] / 2**20:>18.1f}{r['seconds'] * 1e3:>12.1f}{r['loss']:>14.6f}")
    ratio = results["dler"]["peak_bytes"] / max(results["trl"]["peak_bytes"], 1)
    speed = results["trl"]["seconds"] / results["dler"]["seconds"]
    print(f"peak memory dler / trl = {ratio:.3f}; time trl / dler = {speed:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "memory_ratio": ratio, "speedup": speed}, f, indent=1)


if __name__ == "__main__":
    main()
