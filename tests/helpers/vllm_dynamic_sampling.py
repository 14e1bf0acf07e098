"""Run in a subprocess by the tests: dynamic sampling with DA-DLER budgets on the real vLLM engine
and SmolLM2, on the built-in toy-arith task. Prints one JSON object on the last line.

usage: python vllm_dynamic_sampling.py MODEL_DIR '{"prompts_per_step": 2, ...}'
"""

import json
import sys
import warnings

from transformers import AutoTokenizer

from trainer.data import PromptStream, build_prompts, load_examples
from trainer.reward.answers import AnswerChecker
from trainer.reward.budgets import DifficultyBudgets
from trainer.reward.rewards import LengthPenaltyConfig
from trainer.rollout.sampling import DynamicSampler, SamplingConfig
from trainer.rollout.vllm_engine import VLLMEngine

if __name__ == "__main__":
    model_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(f"builtin:toy-arith?difficulty={spec['difficulty']}&size=64")
    stream = PromptStream(examples, seed=0)
    engine = VLLMEngine(model_dir, max_model_len=512, gpu_memory_utilization=0.15)
    budgets = DifficultyBudgets(thresholds=(0.5,), budgets=tuple(spec["budgets"]))
    with AnswerChecker(mode="exact", fallback_last_number=True) as checker:
        sampler = DynamicSampler(
            engine,
            stream,
            lambda exs: [p.token_ids for p in build_prompts(tokenizer, exs, template="plain")],
            checker,
            LengthPenaltyConfig(name="truncation"),
            SamplingConfig(**spec["sampling"]),
            budgets,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch, stats = sampler.collect(step=0, seed=1)
        texts = [s.text for g in batch for s in g.samples]
        golds = [g.example.answer for g in batch for _ in g.samples]
        rescored = checker.score(texts, golds)
    print(
        json.dumps(
            {
                "stats": stats.as_dict(),
                "warnings": [str(w.message) for w in caught],
                "rescored": rescored,
                "groups": [
                    {
                        "id": g.example.id,
                        "correct": g.correct.tolist(),
                        "rewards": g.rewards.tolist(),
                        "lengths": g.lengths.tolist(),
                        "truncated": g.truncated.tolist(),
                        "finish": [s.finish_reason for s in g.samples],
                        "token_counts": [len(s.token_ids) for s in g.samples],
                        "budget": g.budget,
                    }
                    for g in batch
                ],
                "stream_position": stream.position,
                "record": {k: list(v) for k, v in budgets.record.items()},
            }
        )
    )
