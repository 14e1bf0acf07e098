"""Run in a subprocess by the tests: prove that ``VLLMEngine.update_weights`` really changes the
engine's weights. Prints, on the last line, a JSON list: one object per model checked.

1. Sample from the engine with the folder's weights.
2. Perturb every weight of a transformers copy (a stand-in for a policy update), push them with
   ``update_weights`` (as a lazy generator, the way the trainer streams gathered shards), sample again.
3. Score the new samples with a transformers forward of the new and of the old weights.
4. Send a bad update (unknown tensor name); the engine must refuse it and still generate.

Several models may be checked in one process, one engine after the other, so that the process's start (vLLM's
imports) is paid once: the tiny model and SmolLM2 took 30 s together, against 16 s + 28 s in a process each.

usage: python vllm_weight_sync.py MODEL_DIR '{"dtype": "bfloat16", "noise": 0.02, ...}' [MODEL_DIR SPEC ...]
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from trainer.rollout.contract import chat_prompts
from trainer.rollout.vllm_engine import VLLMEngine


def sampled_logprobs(model, prompt_ids, samples, temperature):
    """Per-token log-probs of each sample's tokens under ``model`` (float32 softmax of logits / T)."""
    out = []
    for s in samples:
        ids = torch.tensor([prompt_ids + s.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0])
    return torch.cat(out)


def weight_sync(model_dir: str, spec: dict) -> dict:
    """Steps 1-4 on one model, its engine closed at the end; the figures the test checks."""
    dtype = getattr(torch, spec["dtype"])
    engine = VLLMEngine(model_dir, dtype=spec["dtype"], max_model_len=512, gpu_memory_utilization=spec["mem"])
    prompts = chat_prompts(model_dir, spec["questions"])
    prompt_ids = [engine.llm.get_tokenizer()(p).input_ids for p in prompts]
    sampling = dict(n=spec["n"], max_tokens=spec["max_tokens"], temperature=1.0, seed=5)
    before = engine.generate(prompt_ids, **sampling)

    old = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    new = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1 + spec["noise"] * torch.randn(p.shape, generator=gen).to(p.dtype))
    # Tied model: named_parameters() lists the embedding once; the engine adds its lm_head itself.
    stats = engine.update_weights((name, p.detach()) for name, p in new.named_parameters())
    after = engine.generate(prompt_ids, **sampling)

    engine_lp, new_lp, old_lp = [], [], []
    for ids, group in zip(prompt_ids, after):
        engine_lp.append(torch.tensor([lp for s in group for lp in s.logprobs]))
        new_lp.append(sampled_logprobs(new, ids, group, 1.0))
        old_lp.append(sampled_logprobs(old, ids, group, 1.0))
    engine_lp, new_lp, old_lp = torch.cat(engine_lp), torch.cat(new_lp), torch.cat(old_lp)

    # Refused updates: a list is checked whole before anything reaches the engine, so the
    # engine keeps the weights it had; a failing stream resets it to the folder's weights.
    errors = {}
    for name, bad in {
        "unknown": [("model.not_a_tensor.weight", torch.zeros(3))],
        "shape": [("model.norm.weight", torch.zeros(3))],
    }.items():
        try:
            engine.update_weights(bad)
        except ValueError as e:
            errors[name] = str(e)
    kept = engine.generate(prompt_ids, **sampling)
    kept_lp = torch.cat([torch.tensor([lp for s in g for lp in s.logprobs]) for g in kept])
    kept_new = torch.cat([sampled_logprobs(new, ids, g, 1.0) for ids, g in zip(prompt_ids, kept)])
    try:
        engine.update_weights((name, p.detach()) for name, p in [("model.norm.weight", torch.zeros(3))])
    except RuntimeError as e:
        errors["stream"] = str(e)
    reset = engine.generate(prompt_ids, **sampling)
    reset_lp = torch.cat([torch.tensor([lp for s in g for lp in s.logprobs]) for g in reset])
    reset_old = torch.cat([sampled_logprobs(old, ids, g, 1.0) for ids, g in zip(prompt_ids, reset)])

    engine.close()
    return {
        "tokens": int(engine_lp.numel()),
        "changed_samples": sum(a.token_ids != b.token_ids for ga, gb in zip(before, after) for a, b in zip(ga, gb)),
        "mean_abs_diff_new": (engine_lp - new_lp).abs().mean().item(),
        "mean_abs_diff_old": (engine_lp - old_lp).abs().mean().item(),
        "sync": {"tensors": stats.tensors, "bytes": stats.bytes, "seconds": stats.seconds},
        "errors": errors,
        "mean_abs_diff_new_after_refused": (kept_lp - kept_new).abs().mean().item(),
        "mean_abs_diff_old_after_reset": (reset_lp - reset_old).abs().mean().item(),
    }


if __name__ == "__main__":
    pairs = sys.argv[1:]
    print(json.dumps([weight_sync(model, json.loads(spec)) for model, spec in zip(pairs[::2], pairs[1::2])]))
