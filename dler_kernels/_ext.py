"""The optional C++/CUDA extension ``dler_kernels._C`` (sources in ``csrc/``, built by setup.py).

Loaded lazily, on the first op that could use it, never at ``import dler_kernels``. An extension
that is missing, fails to load, or is stale (built for another op ABI, another torch, or, in a
source checkout, from other sources than those in ``csrc/``) gives one warning that says why and
how to rebuild, and the ops fall back to Triton / the plain-torch reference. The kernels as a backend:
``dler_kernels.ext_backend``.

The ops are PyTorch custom ops (``torch.ops.dler.*``, schemas in ``csrc/ops.cpp``). This module
registers their fake (meta) implementations, so that ``torch.compile`` traces through them, and
the autograd formula of the functional ``dler::policy_loss``.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import torch

from . import reference as ref
from .stored_grad import scale_stored_grads

# Must equal DLER_ABI_VERSION in csrc/ops.cpp: bumped whenever an op's schema or semantics change.
ABI_VERSION = 2
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (see README, 'Building the extension')"

_lock = threading.Lock()
_state: dict = {}


def _csrc_dir() -> Path | None:
    """``csrc/`` of a source checkout (editable install), None in an installed wheel."""
    path = Path(__file__).resolve().parent.parent / "csrc"
    return path if (path / "ops.cpp").is_file() else None


def _build_info():
    """What the extension was built for (``_build_info.py``, written by setup.py with it), or None: an extension
    built before setup.py wrote it, or none at all."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def rebuild_hint() -> str:
    if _csrc_dir() is not None:
        return REBUILD_HINT
    return (
        "install the dler wheel built for this torch, or build one against it with `pip wheel --no-build-isolation "
        "--no-deps .` from the dler sources (see README, 'Building wheels')"
    )


def _try_load():
    """(module, None) or (None, why not)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, "not built"
    info = _build_info()
    if info is not None and info.TORCH_VERSION != torch.__version__:
        # Checked before loading: under another torch the library's symbols do not resolve, or worse.
        return None, f"built for torch {info.TORCH_VERSION}, not this torch {torch.__version__}: not loaded"
    try:
        from . import _C
    except ModuleNotFoundError:
        return None, "not built"
    except (ImportError, OSError) as e:  # e.g. an undefined symbol: built against another torch
        return None, f"failed to load ({e})"
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        return None, f"stale: built for op ABI {getattr(_C, 'ABI_VERSION', '?')}, this package needs {ABI_VERSION}"
    if _C.TORCH_VERSION != torch.__version__:
        return None, f"stale: built against torch {_C.TORCH_VERSION}, running torch {torch.__version__}"
    csrc = _csrc_dir()
    if csrc is not None:
        from ._sources_hash import sources_hash

        if sources_hash(csrc) != _C.SOURCES_HASH:
            return None, f"stale: built from other sources than those in {csrc}"
    return _C, None


def load():
    """The extension module, or None (after one warning saying why) when it cannot be used."""
    if "module" in _state:  # loaded: no lock, which torch.compile could not trace (dispatch runs inside its graphs)
        return _state["module"]
    with _lock:
        if "module" not in _state:
            module, why = _try_load()
            _state["why"], _state["warned"] = why, False
            _state["module"] = module  # last: its presence means loaded (the unlocked path above)
            if module is not None:
                _register_python_parts()
        return _state["module"]


def why_not() -> str | None:
    load()
    return _state["why"]


def warn_fallback(device_type: str) -> None:
    """The one warning about an unusable extension, given when an op would have used it."""
    load()
    with _lock:
        if _state["warned"]:
            return
        _state["warned"] = True
    fallback = "the plain-torch reference" if device_type == "cpu" else "Triton / the plain-torch reference"
    warnings.warn(
        f"dler_kernels._C is {_state['why']}; {device_type.upper()} tensors use {fallback}. To use the C++ "
        f"kernels, {rebuild_hint()}.",
        RuntimeWarning,
        stacklevel=5,  # the line that called the op: warn_fallback <- dispatch (2) <- the public op <- its caller
    )


def has_cpu() -> bool:
    return load() is not None


def has_cuda() -> bool:
    module = load()
    return module is not None and bool(module.WITH_CUDA)


def status() -> tuple[str, str]:
    """(cpu, cuda) lines for ``available_backends``."""
    module = load()
    if module is None:
        why = f"no (dler_kernels._C {_state['why']})"
        return why, why
    cpu = f"yes (dler_kernels._C, {module.cpu_isa()} kernels)"
    if not module.WITH_CUDA:
        return cpu, "no (dler_kernels._C built without CUDA)"
    cuda = "yes (dler_kernels._C)" if torch.cuda.is_available() else "built, CUDA tensors only: no CUDA device here"
    return cpu, cuda


# ---------------------------------------------------------------- fake implementations and autograd


def _register_python_parts() -> None:
    lib = "dler::"

    @torch.library.register_fake(lib + "policy_loss")
    def _(logits, targets, valid, old, adv, ref_lp, weights, temperature, eps_low, eps_high, clip_c, beta, kl_type,
          entropy_coef, write_grad, objective=0, ratio_cap=20.0, tau_pos=1.0, tau_neg=1.05):  # fmt: skip
        n, acc = logits.shape[0], ref.accumulation_dtype(logits)
        grad = logits.new_empty(logits.shape) if write_grad else logits.new_empty(0)
        return (logits.new_empty((), dtype=acc), *(logits.new_empty(n, dtype=acc) for _ in range(4)), grad)

    @torch.library.register_fake(lib + "policy_loss_rows_")
    def _(grad, logits, *args):
        return tuple(logits.new_empty(logits.shape[0], dtype=ref.accumulation_dtype(logits)) for _ in range(7))

    @torch.library.register_fake(lib + "token_logprobs")
    def _(logits, targets, temperature):
        return tuple(logits.new_empty(logits.shape[0], dtype=ref.accumulation_dtype(logits)) for _ in range(2))

    @torch.library.register_fake(lib + "slab_grad_")
    def _(slab, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
        return None

    def setup_context(ctx, inputs, output):
        _, per_token, logp, entropy, kl, grad = output
        ctx.mark_non_differentiable(per_token, logp, entropy, kl, grad)
        ctx.set_materialize_grads(False)  # else backward would get a zero [N, V] "gradient" of the grad output
        ctx.write_grad = inputs[14]
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(grad)

    def backward(ctx, grad_loss, *unused):
        if not ctx.write_grad:
            raise RuntimeError("dler::policy_loss was called with write_grad=False; it has no gradient to give")
        if grad_loss is None:
            return (None,) * ctx.n_inputs
        return (*scale_stored_grads(grad_loss, *ctx.saved_tensors), *([None] * (ctx.n_inputs - 1)))

    torch.library.register_autograd(lib + "policy_loss", backward, setup_context=setup_context)
