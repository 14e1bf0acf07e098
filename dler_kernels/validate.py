"""Argument checks shared by the public ops: every bad input is a ValueError that names the
argument and what was expected, raised before any kernel launches.

While torch.compile traces a call, the checks that read tensor values (mask values, target range, finite data,
target probability) are skipped: a compiled graph cannot raise on data, and reading a value there splits the
graph (``fullgraph=True`` refuses it). Shapes, dtypes, devices and options are checked there as in eager."""

from __future__ import annotations

import difflib
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def values_readable() -> bool:
    """Whether the value checks run: always but while torch.compile traces (see the module docstring)."""
    return not torch.compiler.is_compiling()


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


def check_name(name: str, value, choices) -> None:
    """``check_choice`` for a name a user types (an objective, a registered loss): the error adds the closest
    choice, if one is close."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}{hint}")


def check_number(name: str, value, *, low=None, high=None, low_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")


def token_ids(targets: torch.Tensor) -> torch.Tensor:
    """``targets`` (an integer tensor, already checked by :func:`check_tensor`) as int64, the one dtype every
    backend indexes with: any integer dtype is accepted (uint8 and int32 token ids included), with its values
    unchanged; uint64 is refused, as int64 does not hold it (a value above 2**63 would wrap to a negative id,
    a padding row). Converted before any other check reads them."""
    if targets.dtype == torch.uint64:
        raise ValueError("targets must be an integer tensor that int64 holds (token ids), got torch.uint64")
    return targets.long()


def check_targets(targets: torch.Tensor, valid: torch.Tensor | None, vocab: int, what: str = "logits") -> None:
    """Targets of valid rows lie in [0, vocab); masked rows may hold anything (e.g. -100)."""
    if not values_readable():
        return
    t = targets if valid is None else targets[valid]
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets must lie in [0, {vocab}) (the vocab size of {what}) on valid rows, found {bad}")


def check_no_grad(name: str, t) -> None:
    """``t`` (a data argument: anything but logits / hidden / weight / bias) must not require grad
    while grad mode is on: the ops differentiate the loss w.r.t. the logits (or hidden states and LM
    head) only, so a gradient the caller expects for ``t`` would silently be missing."""
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but it is data, not a parameter: the loss is differentiated w.r.t. the "
            f"logits (or hidden, weight, bias) only; pass {name}.detach()"
        )


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """The bool form of ``mask``: bool, or numbers that are exactly 0 or 1 (a value such as 0.5, 2 or
    NaN is a ValueError naming it, not a true). Non-bool masks cost one device sync."""
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)  # NaN is neither
    if values_readable() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"mask must be bool or hold only 0 and 1, found {mask[i].item()} at token {i} "
            "(per-token weights go in token_weights)"
        )
    return mask.bool()


def check_finite_on_valid(valid: torch.Tensor, named: dict) -> None:
    """Each tensor of ``named`` (name -> [N] float tensor or None) is finite on the rows where ``valid``
    is true (masked rows may hold anything). One device sync for all of them."""
    names = [k for k, t in named.items() if t is not None]
    if not names or valid.numel() == 0 or not values_readable():
        return
    bad = [valid & ~torch.isfinite(named[k]) for k in names]
    if not bool(torch.stack([b.any() for b in bad]).any()):
        return
    for name, b in zip(names, bad):
        if bool(b.any()):
            i = int(b.nonzero()[0, 0])
            raise ValueError(f"{name} must be finite on valid rows, found {named[name][i].item()} at token {i}")


def check_valid_rows(targets: torch.Tensor, valid: torch.Tensor, vocab: int, what: str, finite: dict) -> None:
    """On the rows where ``valid`` is true: targets lie in [0, vocab) (:func:`check_targets`) and each tensor of
    ``finite`` (name -> [N] float tensor or None) is finite (:func:`check_finite_on_valid`). One device sync
    for all of them on the good path, which is every call of a training loop; the errors are located after."""
    tensors = [t for t in finite.values() if t is not None]
    if valid.numel() == 0 or not values_readable():
        return
    flags = [(valid & ((targets < 0) | (targets >= vocab))).any()]
    flags += [(valid & ~torch.isfinite(t)).any() for t in tensors]
    if not bool(torch.stack(flags).any()):
        return
    check_targets(targets, valid, vocab, what)
    check_finite_on_valid(valid, finite)


def check_target_probability(logp: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, what="logits") -> None:
    """No valid row gives its target probability 0. ``logp`` [N] is what the kernels returned: a valid row's
    log-prob is exactly -inf when its target's logit is -inf, or every logit of the row is (a NaN or +inf
    logit gives NaN instead: a non-finite loss, counted by the ``num_nonfinite`` metric, not this error), so
    the check is one comparison over [N] and one device sync, never a pass over the logits."""
    if logp.numel() == 0 or not values_readable():
        return
    bad = valid & torch.isneginf(logp)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"{what} of row {i} give its target (token {int(targets[i])}) probability 0: that token's logit is -inf "
        "(a masked-out vocabulary entry), or every logit of the row is; a valid row's target needs a finite "
        "logit (mask the row out otherwise)"
    )
