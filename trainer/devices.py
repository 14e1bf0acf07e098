"""What the compute device can do, asked of torch instead of assumed from the device's name.

The training loop calls these on every device alike, so a CPU run goes through the same sequence of
calls as a GPU run (the calls are no-ops where the device lacks the capability), and a test can stand
in for a device that has it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host() -> dict[str, object]:
    """The machine a result was measured on, for the records that keep it (summary.json, study.json). The same seed
    gives other numbers on another CPU model: torch's CPU kernels take other code paths per instruction set
    (``isa``), so the warm start of the demo, and every run from it, differ in their last bits and then more."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def host_line() -> str:
    """``host()`` in one line, for a report's header."""
    h = host()
    gpu = f", GPU {h['gpu']}" if h["gpu"] else ", no GPU"
    return f"{h['cpu']}, {h['cores']} cores ({h['isa']}){gpu}; torch {h['torch']}, Python {h['python']}"


def has_caching_allocator(device: torch.device) -> bool:
    """Whether freed memory of ``device`` stays reserved by torch until released (CUDA, XPU, ...)."""
    return hasattr(torch.get_device_module(device), "empty_cache")


def release_cached_memory(device: torch.device) -> bool:
    """Return the blocks torch's caching allocator holds but does not use to ``device``, so that another
    allocator in this process (a rollout engine waking its KV cache) can have them. False where the
    device has no caching allocator (the CPU: freed memory goes back at once)."""
    if not has_caching_allocator(device):
        return False
    torch.get_device_module(device).empty_cache()
    return True


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where nothing is queued)."""
    torch.get_device_module(device).synchronize()


def can_pin_host_memory(device: torch.device) -> bool:
    """Whether host memory can be page-locked for faster copies to ``device``: only for an
    accelerator (pinning needs its driver; on the CPU there is no copy to speed up)."""
    return torch.device(device).type != "cpu"
