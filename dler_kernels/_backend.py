"""Which implementation runs a given call.

CUDA tensors go to the Triton kernels; CPU tensors go to the plain-torch
reference, except under ``TRITON_INTERPRET=1``, where the Triton kernels run on
the CPU through Triton's interpreter (how CI tests them). Without triton
installed everything falls back to the reference.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU-only installs and machines without it use the reference
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION: str | None = triton.__version__
except ImportError:
    HAS_TRITON = False
    TRITON_VERSION = None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


BACKENDS = ("reference", "triton")


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is ``tensor``.

    ``DLER_BACKEND=reference|triton`` forces one (triton on a CPU tensor needs TRITON_INTERPRET=1).
    """
    forced = os.environ.get("DLER_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DLER_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if forced == "triton" and not HAS_TRITON:
            raise ValueError("DLER_BACKEND=triton but triton is not installed")
        if forced == "triton" and not tensor.is_cuda and not triton_interpret():
            raise ValueError("DLER_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1")
        return forced
    if HAS_TRITON and (tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpret())):
        return "triton"
    return "reference"


def available_backends() -> dict[str, str]:
    """Each backend and whether (and why not) it is usable here."""
    triton_state = f"yes (triton {TRITON_VERSION})" if HAS_TRITON else "no (triton not installed)"
    if HAS_TRITON and not torch.cuda.is_available():
        triton_state += (
            ", CUDA tensors only: no CUDA device here"
            if not triton_interpret()
            else ", CPU tensors through the interpreter (TRITON_INTERPRET=1)"
        )
    return {"reference": "yes (plain torch, any device)", "triton": triton_state}
