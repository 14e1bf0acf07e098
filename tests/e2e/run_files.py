"""What the end-to-end tests read from a run folder: its metrics lines, its newest checkpoint's weights, and the
records without their wall-clock figures (which differ between two runs of the same computation)."""

import json
from pathlib import Path

import torch

from trainer.run.run_log import METRICS_FILE

TIMING_KEYS = {"rollout_s", "score_s", "logprob_s", "update_s", "sync_s", "step_s", "rollout_tokens_per_s",
               "update_tokens_per_s", "rollout_wait_s", "overlap"}  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def newest_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (step_dir,) = sorted((out / "checkpoints").glob("step-*"))[-1:]
    return load_file(str(step_dir / "model" / "model.safetensors"))
