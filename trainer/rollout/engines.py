"""The choice of rollout engine by name: ``make_engine("vllm" | "hf", model_dir, **options)``."""

from __future__ import annotations

from pathlib import Path

from .contract import RolloutEngine
from .hf_engine import HFEngine
from .vllm_engine import VLLMEngine

ENGINES = ("vllm", "hf")


def resolve_engine(kind: str) -> str:
    """``kind`` as given, or for "auto" vLLM when it is installed, else transformers."""
    if kind != "auto":
        return kind
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(kind: str, model_dir: Path | str, **options) -> RolloutEngine:
    """``kind`` "vllm" or "hf"; ``options`` go to the engine's constructor."""
    if kind == "vllm":
        return VLLMEngine(model_dir, **options)
    if kind == "hf":
        return HFEngine(model_dir, **options)
    raise ValueError(f"rollout engine must be one of {ENGINES}, got {kind!r}")
