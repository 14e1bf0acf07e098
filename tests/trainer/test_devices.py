"""Device capabilities the loop asks for instead of testing the device's name; the process group's
backends. Each is checked for the CPU and for a CUDA device (the decisions need no GPU to be made)."""

import pytest
import torch

from trainer.devices import (
    can_pin_host_memory,
    cpu_model,
    has_caching_allocator,
    host,
    host_line,
    release_cached_memory,
    synchronize,
)
from trainer.dist.distributed_env import process_group_backend
from trainer.fsutil import UserError


def test_the_host_names_its_cpu_model_isa_and_torch():
    h = host()
    assert h["cpu"] == cpu_model() and h["cpu"].strip() and h["cores"] >= 1
    assert h["isa"] == torch.backends.cpu.get_cpu_capability() and h["torch"] == torch.__version__
    assert h["cpu"] in host_line() and h["torch"] in host_line()


def test_the_cpu_has_no_caching_allocator_to_release():
    cpu = torch.device("cpu")
    assert not has_caching_allocator(cpu) and release_cached_memory(cpu) is False
    synchronize(cpu)  # a no-op, but a callable one: the loop calls it on every device
    assert not can_pin_host_memory(cpu)


def test_a_cuda_device_releases_its_cached_blocks_through_its_own_module(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    cuda = torch.device("cuda", 1)
    assert has_caching_allocator(cuda) and can_pin_host_memory(cuda)
    assert release_cached_memory(cuda) is True and calls == ["empty_cache"]


def test_process_groups_carry_gloo_for_cpu_tensors_also_on_a_gpu():
    """FSDP2 cpu_offload puts shards on the CPU, and their collectives (grad norm, weight gather,
    checkpoint state dicts) need gloo next to NCCL."""
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("xpu")) == "cpu:gloo,xpu:xccl"
    with pytest.raises(UserError, match="no process group backend known for device type 'meta'"):
        process_group_backend(torch.device("meta"))
