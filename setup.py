"""Builds the optional C++/CUDA extension ``dler_kernels._C`` from ``csrc/``.

All metadata lives in pyproject.toml. The CPU part builds whenever a C++ compiler is present; the
CUDA part when torch has CUDA and nvcc is found (``DLER_BUILD_CUDA=0|1`` forces either way,
``DLER_BUILD_EXT=0`` skips the extension: the package then runs on Triton and plain torch).
``TORCH_CUDA_ARCH_LIST`` defaults to Hopper (``9.0``); set it for other GPUs, e.g. ``"8.0;9.0"``.
Build with ``--no-build-isolation`` so the extension links against the installed torch, not a
fresh copy in an isolated build environment:

    pip install --no-build-isolation -e .        # or: pip wheel --no-build-isolation .
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _sources_hash() -> str:
    spec = importlib.util.spec_from_file_location("_sources_hash", ROOT / "dler_kernels" / "_sources_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_hash(CSRC)


def _extensions():
    cpu_sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu")
    if not cpu_sources or os.environ.get("DLER_BUILD_EXT", "1") == "0":
        return [], {}
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
    defines = [
        f'-DDLER_TORCH_VERSION="{torch.__version__}"',
        f'-DDLER_SOURCES_HASH="{_sources_hash()}"',
    ]
    cxx_flags = ["-O3", *defines]
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension(
            "dler_kernels._C",
            cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": [*cxx_flags, "-DDLER_WITH_CUDA"],
                # No --use_fast_math: its approximate exp/log would cost the 1e-5 log-prob accuracy.
                "nvcc": ["-O3", "-DDLER_WITH_CUDA", *defines, "-lineinfo"],
            },
        )
    else:
        ext = CppExtension("dler_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
