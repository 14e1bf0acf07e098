"""Run in a subprocess by the tests: start a real vLLM engine, sample, print JSON on the last line.

A separate process gives each engine a clean start and returns its memory when it exits.
usage: python vllm_generate.py MODEL_DIR '{"prompts": [...], "n": 2, "max_tokens": 8, ...}'
       python vllm_generate.py MODEL_DIR '{"calls": [{...}, {...}], "dtype": ...}'  (one engine, several calls;
       a call's "stop_from_previous": [a, b] stops at text[a:b] of the previous call's first sample)
"""

import json
import sys
from dataclasses import asdict

from trainer.rollout.contract import chat_prompts
from trainer.rollout.vllm_engine import VLLMEngine


def run(engine, model_dir, spec, previous=None):
    prompts = spec.pop("prompts")
    if spec.pop("chat", False):
        prompts = chat_prompts(model_dir, prompts)
    cut = spec.pop("stop_from_previous", None)  # [a, b]: stop at text[a:b] of the previous call's first sample
    if cut is not None:
        spec["stop"] = [previous["groups"][0][0]["text"][cut[0] : cut[1]]]
    groups = engine.generate(prompts, **spec)
    return {"prompts": prompts, "stop": spec.get("stop"), "groups": [[asdict(s) for s in g] for g in groups]}


if __name__ == "__main__":
    model_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    engine = VLLMEngine(
        model_dir,
        max_model_len=spec.pop("max_model_len", 512),
        dtype=spec.pop("dtype", "auto"),
        gpu_memory_utilization=spec.pop("gpu_memory_utilization", None),
        seed=0,
    )
    calls = spec.pop("calls", None)
    if calls is None:
        result = run(engine, model_dir, spec)
    else:
        result = []
        for call in calls:
            result.append(run(engine, model_dir, call, result[-1] if result else None))
    print(json.dumps(result))
