"""The names of a run's checkpoint folders and of the files in one checkpoint (the layout is drawn in
:mod:`trainer.checkpoint.manager`'s docstring), and the listing of a run's step folders."""

from __future__ import annotations

import re
from pathlib import Path

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# The files a resume cannot do without (besides the weights, listed as SAFE_WEIGHTS or SAFE_INDEX).
REQUIRED_FILES = (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, f"{MODEL_DIR}/config.json")

STEP_DIR = re.compile(r"step-(\d{8,})")


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """The step folders under ``root`` as (step, path), oldest first, complete or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)
