"""How setup.py compiles ``dler_kernels._C``: the compiler flags and the CUDA architectures.

One place for both, so that what is tested is what is built: setup.py loads this file by path (the
package itself cannot be imported before it is built; standard library only), and
tests/kernels/test_extension.py compiles ``csrc/cuda`` with nvcc through setup.py itself and checks the
arch decision here with the GPU's presence as a parameter.
"""

from __future__ import annotations

# The CUDA architectures of a build that sees no GPU (a wheel for a cluster, CI):
#   8.0  SASS for A100; by binary compatibility within a major version it also runs on sm_86/sm_89
#        (A10, L4, L40, RTX 30xx/40xx).
#   9.0  SASS for H100/H200, the GPUs the kernels are tuned for.
#   +PTX compute_90 PTX, which the driver JIT-compiles (once, then cached) on any newer GPU:
#        Blackwell (sm_100, sm_120) and later get a working kernel instead of "no kernel image".
# Turing (7.5, the oldest architecture CUDA 13 targets) is left out: name it in TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_arch_list(requested: str | None, gpu_visible: bool) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` to build with; None leaves it to torch.

    ``requested`` (the user's ``TORCH_CUDA_ARCH_LIST``) always wins. Unset (or empty, which torch
    also reads as unset) with a GPU visible: None, torch's own default, which compiles for the
    visible GPUs' architectures with PTX on the newest (a local build runs on its own machine and
    newer GPUs). Unset with no GPU visible: ``DEFAULT_CUDA_ARCH_LIST``, where torch alone would
    fail (it has no GPU to follow).
    """
    if requested:
        return requested
    return None if gpu_visible else DEFAULT_CUDA_ARCH_LIST


def local_tag(torch_version: str, cuda_version: str | None) -> str:
    """The local version tag of a build of the extension: the CUDA (major and minor, as torch's wheels name it, or
    ``cpu``) and the torch (major.minor) it is for, as flash-attention's wheels carry them: ``cu130torch2.11``,
    ``cputorch2.13``."""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    device = "cu" + cuda_version.replace(".", "") if cuda_version else "cpu"
    return f"{device}torch{major_minor}"


def defines(torch_version: str, sources_hash: str) -> list[str]:
    """What the extension reports about its build (``_C.TORCH_VERSION``, ``_C.SOURCES_HASH``)."""
    return [f'-DDLER_TORCH_VERSION="{torch_version}"', f'-DDLER_SOURCES_HASH="{sources_hash}"']


def cxx_flags(torch_version: str, sources_hash: str, with_cuda: bool, debug_info: bool = False) -> list[str]:
    """Flags for the host compiler (C++ sources), on top of torch's own.

    ``-g0`` unless ``debug_info`` (setup.py: ``DLER_BUILD_DEBUG=1``): Python's own CFLAGS, which torch's build
    passes first, carry ``-g``, and the debug information of ATen's templates made the objects 35-230x larger
    and their compile 40-60% slower (measured, gcc 12: ops.cpp 15.2 s and 6.1 MB with it, 8.8 s and 0.17 MB
    without; cpu/dispatch.cpp 10.5 s and 1.8 MB, 6.5 s and 7.7 kB).
    """
    return [
        "-O3",
        *([] if debug_info else ["-g0"]),  # after Python's -g on the command line: the last one wins
        *defines(torch_version, sources_hash),
        *(["-DDLER_WITH_CUDA"] if with_cuda else []),
    ]


def nvcc_flags(torch_version: str, sources_hash: str) -> list[str]:
    """Flags for nvcc (``csrc/cuda/*.cu``), on top of torch's own (its ``COMMON_NVCC_FLAGS``, the
    ``-gencode`` flags of ``TORCH_CUDA_ARCH_LIST``, ``-std=c++20``)."""
    # No --use_fast_math: its approximate exp/log would cost the 1e-5 log-prob accuracy.
    # -lineinfo: source lines in profilers (Nsight Compute) at no run-time cost.
    return ["-O3", "-DDLER_WITH_CUDA", *defines(torch_version, sources_hash), "-lineinfo"]
