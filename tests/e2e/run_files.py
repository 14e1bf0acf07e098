"""What the end-to-end tests share: the overrides of a small run of the demo model, and what they read from its
folder: its metrics lines, its newest checkpoint's weights, and the records without their wall-clock figures
(which differ between two runs of the same computation)."""

import json
from pathlib import Path

import torch

from trainer.run.run_log import METRICS_FILE

TIMING_KEYS = {"rollout_s", "score_s", "logprob_s", "update_s", "sync_s", "step_s", "rollout_tokens_per_s",
               "update_tokens_per_s", "rollout_wait_s", "overlap"}  # fmt: skip


def small_run(model: Path, out: Path, steps: int) -> list[str]:
    """A few seconds a step: 2 prompts x 4 samples, 48 tokens, a length-graded penalty (kimi: groups have spread
    even where every answer is wrong), a checkpoint every 2 steps, a 4-question evaluation. The engine is the
    caller's to choose."""
    return [
        f"model.path={model}",
        f"run.out={out}",
        f"run.steps={steps}",
        "run.save_every=2",
        "rollout.dtype=float32",
        "rollout.sampling.prompts_per_step=2",
        "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.max_tokens=48",
        "reward.penalty.name=kimi",
        "reward.penalty.length_budget=48",
        "algorithm.mini_batch_prompts=1",
        "optim.lr=1e-2",
        "eval.limit=4",
        "eval.samples_per_prompt=1",
        "eval.max_tokens=48",
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def newest_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (step_dir,) = sorted((out / "checkpoints").glob("step-*"))[-1:]
    return load_file(str(step_dir / "model" / "model.safetensors"))
