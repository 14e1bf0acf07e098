"""Stage 2, build: the CUDA wheel built on this machine with ``make wheel-cuda``'s recipe, against the machine's own
torch, checked from a fresh venv, and its extension put into the checkout for the later stages.

Its parts, each with its own status (the stage finishes from them): the source tree exported into OUT/wheel/src
(:mod:`.wheel`); ``pip wheel`` for TORCH_CUDA_ARCH_LIST=8.0;9.0;10.0+PTX into OUT/wheel (log: OUT/logs/
build-wheel.log), with its name, local tag, size and build time; ptxas' spill report for every arch; the wheel
installed into OUT/wheel/venv (``--system-site-packages``: the image's torch) and imported from there, not from
the checkout; the CUDA backend's oracle tests run from it; its ``_C`` and ``_build_info.py`` copied into
ROOT/dler_kernels (what ``setup.py build_ext --inplace`` did), so that the later stages, which import the
checkout, run the same binary; and ``available_backends()`` in a fresh process: the CUDA backend must be usable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

from .context import StageContext, child_env, has_cuda
from .pytest_results import run_pytest
from .runner import ROOT, run_command, tail
from .wheel import (
    WHEEL_ARCH_LIST,
    expected_local_tag,
    export_tree,
    local_tag,
    ptxas_problems,
    ptxas_report,
    wheel_archs,
)

# What the build leaves of the stage's budget: the venv, the install and the import check (~10 s), the copy into
# the checkout and the probe in a fresh process (PROBE_S). The oracle tests get what the build leaves beyond that.
INSTALL_S = 15.0
PROBE_S = 15.0
MIN_TESTS_S = 10.0  # under this, the oracle tests are not started (torch's import alone takes seconds)
# The CUDA backend's tests of test_cuda_oracles.py (its backend is the first id of every test: [cuda-...]); the
# Triton and reference backends are the same Python as the checkout's, which the correctness stage tests.
WHEEL_ORACLE_TESTS = ["-m", "gpu", "tests/kernels/test_cuda_oracles.py", "-k", "not triton and not reference"]
PIP_ENV = dict(PIP_DISABLE_PIP_VERSION_CHECK=1, PIP_NO_INDEX=1)  # no index on the GPU machine: never ask one


def build(ctx: StageContext) -> None:
    """On a CUDA machine, the wheel built, installed and tested, its extension put into the checkout and loaded
    there; skipped on a CPU and in --smoke (the CI builds the extension with ``make setup``)."""
    from dler_kernels import available_backends

    if ctx.smoke:
        backends = available_backends()
        ctx.record.update(status="skipped", reason="smoke mode: the CI builds the extension (make setup)",
                          figures=dict(backends_in_use=backends))  # fmt: skip
        return ctx.save()
    if not has_cuda():
        ctx.record.update(status="skipped", reason="no CUDA device")
        return ctx.save()
    wheel = build_wheel(ctx)
    if wheel is not None:
        venv_python = install_wheel(ctx, wheel)
        if venv_python is not None:
            check_installed_wheel(ctx, venv_python)
        into_checkout(ctx, wheel)
        probe(ctx)
    ctx.finish_from_parts()
    failed = [p for p in ctx.record.get("parts", []) if p["status"] == "failed" and p.get("error")]
    if failed:
        ctx.record["error"] = failed[0]["error"]
        ctx.save()


def build_wheel(ctx: StageContext) -> Path | None:
    """The tree exported, the wheel built (``make wheel-cuda``'s command, with this machine's torch, nvcc and
    cores), its figures and ptxas' report recorded; the wheel, or None when there is none."""
    import torch

    figures = ctx.record["figures"]
    wheel_dir = ctx.out / "wheel"
    src = wheel_dir / "src"
    start = time.perf_counter()
    shutil.rmtree(wheel_dir, ignore_errors=True)  # a previous run's source, wheel and venv
    try:
        exported = export_tree(ROOT, src, exclude=ctx.out)
    except Exception as e:  # git failing, a file unreadable: the stage says so and builds nothing
        ctx.part("source export", "failed", f"{type(e).__name__}: {e}"[:300])
        return None
    ctx.part("source export", "passed", "", **exported, seconds=round(time.perf_counter() - start, 1))

    # Exactly this arch list, whatever the container's TORCH_CUDA_ARCH_LIST says: the wheel GPU users install.
    env = child_env(DLER_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST=WHEEL_ARCH_LIST, NVCC_APPEND_FLAGS="-Xptxas=-v",
                    MAX_JOBS=os.cpu_count() or 4, **PIP_ENV)  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
           str(src)]  # fmt: skip
    log = ctx.out / "logs" / "build-wheel.log"
    done = run_command(cmd, ctx.remaining() - INSTALL_S - PROBE_S, env=env, cwd=src, log=log)
    label = f"CUDA wheel (pip wheel, TORCH_CUDA_ARCH_LIST={WHEEL_ARCH_LIST})"
    figures.update(arch_list=WHEEL_ARCH_LIST, torch=torch.__version__, build_seconds=round(done.seconds, 1),
                   build_log=str(log.relative_to(ctx.out)))  # fmt: skip
    wheels = sorted(wheel_dir.glob("dler-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        why = "timed out" if done.returncode is None else f"exit {done.returncode}"
        if done.returncode == 0:
            why = f"{len(wheels)} wheels in {wheel_dir}, not 1"
        ctx.part(label, "failed", f"pip wheel: {why}", seconds=round(done.seconds, 1), error=tail(done.output))
        return None
    wheel = wheels[0]
    tag, want = local_tag(wheel.name), expected_local_tag(torch.__version__, torch.version.cuda)
    figures.update(wheel=wheel.name, wheel_tag=tag, wheel_bytes=wheel.stat().st_size,
                   wheel_mb=round(wheel.stat().st_size / 2**20, 2))  # fmt: skip
    reason = "" if tag == want else f"local tag {tag}, not {want} (this torch {torch.__version__})"
    ctx.part(label, "failed" if reason else "passed", reason, wheel=wheel.name, tag=tag,
             seconds=round(done.seconds, 1))  # fmt: skip

    reports = ptxas_report(done.output)
    problems = ptxas_problems(reports, wheel_archs())
    figures["ptxas"] = reports
    ctx.part("ptxas -v: no spill, every arch", "failed" if problems else "passed", "; ".join(problems)[:500],
             kernels={arch: r["kernels"] for arch, r in sorted(reports.items())})  # fmt: skip
    ctx.record["tables"] = [
        dict(title="The CUDA wheel (make wheel-cuda's recipe, against this machine's torch)",
             columns=["wheel", "local tag", "size MB", "build s", "TORCH_CUDA_ARCH_LIST", "torch"],
             rows=[[wheel.name, tag or "none", f"{figures['wheel_mb']:.1f}", f"{done.seconds:.0f}", WHEEL_ARCH_LIST,
                    torch.__version__]]),
        dict(title="ptxas -v (the build log)", columns=["arch", "kernels", "spilling kernels"],
             rows=[[arch, r["kernels"], len(r["spilling"])] for arch, r in sorted(reports.items())]),
    ]  # fmt: skip
    ctx.save()
    return wheel


def install_wheel(ctx: StageContext, wheel: Path) -> Path | None:
    """A fresh venv, OUT/wheel/venv, that sees the image's packages (torch, pytest) but not the checkout, with the
    wheel installed from the file alone; its python, or None."""
    venv = ctx.out / "wheel" / "venv"
    python = venv / "bin" / "python"
    start = time.perf_counter()
    created = run_command([sys.executable, "-m", "venv", "--clear", "--without-pip", "--system-site-packages",
                           str(venv)], 60)  # fmt: skip
    if created.returncode != 0:
        ctx.part("wheel installed into a fresh venv", "failed", "python -m venv failed", error=tail(created.output))
        return None
    # --system-site-packages shows the base interpreter's packages; when this check runs from a venv (the
    # repository's .venv), torch is in that venv's site-packages instead: named in a .pth, after the new venv's own.
    purelib = Path(sysconfig.get_path("purelib", scheme="venv", vars=dict(base=str(venv), platbase=str(venv))))
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (purelib / "gpu-check-parent-site.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys([*ours, *sites])))
    # --force-reinstall: the same version installed in the image (an editable dler) would make pip skip the file.
    cmd = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    done = run_command(cmd, max(ctx.remaining() - PROBE_S, 10), env=installed_env(**PIP_ENV),
                       log=ctx.out / "logs" / "install-wheel.log")  # fmt: skip
    if done.returncode != 0:
        ctx.part("wheel installed into a fresh venv", "failed", "pip install --no-deps --no-index failed",
                 error=tail(done.output))  # fmt: skip
        return None
    ctx.part("wheel installed into a fresh venv", "passed", "", venv=str(venv.relative_to(ctx.out)),
             seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    return python


def installed_env(**extra) -> dict:
    """This process's environment without the checkout: ROOT and ROOT/bench off PYTHONPATH, and the working
    directory (ROOT, where pytest finds tests/) not put first on sys.path (PYTHONSAFEPATH)."""
    drop = {str(ROOT), str(ROOT / "bench")}
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in drop]
    env = child_env(PYTHONSAFEPATH=1, TRITON_INTERPRET=0, PYTHONPATH=os.pathsep.join(paths), **extra)
    if not paths:
        env.pop("PYTHONPATH")
    return env


def check_installed_wheel(ctx: StageContext, python: Path) -> None:
    """``import dler_kernels`` from the venv, in the tests' environment, must be the installed copy; then the CUDA
    backend's oracle tests run from it, in ROOT (for tests/) with the checkout off the path."""
    env = installed_env()
    where = "import dler_kernels; print('DLER_KERNELS=' + dler_kernels.__file__)"
    found = run_command([str(python), "-c", where], 60, env=env, cwd=ROOT)
    answers = [line.removeprefix("DLER_KERNELS=") for line in found.output.splitlines()
               if line.startswith("DLER_KERNELS=")]  # fmt: skip
    path = Path(answers[-1]) if found.returncode == 0 and answers else None
    venv = (ctx.out / "wheel" / "venv").resolve()
    if path is None or not path.resolve().is_relative_to(venv):
        ctx.part("dler_kernels imported from the installed wheel", "failed",
                 f"import dler_kernels found {path}, not the copy in {venv}" if path else "import dler_kernels failed",
                 error=tail(found.output))  # fmt: skip
        return
    ctx.record["figures"]["installed_dler_kernels"] = str(path)
    ctx.part("dler_kernels imported from the installed wheel", "passed", "", path=str(path))
    label = "CUDA oracle tests from the installed wheel"
    timeout = ctx.remaining() - PROBE_S
    if timeout < MIN_TESTS_S:
        ctx.part(label, "failed", f"not run: out of time ({ctx.remaining():.0f} s of the stage left after the "
                 "build)")  # fmt: skip
        return
    run_pytest(ctx, label, WHEEL_ORACLE_TESTS, env, timeout, python=python,
               log=ctx.out / "logs" / "pytest-wheel-oracles.log")  # fmt: skip


def into_checkout(ctx: StageContext, wheel: Path) -> None:
    """The wheel's ``_C`` and ``_build_info.py`` into ROOT/dler_kernels, replacing the checkout's (ignored build
    outputs, like any other ``_C*.so`` there, which Python could load first)."""
    package = ROOT / "dler_kernels"
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.startswith("dler_kernels/_C") and n.endswith(".so")]
        names += [n for n in whl.namelist() if n == "dler_kernels/_build_info.py"]
        if len(names) != 2:
            ctx.part("extension put into the checkout", "failed", f"the wheel holds {names}, not one _C and "
                     "_build_info.py")  # fmt: skip
            return
        for stale in package.glob("_C*.so"):
            stale.unlink()
        for name in names:
            target = package / Path(name).name
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(whl.read(name))
            tmp.replace(target)  # a new file: a process that has the old one loaded keeps its copy
    ctx.part("extension put into the checkout", "passed", "", files=[Path(n).name for n in names])


def probe(ctx: StageContext) -> None:
    """``available_backends()`` of the checkout in a fresh process: its CUDA backend must be usable."""
    # The answer carries a prefix: stderr is merged into the output, and a warning may follow the line.
    code = "import json, dler_kernels; print('BACKENDS=' + json.dumps(dler_kernels.available_backends()))"
    loaded = run_command([sys.executable, "-c", code], max(ctx.remaining() - 2, 5), env=child_env(), cwd=ROOT)
    answers = [line for line in loaded.output.splitlines() if line.startswith("BACKENDS=")]
    backends = json.loads(answers[-1].removeprefix("BACKENDS=")) if loaded.returncode == 0 and answers else {}
    ctx.record["figures"]["backends_after_build"] = backends
    label = "the checkout loads it: CUDA backend usable"
    if not str(backends.get("cuda", "")).startswith("yes"):
        ctx.part(label, "failed", f"the CUDA backend is not usable: {backends.get('cuda')}", error=tail(loaded.output))
    else:
        ctx.part(label, "passed", "", backends=backends)
