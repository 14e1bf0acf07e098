"""Peak host memory of one call, for the CPU benchmarks: the growth of the peak resident set
(VmHWM, reset through /proc/self/clear_refs just before the call) over what was resident before it.
Run it in a fresh process with the work warmed up on tiny inputs first, so that lazy
initialisation (thread pools, compilation) and freed-but-cached heap pages stay out of it."""

import ctypes
import gc
import json
import os
import subprocess
import sys


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth(fn) -> int:
    """Bytes by which the peak resident set of this process rises above the current one during fn()."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first: the baseline is what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = proc_status_bytes("VmRSS")
    fn()
    return proc_status_bytes("VmHWM") - before


def peak_in_child(script: str, impl: str, args, skip=("rss_child", "json")) -> int:
    """Runs ``script --rss-child IMPL`` with the benchmark's arguments in a fresh process; the script
    prints ``{"peak_bytes": ...}`` (measured with ``peak_growth``) as its last line."""
    return run_in_child(script, impl, args, skip)["peak_bytes"]


def run_in_child(script: str, impl: str, args, skip=("rss_child", "json")) -> dict:
    """``script --rss-child IMPL`` plus the arguments of ``args`` (but ``skip``) in a fresh process: the JSON
    object it prints as its last line."""
    cmd = [sys.executable, script, "--rss-child", impl] + [
        a for k, v in vars(args).items() if k not in skip and v is not None
        for a in (f"--{k.replace('_', '-')}", str(v))
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])
