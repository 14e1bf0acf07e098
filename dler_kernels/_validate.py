"""Argument checks shared by the public ops: every bad input is a ValueError that names the
argument and what was expected, raised before any kernel launches."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str, t, *, ndim: int, kind: str, device: torch.device | None = None, length: int | None = None, like="logits"
):
    """``kind``: 'float', 'int' or 'mask' (bool, integer or float 0/1)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if kind == "float" and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if kind == "mask" and t.is_complex():
        raise ValueError(f"{name} must be bool (or 0/1 numbers), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like {like}, got {t.device}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per token), got shape {tuple(t.shape)}")
    return t


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name: str, value, *, low=None, high=None, low_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")


def check_targets(targets: torch.Tensor, valid: torch.Tensor | None, vocab: int, what: str = "logits") -> None:
    """Targets of valid rows lie in [0, vocab); masked rows may hold anything (e.g. -100)."""
    t = targets if valid is None else targets[valid]
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets must lie in [0, {vocab}) (the vocab size of {what}) on valid rows, found {bad}")
