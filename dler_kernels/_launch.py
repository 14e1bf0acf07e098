"""How every Triton kernel of the package is launched: one ``KernelLaunch`` per launch.

Each launch wrapper (``triton_policy_loss``, ``triton_advantages``) builds its launch in one function
that takes the device the launch is *for* as a parameter: the grid, the constexprs, ``num_warps`` and
the argument list (hence the signature Triton specialises on). ``KernelLaunch.run`` launches it, and
the ahead-of-time check (``dler_kernels.aot_check``) compiles exactly the same launches for GPUs on a
machine without one: inside ``recording(torch.device("cuda"))`` the wrappers run on meta tensors,
configure every launch for CUDA and hand it to the recording instead of running it.

Only torch is imported here (no triton), so this module loads everywhere.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

# Set while recording (see ``recording``): (the device every launch is configured for, the launches).
_RECORDING: ContextVar[tuple[torch.device, list] | None] = ContextVar("dler_recording", default=None)


def device_guard(device: torch.device):
    """The context a launch on ``device`` runs in: Triton launches on the *current* CUDA device and its
    current stream, so a CUDA launch must make the tensors' device current (tensors on cuda:1 while
    cuda:0 is current would otherwise be read by a kernel running on cuda:0). Other devices (the
    CPU under TRITON_INTERPRET): no context."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch_device(tensor: torch.Tensor) -> torch.device:
    """The device a launch on ``tensor`` is configured for: the tensor's own, or the recording's."""
    rec = _RECORDING.get()
    return rec[0] if rec is not None else tensor.device


def rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row of ``t`` starts 16-byte aligned (its data pointer and its row stride in bytes are
    multiples of 16), so that a compiled kernel can move 128 bits at a time along the rows."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def is_compiled(device: torch.device) -> bool:
    """Whether launches on ``device`` run compiled GPU code (CUDA) rather than Triton's interpreter:
    block sizes differ (registers on a GPU, Python loop iterations in the interpreter)."""
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs, num_warps=...)``
    on ``device`` (``name``: a short label of the variant for reports)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    device: torch.device
    name: str = field(default="")

    def run(self) -> None:
        rec = _RECORDING.get()
        if rec is not None:
            rec[1].append(self)
            return
        with device_guard(self.device):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


@contextlib.contextmanager
def recording(device: torch.device):
    """Inside: launches are configured for ``device`` and recorded instead of run (the wrappers can
    then be called on meta tensors: no data is touched). Yields the list of ``KernelLaunch``."""
    launches: list[KernelLaunch] = []
    token = _RECORDING.set((torch.device(device), launches))
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def compiled_variants(kernel) -> int:
    """How many compiled variants (specialisations) a ``@triton.jit`` kernel holds, on every device.

    Triton 3.x (checked 3.6 and 3.9): ``kernel.device_caches`` maps a device to the 5-tuple
    ``(kernel_cache, kernel_key_cache, target, backend, binder)``; the compiled kernels are the values
    of ``kernel_cache`` (key: specialisation + options). Older Triton: ``kernel.cache`` maps a device
    to that dict.
    """
    if hasattr(kernel, "device_caches"):
        total = 0
        for entry in kernel.device_caches.values():
            if not (isinstance(entry, tuple) and entry and isinstance(entry[0], dict)):
                raise TypeError(f"unknown JITFunction.device_caches entry {type(entry).__name__}; update this helper")
            total += len(entry[0])
        return total
    if hasattr(kernel, "cache"):
        return sum(len(per_device) for per_device in kernel.cache.values())
    raise TypeError(f"{kernel!r} has no cache of compiled variants (not a compiled @triton.jit kernel?)")
