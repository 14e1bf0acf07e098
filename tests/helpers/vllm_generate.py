"""Run in a subprocess by the tests: start a real vLLM engine, sample, print JSON on the last line.

A separate process gives each engine a clean start and returns its memory when it exits.
usage: python vllm_generate.py MODEL_DIR '{"prompts": [...], "n": 2, "max_tokens": 8, ...}'
       python vllm_generate.py MODEL_DIR '{"calls": [{...}, {...}], "dtype": ...}'  (one engine, several calls)
"""

import json
import sys
from dataclasses import asdict

from trainer.rollout.contract import chat_prompts
from trainer.rollout.vllm_engine import VLLMEngine


def run(engine, model_dir, spec):
    prompts = spec.pop("prompts")
    if spec.pop("chat", False):
        prompts = chat_prompts(model_dir, prompts)
    groups = engine.generate(prompts, **spec)
    return {"prompts": prompts, "groups": [[asdict(s) for s in g] for g in groups]}


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
    result = [run(engine, model_dir, c) for c in calls] if calls is not None else run(engine, model_dir, spec)
    print(json.dumps(result))
