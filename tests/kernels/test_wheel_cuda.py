"""The CUDA wheel of ``make wheel-cuda`` (README "Building wheels"), inspected and installed without a GPU.

``make wheel-cuda`` builds it against the registry's CUDA torch (2.11.0+cu130) with the CUDA 13.0 toolchain, for
TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX", into dist/cuda/ with its build log. Here:

* its name and metadata carry the local tag of that CUDA and torch; it holds the packages and the extension only
  (no sources, tests or build folders);
* cuobjdump (the registry's ``nvidia-cuda-cuobjdump`` wheel) lists sm_80, sm_90 and sm_100 machine code and
  compute_100 PTX in ``_C``; ptxas reported every kernel of every arch without a spill;
* installed into a fresh venv over that CUDA torch: ``python -m dler_kernels.info`` lists the extension and says
  the CUDA backend has no device, the CPU kernels run and match the reference, and asking for the CUDA backend is
  one clear error;
* installed beside another torch (this venv's CPU 2.13), ``import dler_kernels`` works, and the first op says in
  one line which torch the wheel was built for and how to rebuild: no undefined symbol, no crash.

Without the wheel (``make wheel-cuda`` not run) the module is skipped with that reason; under CI (``.ci/run`` runs
``make wheel-cuda`` first) a missing wheel is a failure.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from test_wheel import clean_env, torch_site

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench.gpu_check (bench: a namespace package)
from bench.gpu_check.wheel import ptxas_problems, ptxas_report  # noqa: E402

WHEEL_DIR = ROOT / "dist" / "cuda"  # the Makefile's WHEEL_CUDA_DIR
CACHE = Path(os.environ.get("DLER_CACHE", Path.home() / ".cache" / "dler"))
WHEEL_TORCH = "2.11.0"  # the Makefile's WHEEL_TORCH: the registry's build of it is CUDA 13.0
CUDA_TORCH_VENV = CACHE / f"venv-torch-{WHEEL_TORCH}"
TAG = "cu130torch2.11"
ARCHS = ("sm_80", "sm_90", "sm_100")
PTX_ARCH = "sm_100"  # cuobjdump names the compute_100 PTX after the arch it was generated for
CUOBJDUMP = "nvidia-cuda-cuobjdump==13.2.51"  # the oldest 13.x on the registry (13.0 has none); reads 13.0 cubins
# The extension's size bound: 3.7 MB measured (2026-12-08) for three archs and PTX (10.6 MB with the host compiler's
# debug information, before -g0); far more means an arch or a debug build slipped in.
MAX_EXTENSION_MB = 8


def _missing(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI runs `make wheel-cuda` before `make test`)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def wheel() -> Path:
    wheels = sorted(WHEEL_DIR.glob("dler-*.whl"))
    if not wheels:
        _missing(f"no CUDA wheel in {WHEEL_DIR}: `make wheel-cuda` builds it")
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def extension(wheel, tmp_path_factory) -> Path:
    (name,) = [n for n in zipfile.ZipFile(wheel).namelist() if re.fullmatch(r"dler_kernels/_C\..*\.so", n)]
    dest = tmp_path_factory.mktemp("wheel")
    zipfile.ZipFile(wheel).extract(name, dest)
    return dest / name


@pytest.fixture(scope="module")
def cuobjdump() -> Path:
    """cuobjdump from the registry's wheel, installed once into the cache (864 KB) beside the toolchain."""
    home = CACHE / f"cuobjdump-{CUOBJDUMP.split('==')[1]}"
    tool = home / "nvidia" / "cu13" / "bin" / "cuobjdump"
    if not tool.is_file():
        tmp = home.with_name(home.name + f".tmp-{os.getpid()}")
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, CUOBJDUMP],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _missing(f"cannot install {CUOBJDUMP}: {out.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(home, ignore_errors=True)
        os.replace(tmp, home)  # whole or absent: a killed install leaves only the .tmp folder
    return tool


def test_the_wheel_is_tagged_for_its_cuda_and_torch_and_holds_no_sources(wheel, extension, capsys):
    assert wheel.name.startswith(f"dler-0.1.0+{TAG}-cp311-cp311-linux_x86_64"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(f"dler-0.1.0+{TAG}.dist-info/METADATA").decode()
    assert f"\nVersion: 0.1.0+{TAG}\n" in metadata
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dler_kernels", "trainer", f"dler-0.1.0+{TAG}.dist-info"}, tops
    assert not [n for n in names if n.endswith((".cu", ".cuh", ".cpp", ".h", ".o", ".ninja_log"))]
    info = zipfile.ZipFile(wheel).read("dler_kernels/_build_info.py").decode()
    assert f"TORCH_VERSION = '{WHEEL_TORCH}+cu130'" in info and "CUDA_VERSION = '13.0'" in info
    assert "CUDA_ARCH_LIST = '8.0;9.0;10.0+PTX'" in info
    size_mb, ext_mb = wheel.stat().st_size / 2**20, extension.stat().st_size / 2**20
    assert ext_mb < MAX_EXTENSION_MB, ext_mb
    build = json.loads((WHEEL_DIR / "build.json").read_text())
    with capsys.disabled():  # the sizes and build time belong in the CI log
        print(f"\n{wheel.name}: {size_mb:.1f} MB ({extension.name}: {ext_mb:.1f} MB); built in {build['seconds']} s")


def test_the_extension_holds_machine_code_for_ampere_hopper_blackwell_and_blackwell_ptx(extension, cuobjdump):
    elf = subprocess.run([cuobjdump, "--list-elf", extension], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", extension], capture_output=True, text=True, check=True).stdout
    assert sorted(set(re.findall(r"\.(sm_\d+)\.cubin", elf))) == sorted(ARCHS), elf
    assert re.findall(r"\.(sm_\d+)\.ptx", ptx) == [PTX_ARCH], ptx


def test_ptxas_reported_no_spill_in_any_kernel_for_any_arch():
    log = WHEEL_DIR / "build.log"
    if not log.is_file():
        _missing(f"no {log}: `make wheel-cuda` writes it")
    # the GPU check's reading of the same log (bench/gpu_check/wheel.py): a spill, an arch without a report, or archs
    # with different kernel counts is a problem
    reports = ptxas_report(log.read_text(errors="replace"))
    assert ptxas_problems(reports, list(ARCHS)) == [] and sorted(reports) == sorted(ARCHS), reports
    assert all(r["kernels"] > 0 for r in reports.values()), reports


def _purelib(python: Path) -> Path:
    return Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip


def _fresh_venv(tmp_path: Path, name: str, site: Path, wheel: Path) -> Path:
    """A venv with ``site`` on its path (a .pth line) and the wheel installed from the file alone."""
    venv = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    (_purelib(python) / "torch-site.pth").write_text(f"{site}\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return python


ON_CUDA_TORCH = """
    import torch
    from dler_kernels import _ext, policy_loss
    assert torch.version.cuda == "13.0" and not torch.cuda.is_available(), (torch.__version__, torch.version.cuda)
    C = _ext.load()
    assert C is not None and C.WITH_CUDA, _ext.why_not()
    x = torch.randn(13, 301, generator=torch.Generator().manual_seed(0)) * 3
    t, old, adv = torch.randint(0, 301, (13,)), torch.randn(13) - 5, torch.randn(13)
    mask = torch.rand(13) > 0.2
    cpu = policy_loss(x, t, old, adv, mask, backend="cpu")
    ref = policy_loss(x, t, old, adv, mask, backend="reference")
    torch.testing.assert_close(cpu.loss, ref.loss, rtol=1e-5, atol=1e-6)
    try:
        policy_loss(x, t, old, adv, mask, backend="cuda")
    except ValueError as e:
        print("CUDA_ERROR=" + str(e))
"""


@pytest.mark.slow
def test_installed_over_the_cuda_torch_the_cpu_kernels_run_and_cuda_is_one_clear_error(wheel, tmp_path):
    stamp = CUDA_TORCH_VENV / ".dler-installed"
    if not stamp.is_file():
        _missing(f"no CUDA torch in {CUDA_TORCH_VENV}: `make cuda-torch` (part of `make wheel-cuda`) installs it")
    python = _fresh_venv(tmp_path, "venv", _purelib(CUDA_TORCH_VENV / "bin" / "python"), wheel)
    elsewhere = tmp_path / "elsewhere"  # not the repository: the installed copy is what imports
    elsewhere.mkdir()
    info = subprocess.run([python, "-m", "dler_kernels.info"], cwd=elsewhere, capture_output=True, text=True,
                          env=clean_env())  # fmt: skip
    assert info.returncode == 0, info.stderr
    lines = {line.split()[0]: line for line in info.stdout.splitlines() if line.startswith("  ")}
    assert f"| torch {WHEEL_TORCH}+cu130 |" in info.stdout and "CUDA device: none" in info.stdout, info.stdout
    assert "yes (dler_kernels._C" in lines["cpu"], info.stdout
    assert "built, CUDA tensors only: no CUDA device here" in lines["cuda"], info.stdout
    check = subprocess.run([python, "-c", textwrap.dedent(ON_CUDA_TORCH)], cwd=elsewhere, capture_output=True,
                           text=True, env=clean_env())  # fmt: skip
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    (error,) = [line[len("CUDA_ERROR=") :] for line in check.stdout.splitlines() if line.startswith("CUDA_ERROR=")]
    assert error.startswith("backend=cuda but this machine has no CUDA device"), error


BESIDE_ANOTHER_TORCH = """
    import warnings
    import torch
    import dler_kernels
    from dler_kernels import policy_loss
    x = torch.randn(5, 11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy_loss(x, torch.randint(0, 11, (5,)), torch.zeros(5), torch.ones(5), torch.ones(5, dtype=torch.bool))
    print("WARNINGS=" + repr([str(w.message) for w in caught]))
"""


@pytest.mark.slow
def test_beside_another_torch_the_import_works_and_says_in_one_line_which_torch_it_was_built_for(wheel, tmp_path):
    import torch

    python = _fresh_venv(tmp_path, "other", torch_site(tmp_path / "torch-site"), wheel)
    out = subprocess.run([python, "-c", textwrap.dedent(BESIDE_ANOTHER_TORCH)], cwd=tmp_path, capture_output=True,
                         text=True, env=clean_env())  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "undefined symbol" not in out.stdout + out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("WARNINGS=")]
    (message,) = ast.literal_eval(line[len("WARNINGS=") :])
    assert "\n" not in message
    assert f"built for torch {WHEEL_TORCH}+cu130, not this torch {torch.__version__}: not loaded" in message
    assert "install the dler wheel built for this torch, or build one against it" in message
