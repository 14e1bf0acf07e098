"""Every Triton kernel compiled for real GPUs (sm_80, sm_90, sm_100) without a GPU: ``dler_kernels.aot_check``
on the pinned Triton and on the oldest one the package supports (``dispatch.TRITON_OLDEST``, installed by
``make triton-oldest``, part of ``make test``, into ``~/.cache/dler/triton-<version>``; elsewhere
``DLER_TRITON_OLDEST_DIR``), plus the rules it applies, shown on real
compiles of tiny kernels.

The check runs in a subprocess: this suite sets TRITON_INTERPRET=1, under which ``triton.jit`` makes
interpreted functions, and the oldest Triton must come first on the path.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from dler_kernels import aot_check  # noqa: E402
from dler_kernels.dispatch import TRITON_OLDEST, triton_supported  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OLDEST_DIR = Path(os.environ.get("DLER_TRITON_OLDEST_DIR", Path.home() / ".cache" / "dler" / f"triton-{TRITON_OLDEST}"))


def _env(tmp_path, triton_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*([str(triton_dir)] if triton_dir else []), str(ROOT)])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # empty: every variant is really compiled
    return env


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def aot_checks(tmp_path_factory):
    """The check on the pinned and on the oldest Triton, started together, each waited for by the test that reads
    it. On this 2-core machine the pair took 43.6 s together against 27.5 + 24.2 s one after the other: the
    compiles use more than one core each, so they overlap only in part."""
    oldest = (OLDEST_DIR / ".dler-installed").is_file()
    started = {}
    for name, triton_dir in (("pinned", None), *([("oldest", OLDEST_DIR)] if oldest else [])):
        env = _env(tmp_path_factory.mktemp(f"aot-{name}"), triton_dir)
        started[name] = subprocess.Popen(
            [sys.executable, "-W", "ignore", "-m", "dler_kernels.aot_check"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    yield {name: _Finished(proc) for name, proc in started.items()}
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class _Finished:
    """A started check, waited for (up to 600 s) on first use, as a CompletedProcess-like result."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self._out = proc, None

    def result(self):
        if self._out is None:
            stdout, stderr = self.proc.communicate(timeout=600)
            self._out = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)
        return self._out


def _check_passes(proc, version):
    print(proc.stdout)  # the table (pytest -s, or the report of a failure)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"triton {version}:") and summary.endswith("0 failed"), summary
    for kernel in ("_policy_loss_kernel", "_slab_grad_kernel", "_advantages_kernel"):
        for arch in (80, 90, 100):
            assert any(line.startswith(kernel) and f" sm_{arch} " in line for line in proc.stdout.splitlines()), (
                kernel,
                arch,
            )


def test_every_kernel_compiles_for_sm80_sm90_sm100_on_the_pinned_triton(aot_checks):
    _check_passes(aot_checks["pinned"].result(), triton.__version__)


def test_every_kernel_compiles_for_sm80_sm90_sm100_on_the_oldest_supported_triton(aot_checks, tmp_path):
    if "oldest" not in aot_checks:
        reason = f"triton {TRITON_OLDEST} is not installed in {OLDEST_DIR} (make triton-oldest)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + ": CI must run the check on the oldest supported Triton")
        pytest.skip(reason)
    proc = _run(["-c", "import triton; print(triton.__version__, triton.__file__)"], _env(tmp_path, OLDEST_DIR))
    version, path = proc.stdout.split()
    assert version == TRITON_OLDEST and path.startswith(str(OLDEST_DIR)), proc.stdout + proc.stderr
    _check_passes(aot_checks["oldest"].result(), TRITON_OLDEST)


# The program_id rule on real sm_90 compiles of a row copy with a 32-bit and a 64-bit row offset, in a
# subprocess without TRITON_INTERPRET: in this process triton.jit interprets, and the interpreter patches
# triton.language's operators while it runs kernels (a compile here fails once other tests have run).
ROW_COPY = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    @triton.jit
    def row_copy_32_bit(src, dst, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        tl.store(dst + row * stride + offs, tl.load(src + row * stride + offs))


    @triton.jit
    def row_copy_64_bit(src, dst, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        tl.store(dst + row * stride + offs, tl.load(src + row * stride + offs))
    """
)
COMPILE_ROW_COPY = textwrap.dedent(
    """
    import dataclasses, json, sys

    import torch

    import row_copy
    from dler_kernels import aot_check
    from dler_kernels._launch import KernelLaunch

    name, stride = sys.argv[1], int(sys.argv[2])
    x = torch.empty(16384, stride, dtype=torch.bfloat16, device="meta")
    launch = KernelLaunch(getattr(row_copy, name), (16384,), (x, x, stride), dict(BLOCK=1024), 4,
                          torch.device("cuda"), "rows")
    with aot_check.compiling_for(90):
        facts = aot_check.ptx_facts(aot_check.warm_up(launch).asm["ptx"])
    print(json.dumps(dataclasses.asdict(facts)))
    """
)


def _compile_row_copy(tmp_path, name, stride) -> aot_check.PtxFacts:
    (tmp_path / "row_copy.py").write_text(ROW_COPY)
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = _run(["-W", "ignore", "-c", COMPILE_ROW_COPY, name, str(stride)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return aot_check.PtxFacts(**json.loads(proc.stdout.strip().splitlines()[-1]))


def test_a_32_bit_program_id_times_stride_is_flagged_on_a_real_compile(tmp_path):
    facts = _compile_row_copy(tmp_path, "row_copy_32_bit", 151936)
    assert facts.uses_program_id
    assert facts.narrow_products and facts.narrow_products[0].startswith("mul.lo.s32"), facts


def test_a_64_bit_row_offset_passes_and_aligned_rows_load_128_bits(tmp_path):
    facts = _compile_row_copy(tmp_path, "row_copy_64_bit", 151936)
    assert not facts.narrow_products, facts.narrow_products
    assert facts.row_offset_ops and facts.row_offset_ops[0].split()[0] in ("mul.wide.s32", "mul.lo.s64"), facts
    assert (facts.widest_load, facts.widest_store) == (128, 128)
    # 4006 bf16 columns per row (8012 bytes, not a multiple of 16): rows unaligned, no vector access.
    unaligned = _compile_row_copy(tmp_path, "row_copy_64_bit", 4006)
    assert unaligned.widest_load < 128 and unaligned.widest_store < 128


def test_ptxas_log_parsing_reads_registers_and_spills():
    log = (
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers\n"
    )
    assert aot_check.ptxas_facts(log) == (64, 12, 8)
    with pytest.raises(RuntimeError, match="no register/spill report"):
        aot_check.ptxas_facts("ptxas info : nothing")


def test_triton_versions_outside_the_checked_range_are_unsupported():
    assert triton_supported(TRITON_OLDEST) and triton_supported("3.9.0") and triton_supported("3.9.2+git1234")
    assert triton_supported(triton.__version__)  # the pinned one
    assert not triton_supported("3.5.1") and not triton_supported("3.10.0") and not triton_supported("4.0.0")
