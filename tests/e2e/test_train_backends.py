"""The trainer on the Triton kernels trains as on the C++ extension.

The other trainer tests run the extension, the kernels of a CPU user's trainer (tests/conftest.py); a GPU
user's trainer runs the Triton kernels. Here one step of the demo model runs on each, Triton through its
interpreter (TRITON_INTERPRET=1, this suite's setting): the kernel tests compare each backend with the
float64 oracle op by op, this checks that the trainer hands both the same inputs and reads their outputs alike.
"""

import math
import os

import pytest
from run_files import metrics, small_run, without_timings

from trainer.config import load_config
from trainer.train import train

# Every per-token value of either backend is within 1e-6 (relative) of the float64 oracle (the kernel tests'
# bound); a step's figures sum ~450 tokens in float32, adding at most 450 x 2^-24 ~ 3e-5 relative. Figures
# near 0 (the loss: advantages of mean 0; the engine/policy gaps of ~1e-7) get the absolute bound instead.
RTOL, ATOL = 1e-4, 1e-5


def test_one_step_on_the_triton_kernels_equals_the_step_on_the_extension(demo_model, tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    other = os.environ["DLER_BACKEND"]  # what the trainer tests run (tests/conftest.py): cpu, or reference
    runs = {}
    for backend in ("triton", other):
        monkeypatch.setenv("DLER_BACKEND", backend)
        out = tmp_path / backend
        summary = train(load_config("toy-cpu", [*small_run(demo_model, out, 1), "rollout.engine=hf"]), progress=False)
        assert summary["finished"] and summary["kernels"] == backend
        (runs[backend],) = map(without_timings, metrics(out))
    triton, ours = runs["triton"], runs[other]
    assert triton.keys() == ours.keys()
    differ = {
        k: (triton[k], ours[k])
        for k in triton
        if not (
            triton[k] == ours[k]
            or isinstance(triton[k], float)
            and math.isclose(triton[k], ours[k], rel_tol=RTOL, abs_tol=ATOL)
        )
    }
    assert not differ, differ
    assert other != "triton" and any(triton[k] != ours[k] for k in triton)  # two computations, not one twice
    assert ours["grad_norm"] > 0 and ours["entropy"] > 0  # a step that trained
