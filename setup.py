"""Builds the optional C++/CUDA extension ``dler_kernels._C`` from ``csrc/``.

All metadata lives in pyproject.toml. The CPU part builds whenever a C++ compiler is present; the
CUDA part when torch has CUDA and nvcc is found (``DLER_BUILD_CUDA=0|1`` forces either way,
``DLER_BUILD_EXT=0`` skips the extension: the package then runs on Triton and plain torch).
``TORCH_CUDA_ARCH_LIST`` picks the GPUs. Unset, it follows the GPUs visible to the build (torch's own
default: their architectures, PTX for the newest); with none visible (a wheel built for a cluster)
it is ``8.0;9.0+PTX``: A100-class and Hopper machine code, and Hopper PTX that newer GPUs
JIT-compile, so no GPU from sm_80 on fails with "no kernel image". Compiler flags and the arch
decision live in ``dler_kernels/_build_flags.py``, which the tests compile with.
Build with ``--no-build-isolation`` so the extension links against the installed torch, not a
fresh copy in an isolated build environment:

    pip install --no-build-isolation -e .        # or: pip wheel --no-build-isolation .

A build with the extension is for one torch: its version carries a local tag that names it, as
flash-attention's wheels do (``0.1.0+cu130torch2.11``, ``0.1.0+cputorch2.13``), and it writes
``dler_kernels/_build_info.py`` (the torch, CUDA and arch list it was built for), which the package reads
before it loads ``_C``: under another torch it says so in one line instead of an undefined symbol.
"""

import importlib.util
import os
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _load(name: str):
    """A standard-library module of dler_kernels, by path: the package cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "dler_kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_INFO = ROOT / "dler_kernels" / "_build_info.py"


def _base_version() -> str:
    text = (ROOT / "dler_kernels" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M)[1]


def _write_build_info(torch_version: str, cuda_version: str | None, arch_list: str | None) -> None:
    text = (
        "# Written by setup.py with the extension dler_kernels._C: what it was built for (read before loading it).\n"
        f"TORCH_VERSION = {torch_version!r}\nCUDA_VERSION = {cuda_version!r}\nCUDA_ARCH_LIST = {arch_list!r}\n"
    )
    if not BUILD_INFO.is_file() or BUILD_INFO.read_text(encoding="utf-8") != text:
        BUILD_INFO.write_text(text, encoding="utf-8")


def _extensions():
    """(ext_modules, cmdclass, the version's local tag or None)."""
    cpu_sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu")
    if not cpu_sources or os.environ.get("DLER_BUILD_EXT", "1") == "0":
        return [], {}, None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = os.environ.get("DLER_BUILD_CUDA")
    if want_cuda not in (None, "", "0", "1"):
        raise SystemExit(f"DLER_BUILD_CUDA must be 0 or 1, got {want_cuda!r}")
    if want_cuda == "1" and (torch.version.cuda is None or CUDA_HOME is None):
        raise SystemExit(
            f"DLER_BUILD_CUDA=1 needs a CUDA build of torch (this one: {torch.__version__}) and nvcc "
            f"(CUDA_HOME: {CUDA_HOME})"
        )
    build_cuda = bool(cuda_sources) and (
        want_cuda == "1" or (not want_cuda and torch.version.cuda is not None and CUDA_HOME is not None)
    )
    want_debug = os.environ.get("DLER_BUILD_DEBUG", "0")
    if want_debug not in ("0", "1"):
        raise SystemExit(f"DLER_BUILD_DEBUG must be 0 or 1, got {want_debug!r}")
    debug_info = want_debug == "1"
    flags = _load("_build_flags")
    sources_hash = _load("_sources_hash").sources_hash(CSRC)
    if build_cuda:
        # torch reads TORCH_CUDA_ARCH_LIST when it compiles; None leaves it unset: torch follows the visible GPUs.
        arch_list = flags.cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.cuda.device_count() > 0)
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        print(f"dler_kernels._C: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list or '<the visible GPUs>'}")
        ext = CUDAExtension(
            "dler_kernels._C",
            cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": flags.cxx_flags(torch.__version__, sources_hash, with_cuda=True, debug_info=debug_info),
                "nvcc": flags.nvcc_flags(torch.__version__, sources_hash),
            },
        )
    else:
        cxx_flags = flags.cxx_flags(torch.__version__, sources_hash, with_cuda=False, debug_info=debug_info)
        ext = CppExtension("dler_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    cuda_version = torch.version.cuda if build_cuda else None
    _write_build_info(torch.__version__, cuda_version, os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None)
    tag = flags.local_tag(torch.__version__, cuda_version)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, tag


ext_modules, cmdclass, tag = _extensions()
setup(version=_base_version() + (f"+{tag}" if tag else ""), ext_modules=ext_modules, cmdclass=cmdclass)
