"""The wheel, built the way README's "Building the extension" tells users to: from a clean export of
the tree, with ``pip wheel --no-build-isolation --no-deps``, installed into a fresh venv and used from
a directory outside the repository. The CUDA recipe of that section is exercised as far as a CPU
machine can go: with a CPU build of torch it must stop at once with setup.py's reason (its nvcc flags
and arch list are compiled in test_extension.py, through setup.py itself).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.gpu_check.wheel import export_tree

ROOT = Path(__file__).resolve().parents[2]
# Environment variables that would change what is built or imported, or where from.
BUILD_KNOBS = ("DLER_BUILD_CUDA", "DLER_BUILD_EXT", "DLER_BUILD_DEBUG", "TORCH_CUDA_ARCH_LIST", "PYTHONPATH",
               "DLER_BACKEND")  # fmt: skip


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in BUILD_KNOBS}
    return {**env, "TRITON_INTERPRET": "0", **extra}


@pytest.fixture(scope="module")
def exported_tree(tmp_path_factory) -> Path:
    """The files git would ship (tracked, plus new ones not ignored), copied: no in-tree build/, .so,
    egg-info or venv can leak into the wheel."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        why = f"{ROOT} is not a git checkout (or git is missing): no clean export to build the wheel from"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    dest = tmp_path_factory.mktemp("export") / "dler"
    export_tree(ROOT, dest, use_git=True)  # make wheel-cuda's export: git's list, less SKIP_FILES / SKIP_PATHS
    assert (dest / "setup.py").is_file() and not (dest / "build").exists()
    return dest


def torch_site(dest: Path) -> Path:
    """A folder of symlinks to torch, numpy and the distributions they require (markers evaluated), and
    nothing else of this venv.

    Why not `pip install torch==2.13.0` into the fresh venv: that unpacks 761 MB in about 19 s here, and
    needs an index. And it must be this very torch: the extension refuses to load under any other
    torch version. A .pth line pointing at this folder gives the fresh venv exactly these packages: not
    dler, not the source tree, not the rest of this venv (.pth files inside the folder are not run)."""
    dest.mkdir()
    todo, seen = ["torch", "numpy"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # an optional requirement that is not installed
            continue
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            link = dest / top
            if not link.exists():
                link.symlink_to(dist.locate_file(top))
    return dest


INSTALLED_CHECK = """
    import importlib.metadata, json, sysconfig
    from pathlib import Path
    import torch
    import dler_kernels
    from dler_kernels import _ext, policy_loss

    C = _ext.load()
    assert C is not None, _ext.why_not()
    x = torch.randn(13, 301, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.randint(0, 301, (13,))
    old, adv, mask = torch.randn(13) - 5, torch.randn(13), torch.rand(13) > 0.2
    results = {}
    for backend in ("cpu", "reference"):
        xx = x.clone().requires_grad_(True)
        out = policy_loss(xx, t, old, adv, mask, entropy_coef=0.01, temperature=0.9, backend=backend)
        out.loss.backward()
        results[backend] = (out.loss.detach(), out.logprobs.detach(), xx.grad)
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("REPORT=" + json.dumps({
        "site": str(Path(sysconfig.get_paths()["platlib"]).resolve()),
        "package": str(Path(dler_kernels.__file__).resolve()),
        "extension": str(Path(C.__file__).resolve()),
        "record": [str(f) for f in importlib.metadata.distribution("dler").files],
        "default_cpu_backend": dler_kernels.backend_for(x),
        "loss": results["cpu"][0].item(),
    }))
"""


ISA_NAMESPACE = re.compile(r"\b(AVX2|AVX512)::")  # dler::AVX512 (csrc/cpu/kernels.h), at::vec::AVX512 (CPU_CAPABILITY)
VECTOR_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+\b|.*%[yz]mm)")  # VEX/EVEX: v-prefixed, ymm or zmm


def shared_code_with_vector_instructions(obj: Path) -> list[str]:
    """The functions of an instruction-set build's object file (csrc/cpu/kernels_avx*.cpp, compiled under a target
    pragma) that hold VEX or EVEX instructions and that the linker may share with the other objects: weak symbols
    (inline functions, templates) of no instruction-set namespace. The linker keeps one copy of each for every
    caller, so such a copy would run AVX code in the baseline build, and crash a CPU without AVX. (Measured: without
    csrc/cpu/shared_headers.h before the pragma, two of c10's TORCH_CHECK message builders are such functions.)"""
    symbols = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True, check=True).stdout
    weak = {parts[2] for parts in (line.split(" ", 2) for line in symbols.splitlines()) if parts[1:2] in (["W"], ["V"])}
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", obj], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    found, function = set(), None
    for line in listing.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            function = m[1]
        elif function in weak and not ISA_NAMESPACE.search(function) and VECTOR_INSTRUCTION.match(line):
            found.add(function)
    return sorted(found)


@pytest.mark.slow
def test_wheel_built_from_a_clean_export_runs_its_extension_from_a_fresh_venv(exported_tree, tmp_path, capsys):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None and os.environ.get("CI") != "true":
        pytest.skip("no C++ compiler: the wheel would have no extension to test")
    start = time.perf_counter()
    src, dist = shutil.copytree(exported_tree, tmp_path / "src", symlinks=True), tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, "."],
        cwd=src, capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    built = time.perf_counter()
    (wheel,) = dist.glob("dler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    extension = [n for n in names if n.startswith("dler_kernels/_C.") and n.endswith(".so")]
    assert len(extension) == 1, names
    assert not [n for n in names if n.startswith(("csrc/", "tests/", "build/"))]
    if shutil.which("readelf"):  # built with -g0 (dler_kernels/_build_flags.py): no DWARF sections shipped
        so = tmp_path / "_C.so"
        so.write_bytes(zipfile.ZipFile(wheel).read(extension[0]))
        sections = subprocess.run(["readelf", "-S", "-W", so], capture_output=True, text=True, check=True).stdout
        assert ".debug_info" not in sections, sections
    if shutil.which("objdump") and shutil.which("nm"):  # the instruction-set builds leak no vector code
        objects = sorted(src.glob("build/**/cpu/kernels_avx*.o"))
        assert len(objects) == 2, sorted(p.relative_to(src) for p in src.glob("build/**/*.o"))
        assert {obj.name: shared_code_with_vector_instructions(obj) for obj in objects} == {o.name: [] for o in objects}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    (site / "torch-from-the-build-venv.pth").write_text(f"{torch_site(tmp_path / 'torch-site')}\n")
    # this venv's pip installs into the fresh one (which has none: --python, no ensurepip), from the file only
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # not the repository: `import dler_kernels` cannot find the source tree
    elsewhere.mkdir()
    check = subprocess.run([python, "-c", textwrap.dedent(INSTALLED_CHECK)], cwd=elsewhere, capture_output=True,
                           text=True, env=clean_env())  # fmt: skip
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    report = json.loads(next(line[7:] for line in check.stdout.splitlines() if line.startswith("REPORT=")))
    site = Path(report["site"])
    package, ext = Path(report["package"]), Path(report["extension"])
    assert package == site / "dler_kernels" / "__init__.py", report  # the venv's copy, not the source tree
    assert ext.parent == site / "dler_kernels" and ext.name == Path(extension[0]).name, report
    assert extension[0] in report["record"], "the extension is not one of the wheel's installed files"
    assert report["default_cpu_backend"] == "cpu"

    info = subprocess.run([python, "-m", "dler_kernels.info"], cwd=elsewhere, capture_output=True, text=True,
                          env=clean_env())  # fmt: skip
    assert info.returncode == 0, info.stderr
    lines = {line.split()[0]: line for line in info.stdout.splitlines() if line.startswith("  ")}
    assert "yes (dler_kernels._C" in lines["cpu"] and "reference" in lines, info.stdout
    with capsys.disabled():  # the build time belongs in the CI log
        print(f"\nwheel {wheel.name}: built in {built - start:.0f} s, installed and checked in "
              f"{time.perf_counter() - built:.0f} s; loss {report['loss']:.6f} on cpu and reference")  # fmt: skip


def test_cuda_wheel_recipe_with_a_cpu_torch_stops_at_once_with_the_reason(exported_tree, tmp_path):
    """README's `DLER_BUILD_CUDA=1 pip wheel --no-build-isolation ...` with a CPU build of torch: setup.py
    refuses before compiling anything, and says which torch it found."""
    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} has CUDA: the recipe builds here (the gpu tests use that build)")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "dist", "."],
        cwd=exported_tree, capture_output=True, text=True, env=clean_env(DLER_BUILD_CUDA="1"),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert out.returncode != 0
    assert f"DLER_BUILD_CUDA=1 needs a CUDA build of torch (this one: {torch.__version__})" in out.stdout + out.stderr
    assert not list((tmp_path / "dist").glob("*.whl"))
    assert not (exported_tree / "build").exists()  # stopped before compiling anything
    assert seconds < 60, seconds
    print(f"\nDLER_BUILD_CUDA=1 with torch {torch.__version__}: refused in {seconds:.1f} s")
