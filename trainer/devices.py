"""What the compute device can do, asked of torch instead of assumed from the device's name.

The training loop calls these on every device alike, so a CPU run goes through the same sequence of
calls as a GPU run (the calls are no-ops where the device lacks the capability), and a test can stand
in for a device that has it.
"""

from __future__ import annotations

import torch


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
