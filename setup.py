"""Builds the optional C++/CUDA extension ``dler_kernels._C`` from ``csrc/``.

All metadata lives in pyproject.toml. While ``csrc/`` holds no sources the
package installs as pure Python; once it does, the CPU part builds whenever a
C++ compiler is present and the CUDA part when torch has CUDA and nvcc exists
(``DLER_BUILD_CUDA=0|1`` forces either way). Build with
``pip install --no-build-isolation .`` so the extension links against the
torch that is installed, not a fresh copy in an isolated build environment.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _extensions():
    cpu_sources = _sources("cpu/*.cpp") + _sources("*.cpp")
    cuda_sources = _sources("cuda/*.cu") + _sources("cuda/*.cpp")
    if not cpu_sources and not cuda_sources:
        return [], {}
    if os.environ.get("DLER_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = os.environ.get("DLER_BUILD_CUDA")
    build_cuda = bool(cuda_sources) and (
        want_cuda == "1" or (want_cuda is None and torch.version.cuda is not None and CUDA_HOME is not None)
    )
    cxx_flags = ["-O3", "-std=c++17"]
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension(
            "dler_kernels._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DDLER_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        ext = CppExtension("dler_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
