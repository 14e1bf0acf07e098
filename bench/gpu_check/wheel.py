"""The pure parts of the build stage's wheel (no torch, no GPU; tested on any machine): the source tree exported
as ``make wheel-cuda`` exports it, the ptxas spill report read from a build log, and a wheel's local version tag.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
# The Makefile's WHEEL_ARCH_LIST (`make wheel-cuda`): machine code for A100-class, H100/H200 and B200, and
# compute_100 PTX for newer GPUs.
WHEEL_ARCH_LIST = "8.0;9.0;10.0+PTX"

# What an export without git leaves out: the folders and files .gitignore names (build outputs, environments,
# run outputs, this check's own output folders). Folders by name at any depth, or at the top only: trainer/dist
# is a source package, /dist is the wheels' folder.
SKIP_DIRS = (
    ".git",
    ".venv*",
    "build",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    ".hypothesis",
)
SKIP_TOP_DIRS = ("dist", "runs", "gpu-check*", ".whl")
SKIP_FILES = ("*.so",)
SKIP_PATHS = ("dler_kernels/_build_info.py",)  # setup.py writes it with the extension it builds

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def skipped(path: str | PurePosixPath, is_dir: bool = False) -> bool:
    """Whether the export leaves out ``path`` (relative to the tree's root, ``/``-separated)."""
    parts = PurePosixPath(path).parts
    dirs = parts if is_dir else parts[:-1]
    if any(fnmatch(d, pattern) for d in dirs for pattern in SKIP_DIRS):
        return True
    if dirs and any(fnmatch(dirs[0], pattern) for pattern in SKIP_TOP_DIRS):
        return True
    if is_dir:
        return False
    return any(fnmatch(parts[-1], pattern) for pattern in SKIP_FILES) or "/".join(parts) in SKIP_PATHS


def source_files(root: Path, exclude: Path | None = None, use_git: bool | None = None) -> tuple[list[str], str]:
    """(the files of the tree ``root``, relative and sorted; how they were listed). git's own list (tracked files
    and untracked ones it does not ignore: ``make wheel-cuda``'s) when git and ``root/.git`` are there, else a walk
    of the tree; either way without what :func:`skipped` names, nor anything under ``exclude`` (this run's output
    folder, when it lies inside the tree)."""
    if use_git is None:
        use_git = shutil.which("git") is not None and (root / ".git").exists()
    if use_git:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True, timeout=60).stdout  # fmt: skip
        names, how = [n for n in os.fsdecode(listed).split("\0") if n], "git ls-files"
    else:
        names, how = [], "walk (no git)"
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(d for d in dirnames if not skipped((rel / d).as_posix(), is_dir=True))
            names += [(rel / f).as_posix() for f in filenames]
    inside = None
    if exclude is not None and exclude.resolve().is_relative_to(root.resolve()):
        inside = exclude.resolve().relative_to(root.resolve()).as_posix()
    files = {n for n in names if not skipped(n) and (root / n).is_file()}  # git lists deleted tracked files too
    if inside:
        files = {n for n in files if n != inside and not n.startswith(inside + "/")}
    return sorted(files), how


def export_tree(root: Path, dest: Path, exclude: Path | None = None, use_git: bool | None = None) -> dict:
    """The files of :func:`source_files` copied into ``dest`` (emptied first); their count, bytes and how listed."""
    files, how = source_files(root, exclude, use_git)
    shutil.rmtree(dest, ignore_errors=True)
    size = 0
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
        size += target.stat().st_size
    return dict(files=len(files), bytes=size, how=how)


def wheel_archs(arch_list: str = WHEEL_ARCH_LIST) -> list[str]:
    """The machine-code architectures of a TORCH_CUDA_ARCH_LIST: ``8.0;9.0;10.0+PTX`` -> sm_80, sm_90, sm_100
    (ptxas compiles the PTX of ``+PTX`` for its own arch too)."""
    return [f"sm_{a.split('+')[0].replace('.', '')}" for a in arch_list.replace(" ", ";").split(";") if a]


def ptxas_report(log: str) -> dict[str, dict]:
    """{arch: {kernels, spilling}} from a build log with ``-Xptxas=-v``: the kernels ptxas compiled for each
    arch, and those of them that spill (``name: N bytes spill stores, M bytes spill loads``)."""
    reports: dict[str, dict] = {}
    kernel, arch = "?", None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            kernel, arch = m[1], m[2]
        elif (m := SPILLS.search(line)) and arch is not None:
            report = reports.setdefault(arch, dict(kernels=0, spilling=[]))
            report["kernels"] += 1
            if (int(m[1]), int(m[2])) != (0, 0):
                report["spilling"].append(f"{kernel}: {m[0]}")
    return reports


def ptxas_problems(reports: dict[str, dict], archs: list[str]) -> list[str]:
    """What is wrong with a ptxas report ([] when nothing): an arch without a report (no -v, or not built), a
    spilling kernel, or archs that compiled different numbers of kernels."""
    problems = [f"no ptxas report for {a} (built without -Xptxas=-v, or not for {a})" for a in archs
                if a not in reports]  # fmt: skip
    for arch, report in sorted(reports.items()):
        problems += [f"{arch}: {spill}" for spill in report["spilling"]]
    counts = {arch: r["kernels"] for arch, r in reports.items()}
    if len(set(counts.values())) > 1:
        problems.append(f"the archs compiled different numbers of kernels: {counts}")
    return problems


def local_tag(wheel_name: str) -> str | None:
    """The local version tag of a wheel's file name (``dler-0.1.0+cu130torch2.11-cp312-...whl`` ->
    ``cu130torch2.11``), None for a version without one."""
    version = wheel_name.split("-")[1]
    return version.partition("+")[2] or None


def expected_local_tag(torch_version: str, cuda_version: str | None) -> str:
    """The tag setup.py gives a build against this torch: ``dler_kernels/_build_flags.py``'s ``local_tag``, loaded by
    path as setup.py loads it (standard library only, so no torch is imported): ``cu130torch2.11``."""
    spec = importlib.util.spec_from_file_location("_build_flags", ROOT / "dler_kernels" / "_build_flags.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    return flags.local_tag(torch_version, cuda_version)
