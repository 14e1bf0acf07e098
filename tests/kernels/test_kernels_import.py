import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dler_kernels
from dler_kernels.backend import AdvantagesBackend, Backend
from dler_kernels.dispatch import ADVANTAGES_BACKENDS, backend_named, select_backend, usable_backends
from dler_kernels.loss_inputs import LossOptions


def test_import_without_triton_falls_back_to_reference():
    # sys.modules["triton"] = None makes `import triton` raise ImportError, as on a machine without it.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import dler_kernels
        assert dler_kernels.HAS_TRITON is False
        x = torch.randn(5, 11, dtype=torch.float64)
        t = torch.tensor([0, 3, 10, 7, 1])
        from dler_kernels import _ext
        assert dler_kernels.backend_for(x) == ("cpu" if _ext.has_cpu() else "reference")
        lp = dler_kernels.token_logprobs(x, t)
        expected = torch.log_softmax(x, -1).gather(-1, t[:, None])[:, 0]
        assert torch.allclose(lp.double(), expected, atol=1e-6), (lp, expected)
        h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(11, 3, dtype=torch.float64)
        out = dler_kernels.linear_policy_loss(h, w, t, expected, torch.randn(5, dtype=torch.float64),
                                              torch.ones(5, dtype=torch.bool))
        out.loss.backward()
        assert h.grad is not None and torch.isfinite(h.grad).all()
        assert torch.allclose(dler_kernels.linear_token_logprobs(h.detach(), w, t).double(), out.logprobs, atol=1e-6)
        print("no-triton", dler_kernels.available_backends()["triton"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1")
    )
    assert out.returncode == 0, out.stderr
    assert "triton not installed" in out.stdout


def test_backends_report_is_honest():
    states = dler_kernels.available_backends()
    assert states["reference"].startswith("yes")
    assert states["triton"].startswith("yes") == dler_kernels.HAS_TRITON
    cpu = torch.zeros(1)
    expected = "triton" if dler_kernels.HAS_TRITON else "reference"  # conftest sets TRITON_INTERPRET=1
    assert dler_kernels.backend_for(cpu) == expected


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "dler_kernels.info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout and "triton" in out.stdout


def test_a_refused_backend_says_why_and_lists_every_backend_with_its_state_here(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as refused:
        dler_kernels.backend_for(torch.zeros(2), "cuda")
    message = str(refused.value)
    gpu = torch.cuda.is_available()  # without one, the missing device is the reason given
    why = "runs the extension's CUDA kernels" if gpu else "but this machine has no CUDA device"
    assert message.startswith("backend=cuda " + why)
    for name, state in dler_kernels.available_backends().items():
        assert f"{name}: {state}" in message


def test_every_usable_backend_is_one_object_implementing_the_interface():
    for name in usable_backends("cpu"):
        backend = backend_named(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert isinstance(backend, AdvantagesBackend) == (name in ADVANTAGES_BACKENDS)
        assert select_backend(torch.zeros(1), name) is backend


def test_loss_options_are_checked_when_made_and_frozen_after():
    with pytest.raises(ValueError, match="^eps_low must be < 1.0, got 1.5"):
        LossOptions(eps_low=1.5)
    with pytest.raises(ValueError, match="^norm_length is required for loss_agg='seq-mean-token-sum-norm'"):
        LossOptions(loss_agg="seq-mean-token-sum-norm")
    options = LossOptions(beta=0.1, kl_type="low_var_kl")
    assert options.kl_code == 3 and LossOptions().kl_code == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 0.0
