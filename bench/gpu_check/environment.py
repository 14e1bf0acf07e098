"""Stage 1, environment: versions, the device, and the two ceilings every later ratio is against (a device copy's
bandwidth and a matmul rate, measured in this run); first, the carried wheels (``--wheels``) into OUT/wheels-site.

The measuring code is the benchmark scripts' own (bench_linear_policy_loss, bench_train_step), imported by their
bare names: the parent puts ROOT/bench on every stage's PYTHONPATH.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .context import StageContext
from .runner import run_command, tail

OPTIONAL_PACKAGES = ("liger_kernel", "math_verify", "vllm", "flash_attn")


def driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (nvidia-smi not found)"
    out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        return "not found (CUDA_HOME unset and no nvcc on PATH)"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{nvcc}: exit {out.returncode}"


# What the environment stage keeps for itself after installing the carried wheels: two short do_bench timings
# (the copy, the 8192^3 matmul), their tensors' allocation and the stage's JSON, with a wide margin.
ENVIRONMENT_MEASURE_S = 8.0


def install_wheels(ctx: StageContext) -> None:
    """Carried pure-Python wheels (liger-kernel, math-verify) into OUT/wheels-site, never into the
    machine's environment; the CLI (__main__) puts that folder on every later stage's PYTHONPATH."""
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []
    if not wheels:
        ctx.part("carried wheels", "failed", f"--wheels {ctx.wheels}: no *.whl there")
        return
    target = ctx.out / "wheels-site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(target)]
    # Within the stage's budget, leaving the measurements after it their time (a stuck pip is killed first).
    timeout = max(ctx.remaining() - ENVIRONMENT_MEASURE_S, 1.0)
    done = run_command(cmd + [str(w) for w in wheels], timeout)
    if done.returncode == 0:
        importlib.invalidate_caches()  # the folder was empty when this process started
        ctx.part("carried wheels", "passed", wheels=[w.name for w in wheels], seconds=round(done.seconds, 1))
    elif done.returncode is None:
        ctx.part("carried wheels", "failed", f"pip install --no-index --no-deps timed out after {timeout:.0f} s "
                 "(the environment stage's budget less its measurements)", error=tail(done.output))  # fmt: skip
    else:
        ctx.part("carried wheels", "failed", "pip install --no-index --no-deps failed", error=tail(done.output))


def environment(ctx: StageContext) -> None:
    """Versions, the device, and the two ceilings every later ratio is against: a device-to-device copy
    and a matmul rate (bf16 8192^3 on a GPU; --smoke or the CPU: small sizes, fp32 on the CPU)."""
    import bench_linear_policy_loss as linear_bench
    import bench_train_step
    import torch

    if ctx.wheels is not None:
        install_wheels(ctx)
    figures = ctx.record["figures"]
    figures.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        cuda=torch.version.cuda or "none (CPU build of torch)",
        triton=_version("triton"),
        transformers=_version("transformers"),
        optional_packages={name: importlib.util.find_spec(name) is not None for name in OPTIONAL_PACKAGES},
    )
    from dler_kernels import available_backends

    figures["dler_backends"] = available_backends()
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=driver_version(),
                       nvcc=nvcc_version())  # fmt: skip
    else:
        figures.update(gpu="none (no CUDA device)", driver="none", nvcc=_nvcc_or_none())
    ctx.save()

    # Copy bandwidth: bytes read + bytes written per second, as the kernel benchmarks count theirs.
    if cuda:
        src = torch.randn(2**23 if ctx.smoke else 2**29, device="cuda", dtype=torch.bfloat16)  # 16 MiB / 1 GiB
    else:
        src = torch.randn(2**22 if ctx.smoke else 2**26)  # fp32: 16 MiB / 256 MiB
    figures["copy"] = copy_rate(src)
    del src
    moved = figures["copy"]["bytes_moved"]
    ctx.save()

    if cuda:
        n = 2048 if ctx.smoke else 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        ms = linear_bench.time_cuda(lambda: torch.mm(a, b, out=c))
        figures["matmul"] = dict(n=n, dtype="bfloat16", ms=ms, tflops=2 * n**3 / ms / 1e9, device="cuda")
    else:
        n = 512 if ctx.smoke else 2048
        tflops = bench_train_step.cpu_matmul_tflops(n)
        figures["matmul"] = dict(n=n, dtype="float32", ms=2 * n**3 / tflops / 1e9, tflops=tflops, device="cpu")
    ctx.record["tables"] = [dict(
        title="Ceilings measured in this run",
        columns=["measure", "size", "ms (median; CPU matmul: best of 5)", "rate"],
        rows=[["copy (read + write)", f"{moved / 2**20:.0f} MiB moved", f"{figures['copy']['ms']:.3f}",
               f"{figures['copy']['gbps']:.1f} GB/s"],
              [f"{figures['matmul']['dtype']} matmul", f"{n}^3", f"{figures['matmul']['ms']:.3f}",
               f"{figures['matmul']['tflops']:.2f} TFLOP/s"]],
    )]  # fmt: skip
    if any(p["status"] == "failed" for p in ctx.record.get("parts", [])):
        ctx.record.update(status="failed", reason="the carried wheels did not install")
    else:
        ctx.record.update(status="passed", reason="")
    ctx.save()


def copy_rate(src) -> dict:
    import bench_linear_policy_loss as linear_bench
    import torch

    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = linear_bench.time_cuda(copy) if src.is_cuda else linear_bench.time_cpu(copy, 5)
    moved = 2 * src.numel() * src.element_size()
    return dict(bytes_moved=moved, ms=ms, gbps=moved / ms / 1e6, device=src.device.type,
                dtype=str(src.dtype).removeprefix("torch."))  # fmt: skip


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _nvcc_or_none() -> str:
    try:
        return nvcc_version()
    except Exception as e:  # a CPU build of torch may not even look for a toolkit
        return f"unknown ({type(e).__name__})"
