"""Which backend runs a given call: ``select_backend`` chooses the object (``backend.Backend``) once per
call, ``backend_for`` is its public name; ``available_backends`` says which backends are usable here and why
the others are not (every refusal's error lists it too).

Backends:

* ``triton``: the fused Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter, how CI tests them).
* ``cpu``: the C++ kernels of the extension ``dler_kernels._C`` for CPU tensors (``csrc/cpu``).
* ``cuda``: the CUDA kernels of the extension for CUDA tensors (``csrc/cuda``), a second GPU
  backend that cross-checks and competes with Triton.
* ``reference``: plain torch (``dler_kernels.reference``), any device.

Default: CUDA tensors go to Triton (else the extension, else the reference); CPU tensors to Triton
under ``TRITON_INTERPRET=1``, else to the extension when it is built, else to the reference (with one
warning that the extension is missing or stale). ``DLER_BACKEND=reference|triton|cpu|cuda`` or an
op's ``backend=`` argument forces one; the environment variable applies only to ops that have that
backend, an explicit argument must name one the op has.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

from . import _ext
from .backend import Backend
from .ext_backend import ExtensionBackend
from .torch_backend import TorchBackend

# The Triton versions the kernels are checked on (pyproject.toml says the same): the oldest is torch
# 2.11's Triton; every kernel is compiled for sm_80/90/100 on both ends by dler_kernels.aot_check
# (tests/kernels/test_aot_check.py; `make triton-oldest` installs the oldest next to the pinned one).
TRITON_OLDEST = "3.6.0"
TRITON_NEWEST = "3.9"  # every 3.9.x


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def triton_supported(version: str) -> bool:
    """Whether ``version`` lies in the range the kernels are checked on (TRITON_OLDEST .. TRITON_NEWEST.x)."""
    return _release(TRITON_OLDEST) <= _release(version) and _release(version)[:2] <= _release(TRITON_NEWEST)[:2]


try:  # triton is optional: CPU-only installs and machines without it use the other backends
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION: str | None = triton.__version__
except ImportError:
    HAS_TRITON = False
    TRITON_VERSION = None

if TRITON_VERSION is not None and not triton_supported(TRITON_VERSION):
    warnings.warn(
        f"dler_kernels is checked on triton {TRITON_OLDEST} to {TRITON_NEWEST}.x; triton {TRITON_VERSION} is "
        "outside that range (the Triton kernels may fail to compile or behave differently)",
        stacklevel=2,
    )

BACKENDS = ("reference", "triton", "cpu", "cuda")
ADVANTAGES_BACKENDS = ("reference", "triton")  # the extension has no advantages kernel


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _make(name: str) -> Backend:
    """A new backend object (the only place a backend's name maps to its implementation)."""
    if name == "triton":
        from .triton_backend import TritonBackend  # imports triton: only once a call has chosen it

        return TritonBackend()
    if name in ("cpu", "cuda"):
        return ExtensionBackend(name)
    return TorchBackend()


_made: dict[str, Backend] = {}


def backend_named(name: str) -> Backend:
    """The backend object called ``name`` (one of BACKENDS), whether or not it can run here."""
    if name not in _made:
        _made[name] = _make(name)
    return _made[name]


def _backends_here(supported) -> str:
    states = available_backends()
    return "backends here: " + "; ".join(f"{name}: {states[name]}" for name in supported)


def _check_forced(name: str, tensor: torch.Tensor, source: str, supported) -> None:
    """A ValueError when the backend ``name``, forced by ``source``, cannot run ops on ``tensor`` here."""
    why = None
    if name == "triton":
        if not HAS_TRITON:
            why = f"{source}=triton but triton is not installed"
        elif not tensor.is_cuda and not triton_interpret():
            why = f"{source}=triton with CPU tensors needs TRITON_INTERPRET=1"
    elif name in ("cpu", "cuda"):
        if name == "cuda" and not torch.cuda.is_available():
            why = (
                f"{source}=cuda but this machine has no CUDA device (torch {torch.__version__}: "
                "torch.cuda.is_available() is False)"
            )
        elif tensor.device.type != name:
            why = f"{source}={name} runs the extension's {name.upper()} kernels, got {tensor.device} tensors"
        elif _ext.load() is None:
            why = f"{source}={name} but dler_kernels._C is {_ext.why_not()}; {_ext.rebuild_hint()}"
        elif name == "cuda" and not _ext.has_cuda():
            why = f"{source}=cuda but dler_kernels._C was built without CUDA; {_ext.rebuild_hint()}"
    if why is not None:
        raise ValueError(f"{why} ({_backends_here(supported)})")


def backend_for(tensor: torch.Tensor, backend: str | None = None, supported=BACKENDS) -> str:
    """The name of the backend that runs an op whose main input is ``tensor`` (``select_backend``)."""
    return select_backend(tensor, backend, supported).name


def select_backend(tensor: torch.Tensor, backend: str | None = None, supported=BACKENDS) -> Backend:
    """The backend that runs an op whose main input is ``tensor``, chosen once per call.

    ``backend``: the op's argument (None: ``DLER_BACKEND`` or the default). ``supported``: the
    backends that implement the op.
    """
    return backend_named(_choose(tensor, backend, supported))


def _choose(tensor: torch.Tensor, backend: str | None, supported) -> str:
    if backend is not None:
        if backend not in supported:
            raise ValueError(
                f"backend must be one of {', '.join(supported)} for this op, got {backend!r} "
                f"({_backends_here(supported)})"
            )
        _check_forced(backend, tensor, "backend", supported)
        return backend
    forced = os.environ.get("DLER_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"DLER_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r} ({_backends_here(BACKENDS)})"
            )
        if forced in supported:
            _check_forced(forced, tensor, "DLER_BACKEND", supported)
            return forced
    if tensor.is_cuda:
        if HAS_TRITON and "triton" in supported:
            return "triton"
        if "cuda" in supported and _ext.has_cuda():
            return "cuda"
        return "reference"
    if HAS_TRITON and triton_interpret() and "triton" in supported and tensor.device.type == "cpu":
        return "triton"
    if tensor.device.type == "cpu" and "cpu" in supported:
        if _ext.has_cpu():
            return "cpu"
        _ext.warn_fallback("cpu")
    return "reference"


def usable_backends(device_type: str = "cpu") -> list[str]:
    """The backends that can run ops on tensors of this device type here (tests iterate over these)."""
    out = []
    if HAS_TRITON and (device_type == "cuda" or triton_interpret()):
        out.append("triton")
    if device_type == "cpu" and _ext.has_cpu() or device_type == "cuda" and _ext.has_cuda():
        out.append(device_type)
    return out + ["reference"]


def available_backends() -> dict[str, str]:
    """Each backend and whether (and why not) it is usable here."""
    triton_state = f"yes (triton {TRITON_VERSION})" if HAS_TRITON else "no (triton not installed)"
    if HAS_TRITON and not torch.cuda.is_available():
        triton_state += (
            ", CUDA tensors only: no CUDA device here"
            if not triton_interpret()
            else ", CPU tensors through the interpreter (TRITON_INTERPRET=1)"
        )
    cpu_state, cuda_state = _ext.status()
    return {"reference": "yes (plain torch, any device)", "triton": triton_state, "cpu": cpu_state, "cuda": cuda_state}
