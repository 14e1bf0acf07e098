"""Run in a subprocess by the tests: start a real vLLM engine, sample once, print JSON on the last line.

A separate process gives the engine a clean start and returns its memory when it exits (the tests that only
sample share engines instead: tests/integrations/test_vllm_cpu.py).
usage: python vllm_generate.py MODEL_DIR '{"prompts": [...], "n": 2, "max_tokens": 8, "chat": false, ...}'
"""

import json
import sys
from dataclasses import asdict

from trainer.rollout.contract import chat_prompts
from trainer.rollout.vllm_engine import VLLMEngine

if __name__ == "__main__":
    model_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    engine = VLLMEngine(
        model_dir,
        max_model_len=spec.pop("max_model_len", 512),
        dtype=spec.pop("dtype", "auto"),
        gpu_memory_utilization=spec.pop("gpu_memory_utilization", None),
        seed=0,
    )
    prompts = spec.pop("prompts")
    if spec.pop("chat", False):
        prompts = chat_prompts(model_dir, prompts)
    groups = engine.generate(prompts, **spec)
    print(json.dumps({"prompts": prompts, "groups": [[asdict(s) for s in g] for g in groups]}))
