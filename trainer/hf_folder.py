"""Hugging Face model folders the project writes itself: where they are cached (:func:`cache_dir`) and the
safetensors file of a model's weights (:func:`save_state_dict`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DLER_CACHE"
DEFAULT_CACHE = "~/.cache/dler"


def cache_dir() -> Path:
    """Where prepared models are cached: ``$DLER_CACHE``, default ``~/.cache/dler``."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser()


def save_state_dict(model, folder: Path, dtype) -> None:
    """safetensors of the model in ``dtype``. Tied output heads are stored once (as the embedding):
    safetensors refuses shared storage, and transformers and vLLM re-tie on load."""
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
