"""The C++/CUDA extension dler_kernels._C: loading and fallback, registration as PyTorch custom
ops (opcheck, torch.compile), the per-instruction-set CPU builds, the CUDA sources (compiled here
with nvcc when it exists; run against Triton on a GPU).

The ops' numbers against float64 are tested in test_policy_loss.py and test_linear_policy_loss.py,
parametrised over backends: their "cpu" backend is this extension.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import dler_kernels
from dler_kernels import _ext, policy_loss, reference, token_logprobs

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif(not _ext.has_cpu(), reason=f"dler_kernels._C is {_ext.why_not()}")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0", **env},
    )  # fmt: skip


def test_extension_is_built_in_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("checked where CI=true: there the README's setup must have built the extension")
    assert _ext.has_cpu(), f"dler_kernels._C is {_ext.why_not()}"


# ---------------------------------------------------------------- missing or stale: one warning, then fall back

FALLBACK_CHECK = """
    import warnings
    import torch
    {setup}
    import dler_kernels
    from dler_kernels import reference
    x = torch.randn(6, 50, requires_grad=True)
    t, old, adv, m = torch.randint(0, 50, (6,)), torch.randn(6) - 4, torch.randn(6), torch.ones(6, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dler_kernels.backend_for(x) == "reference"
        out = dler_kernels.policy_loss(x, t, old, adv, m)
        dler_kernels.token_logprobs(x.detach(), t)
    ours = [w for w in caught if "dler_kernels._C" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    print("WARNING:", ours[0].message)
    expected = reference.policy_loss_ref(x, t, old, adv, m)[0]
    assert torch.allclose(out.loss, expected), (out.loss, expected)
    try:
        dler_kernels.policy_loss(x, t, old, adv, m, backend="cpu")
    except ValueError as e:
        print("FORCED:", e)
"""


def test_missing_extension_warns_once_and_falls_back():
    out = run_python(FALLBACK_CHECK.format(setup='import sys; sys.modules["dler_kernels._C"] = None'))
    assert out.returncode == 0, out.stderr
    assert "WARNING: dler_kernels._C is not built; CPU tensors use the plain-torch reference" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
    assert "FORCED: backend=cpu but dler_kernels._C is not built" in out.stdout


@needs_ext
@pytest.mark.parametrize(
    "setup,why",
    [
        ("import dler_kernels._ext as e; e.ABI_VERSION = 99", "stale: built for op ABI 2, this package needs 99"),
        (
            "import dler_kernels._sources_hash as h; h.sources_hash = lambda path: 'edited'",
            "stale: built from other sources than those in",
        ),
        ("import dler_kernels._C as c; c.TORCH_VERSION = '0.0.1'", "stale: built against torch 0.0.1, running torch"),
    ],
    ids=["abi", "sources", "torch"],
)
def test_stale_extension_warns_once_and_falls_back(setup, why):
    out = run_python(FALLBACK_CHECK.format(setup=setup))
    assert out.returncode == 0, out.stderr
    assert f"WARNING: dler_kernels._C is {why}" in out.stdout
    assert "FORCED: backend=cpu but dler_kernels._C is stale" in out.stdout


def test_info_lists_the_extension():
    out = subprocess.run([sys.executable, "-m", "dler_kernels.info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = "yes (dler_kernels._C" if _ext.has_cpu() else "no (dler_kernels._C"
    cpu_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("cpu "))
    assert expected in cpu_line, out.stdout


@needs_ext
def test_default_cpu_backend_is_the_extension(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("DLER_BACKEND", raising=False)
    assert dler_kernels.backend_for(torch.zeros(2, 3)) == "cpu"
    # advantages have no C++ kernel: a global DLER_BACKEND=cpu leaves them on their own backends
    monkeypatch.setenv("DLER_BACKEND", "cpu")
    assert dler_kernels.backend_for(torch.zeros(3), supported=("reference", "triton")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of reference, triton for this op, got 'cpu'"):
        dler_kernels.backend_for(torch.zeros(3), "cpu", supported=("reference", "triton"))
    # the CUDA backend on CPU tensors: on a machine without a GPU, the missing device is what the error names
    gpu = torch.cuda.is_available()
    why = "runs the extension's CUDA kernels, got cpu tensors" if gpu else r"but this machine has no CUDA device"
    with pytest.raises(ValueError, match="backend=cuda " + why):
        dler_kernels.backend_for(torch.zeros(3), "cuda")


# ---------------------------------------------------------------- custom-op registration


def op_inputs(n=9, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    old = (torch.randn(n, generator=g) - 3).to(acc)
    adv = torch.randn(n, generator=g).to(acc)
    ref_lp = (torch.randn(n, generator=g) - 3).to(acc)
    weights = reference.aggregation_weights(valid, "token-mean", None, None, None, dtype=acc)
    # temperature, eps_low, eps_high, clip_c, beta, kl_type (k3), entropy_coef
    scalars = (0.8, 0.2, 0.28, 3.0, 0.05, 3, 0.01)
    return logits, (targets, valid, old, adv, ref_lp, weights, *scalars)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_policy_loss(dtype):
    logits, args = op_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dler.policy_loss.default, (logits.requires_grad_(True), *args, True))
    torch.library.opcheck(torch.ops.dler.policy_loss.default, (logits.detach(), *args, False))


@needs_ext
def test_opcheck_mutating_ops_and_token_logprobs():
    logits, args = op_inputs()
    grad = torch.empty_like(logits)
    torch.library.opcheck(torch.ops.dler.policy_loss_rows_.default, (grad, logits, *args))
    torch.library.opcheck(torch.ops.dler.token_logprobs.default, (logits, torch.where(args[1], args[0], -100), 0.7))
    _, _, _, _, lse, dlogp, dent = torch.ops.dler.policy_loss_rows_(grad, logits, *args)
    _, entropy = torch.ops.dler.token_logprobs(logits, args[0], 0.8)
    slab = logits[:, 10:30].clone()
    torch.library.opcheck(
        torch.ops.dler.slab_grad_.default, (slab, args[0], args[1], lse, entropy, dlogp, dent, 10, 0.8)
    )


@needs_ext
def test_slab_grad_equals_the_row_pass_gradient():
    logits, args = op_inputs(n=7, v=301)
    grad = torch.empty_like(logits)
    _, _, entropy, _, lse, dlogp, dent = torch.ops.dler.policy_loss_rows_(grad, logits, *args)
    for col0, col1 in [(0, 301), (0, 1), (17, 150), (300, 301)]:
        slab = logits[:, col0:col1].clone()  # clone: a full-width slice would be the logits themselves
        torch.ops.dler.slab_grad_(slab, args[0], args[1], lse, entropy, dlogp, dent, col0, 0.8)
        torch.testing.assert_close(slab, grad[:, col0:col1], rtol=1e-6, atol=1e-9)


@needs_ext
def test_direct_op_calls_check_their_arguments():
    logits, args = op_inputs()
    targets, valid, *rest = args
    with pytest.raises(RuntimeError, match=r"valid must be 1-D with 9 entries \(one per row\)"):
        torch.ops.dler.policy_loss(logits, targets, valid[:5], *rest, True)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 37\) on valid rows, found 37"):
        bad = torch.where(valid, 37, 0)
        torch.ops.dler.policy_loss(logits, bad, valid, *rest, True)
    with pytest.raises(RuntimeError, match="logits must be contiguous in the vocab dimension"):
        torch.ops.dler.token_logprobs(logits.t().contiguous().t(), targets, 1.0)
    with pytest.raises(RuntimeError, match="grad must have the dtype of logits"):
        torch.ops.dler.policy_loss_rows_(logits.double(), logits, *args)


@needs_ext
def test_write_grad_false_has_no_gradient():
    logits, args = op_inputs()
    x = logits.requires_grad_(True)
    loss = torch.ops.dler.policy_loss(x, *args, False)[0]
    with pytest.raises(RuntimeError, match="write_grad=False"):
        loss.backward()


@needs_ext
def test_backward_materialises_no_zero_gradient_for_the_other_outputs():
    """Autograd would otherwise build a zero [N, V] tensor as the "gradient" of the unused grad output
    (measured: peak memory 2x the logits instead of 1x)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fills = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros):
                self.fills.append(func)
            return func(*args, **(kwargs or {}))

    logits, args = op_inputs()
    x = logits.requires_grad_(True)
    targets, valid, old, adv = args[:4]
    out = policy_loss(x, targets, old, adv, valid, backend="cpu")
    with RecordFills() as mode:
        out.loss.backward()
    assert mode.fills == [] and x.grad is not None


@needs_ext
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """The op inside a compiled function (inductor, fullgraph: no graph break), forward and backward."""
    logits, args = op_inputs(n=16, v=301)
    targets, valid, old, adv, ref_lp, _, *scalars = args

    def step(x, targets, valid, old, adv, ref_lp):
        weights = valid.float() / valid.sum().clamp_min(1)  # token-mean, traced by inductor
        loss, per_token, logp, entropy, kl, _ = torch.ops.dler.policy_loss(
            x, targets, valid, old, adv, ref_lp, weights, *scalars, True
        )
        return 2.0 * loss, per_token, logp

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        x = logits.clone().requires_grad_(True)
        loss, per_token, logp = fn(x, targets, valid, old, adv, ref_lp)
        loss.backward()
        results.append((loss.detach(), per_token, logp, x.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- one build per instruction set


def _supported_isas() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["default", "avx2", "avx512"], "AVX2": ["default", "avx2"]}.get(cap, ["default"])


@needs_ext
@pytest.mark.parametrize("isa", _supported_isas())
def test_every_instruction_set_build_is_right(isa):
    """ATEN_CPU_CAPABILITY picks the build; each one against float64 autograd of the reference, on logits with
    a masked vocabulary (-inf: scattered, in the last columns, over the first half of row 0; never a target),
    whose gradient is exactly 0."""
    code = f"""
        import torch
        from dler_kernels import _ext, policy_loss, reference
        assert _ext.load().cpu_isa() == "{isa}", _ext.load().cpu_isa()
        g = torch.Generator().manual_seed(3)
        for dtype, n, v in [(torch.float32, 7, 4099), (torch.bfloat16, 5, 33), (torch.float64, 3, 1000)]:
            x = (torch.randn(n, v, generator=g) * 3).to(dtype)
            t = torch.randint(0, v, (n,), generator=g)
            cut = torch.rand(n, v, generator=g) < 0.3
            cut[:, -3:] = True
            cut[0, : v // 2] = True
            cut[torch.arange(n), t] = False
            x = x.masked_fill(cut, float("-inf"))
            old, adv = torch.randn(n, generator=g) - 5, torch.randn(n, generator=g)
            m = torch.rand(n, generator=g) > 0.2
            xx = x.clone().requires_grad_(True)
            out = policy_loss(xx, t, old, adv, m, entropy_coef=0.01, temperature=0.9, backend="cpu")
            out.loss.backward()
            x64 = x.double().requires_grad_(True)
            loss64 = reference.policy_loss_ref(x64, t, old.double(), adv.double(), m, entropy_coef=0.01,
                                               temperature=0.9)[0]
            loss64.backward()
            assert (out.loss.double() - loss64).abs() <= 1e-5 * max(1.0, loss64.abs().item()), dtype
            g64 = x64.grad
            err = (xx.grad.double() - g64).abs()
            bound = (2.0**-8 if dtype == torch.bfloat16 else 1e-5) * g64.abs() + 1e-6 * g64.abs().max()
            assert bool((err <= bound).all()), (dtype, (err - bound).max().item())
            assert torch.equal(xx.grad[cut], torch.zeros_like(xx.grad[cut])), dtype
        print("ok")
    """
    out = run_python(code, ATEN_CPU_CAPABILITY=isa)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# ---------------------------------------------------------------- the CUDA sources, compiled without a GPU


def test_cuda_arch_list_follows_the_user_then_the_visible_gpus_else_ampere_hopper_and_ptx(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    from dler_kernels._build_flags import DEFAULT_CUDA_ARCH_LIST, cuda_arch_list

    for gpu_visible in (False, True):
        assert cuda_arch_list("8.6;12.0", gpu_visible=gpu_visible) == "8.6;12.0"  # the user's list wins
    assert cuda_arch_list(None, gpu_visible=False) == DEFAULT_CUDA_ARCH_LIST == "8.0;9.0+PTX"
    assert cuda_arch_list("", gpu_visible=False) == DEFAULT_CUDA_ARCH_LIST  # torch reads "" as unset too
    # With no GPU, torch's flags for the default: A100 and Hopper machine code, Hopper PTX for newer GPUs
    # (without the PTX, a wheel fails with "no kernel image" on Blackwell).
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    assert _get_cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    # A GPU visible and no list: None leaves TORCH_CUDA_ARCH_LIST unset, and torch's own default builds for
    # the visible GPUs with PTX on the newest (shown here with two GPUs that this CPU machine pretends to see).
    assert cuda_arch_list(None, gpu_visible=True) is None
    assert cuda_arch_list("", gpu_visible=True) is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (9, 0)][i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_100"])
    assert _get_cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
    ]


# `make test` installs nvcc, ptxas and the CUDA headers from the registry's wheels into this cache
# (target cuda-toolchain) and names their CUDA_HOME in DLER_CUDA_HOME.
TOOLCHAIN_CACHE = Path.home() / ".cache" / "dler"


def find_cuda_home() -> tuple[Path | None, str]:
    """(a CUDA_HOME with bin/nvcc, "") or (None, why not): DLER_CUDA_HOME, else the newest toolchain of
    `make cuda-toolchain` in the cache, else a system CUDA (nvcc on PATH, /usr/local/cuda)."""
    if os.environ.get("DLER_CUDA_HOME"):
        home = Path(os.environ["DLER_CUDA_HOME"])
        if not (home / "bin" / "nvcc").is_file():  # named explicitly, so a wrong one is an error, not a skip
            pytest.fail(f"DLER_CUDA_HOME={home} has no bin/nvcc; `make cuda-toolchain` installs it there")
        return home, ""
    cached = sorted(TOOLCHAIN_CACHE.glob("cuda-toolchain-*/nvidia/cu*/bin/nvcc"), reverse=True)
    for nvcc in [*cached, Path(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")]:
        if nvcc.is_file():
            return nvcc.parent.parent, ""
    return None, (
        f"no CUDA toolchain: DLER_CUDA_HOME is unset, {TOOLCHAIN_CACHE}/cuda-toolchain-* holds none, and there "
        "is no nvcc on PATH or in /usr/local/cuda; `make cuda-toolchain` installs one from the package registry"
    )


def require_cuda_home() -> Path:
    home, why = find_cuda_home()
    if home is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must compile the CUDA sources: {why}")
        pytest.skip(why)
    return home


# setup.py's own `build_ext` (torch's BuildExtension) runs up to where it hands the compile commands to
# ninja, and prints them: the test then runs the very nvcc command of a CUDA build, not a copy of its
# flags. A CPU build of torch lacks two facts a CUDA torch has, supplied here: its CUDA version (the
# toolchain's, as in a matching torch+cuXXX) and CUDA_HOME (which torch only looks up when built with CUDA).
DESCRIBE_CUDA_BUILD = """
    import json, os, runpy, sys
    import torch
    import torch.utils.cpp_extension as cpp

    if torch.version.cuda is None:
        torch.version.cuda = {release!r}
        cpp.CUDA_HOME = cpp._find_cuda_home()
    captured = {{}}

    class Captured(Exception):
        pass

    def capture(**kwargs):
        captured.update(kwargs)
        raise Captured

    cpp._write_ninja_file_and_compile_objects = capture
    sys.argv = ["setup.py", "build_ext", "--build-temp", {build!r}, "--build-lib", {build!r}]
    try:
        runpy.run_path("setup.py", run_name="__main__")
    except Captured:
        pass
    assert captured, "setup.py never reached torch's ninja compile step (is ninja installed?)"
    report = {{k: captured[k] for k in ("sources", "cuda_cflags", "cuda_post_cflags")}}
    print("BUILD=" + json.dumps({{"arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), **report}}))
"""


def describe_cuda_build(home: Path, release: str, build_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "DLER_BUILD_EXT")}
    env.update(CUDA_HOME=str(home), DLER_BUILD_CUDA="1")
    code = textwrap.dedent(DESCRIBE_CUDA_BUILD.format(release=release, build=str(build_dir)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(next(line[6:] for line in out.stdout.splitlines() if line.startswith("BUILD=")))


def ptxas_report(log: str) -> list[dict]:
    """One row per compiled kernel and arch from `ptxas -v`: registers, spill stores/loads, static smem."""
    rows = []
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            rows.append({"kernel": m[1], "arch": m[2]})
        elif rows and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            rows[-1].update(spill_stores=int(m[1]), spill_loads=int(m[2]))
        elif rows and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            rows[-1].update(registers=int(m[1]), smem=int(smem[1]) if smem else 0)
    names = [row["kernel"] for row in rows]
    if shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        names = demangled.splitlines()
    for row, name in zip(rows, names):
        name = name.replace("dler::(anonymous namespace)::", "").replace("c10::", "")
        row["kernel"] = re.sub(r"^void |\(.*\)$", "", name)  # no return type, no parameters
    return rows


def test_cuda_sources_compile_with_setup_py_flags_for_every_arch_without_warnings_or_spills(tmp_path, capsys):
    """nvcc compiles csrc/cuda/*.cu with the command setup.py's CUDA build runs (flags, arch list, include
    paths, against this torch's headers), on a machine without a GPU: a CUDA compile error, a warning or
    a register spill (which would cost the memory-bound kernels their bandwidth) fails here, not on a
    GPU node. A CPU build of torch lacks one generated header of c10/cuda, which the test supplies."""
    from dler_kernels._build_flags import DEFAULT_CUDA_ARCH_LIST

    home = require_cuda_home()
    nvcc = home / "bin" / "nvcc"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release (\d+\.\d+)", version)[1]
    build = describe_cuda_build(home, release, tmp_path / "build")
    post = build["cuda_post_cflags"]
    archs = sorted(set(re.findall(r"code=(sm_\w+)", " ".join(post))))
    if torch.cuda.device_count() == 0:  # no GPU to follow: the default list, A100 and Hopper + Hopper PTX
        assert build["arch_list"] == DEFAULT_CUDA_ARCH_LIST
        assert archs == ["sm_80", "sm_90"] and "-gencode=arch=compute_90,code=compute_90" in post, post
    cu_sources = [src for src in build["sources"] if src.endswith(".cu")]
    assert {ROOT / src for src in cu_sources} == set((ROOT / "csrc" / "cuda").glob("*.cu"))

    stub = []
    if not (Path(torch.__file__).parent / "include/c10/cuda/impl/cuda_cmake_macros.h").exists():
        header = tmp_path / "inc/c10/cuda/impl/cuda_cmake_macros.h"  # generated by CMake in a CUDA build of torch
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        stub = [shlex.quote(f"-I{tmp_path / 'inc'}")]
    rows, start = [], time.perf_counter()
    for src in cu_sources:
        # torch's ninja rule, `$nvcc $cuda_cflags -c $in -o $out $cuda_post_cflags`, through the shell as
        # ninja runs it (the flags are shell-quoted); -Xptxas -v only adds the per-kernel resource report.
        obj = tmp_path / f"{Path(src).stem}.o"
        cmd = [shlex.quote(str(nvcc)), *stub, *build["cuda_cflags"], "-c", shlex.quote(str(ROOT / src)), "-o",
               shlex.quote(str(obj)), *post, "-Xptxas", "-v"]  # fmt: skip
        out = subprocess.run(" ".join(cmd), shell=True, capture_output=True, text=True)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-6000:]
        assert obj.stat().st_size > 0
        warnings_ = [line for line in log.splitlines() if "warning" in line.lower()]
        assert not warnings_, "\n".join(warnings_)
        rows += ptxas_report(log)
    seconds = time.perf_counter() - start

    assert all({"registers", "spill_stores", "smem"} <= row.keys() for row in rows), rows  # ptxas -v format
    with capsys.disabled():  # the table belongs in the CI log, captured or not
        print(f"\nnvcc {release} ({home}): {len(cu_sources)} file(s) in {seconds:.1f} s")
        print(f"TORCH_CUDA_ARCH_LIST={build['arch_list']} (from setup.py)")
        print(f"{'arch':6s} {'kernel':40s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>6s}")
        for row in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
            spills = f"{row['spill_stores']}/{row['spill_loads']}"
            print(f"{row['arch']:6s} {row['kernel']:40s} {row['registers']:5d} {spills:>12s} {row['smem']:6d}")
    kernels = {arch: sorted(r["kernel"] for r in rows if r["arch"] == arch) for arch in archs}
    assert sorted(kernels) == archs and kernels[archs[0]], kernels
    assert all(names == kernels[archs[0]] for names in kernels.values()), kernels  # every kernel for every arch
    spilled = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilled, spilled


CUDA_SHAPES = [(1, 1), (3, 7), (17, 1000), (5, 4097), (4, 151936), (64, 32000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_cuda_backend_matches_float64_and_triton(shape, dtype):
    if not _ext.has_cuda():
        pytest.fail(f"a GPU machine must build the CUDA kernels; dler_kernels._C: {_ext.status()[1]}")
    n, v = shape
    g = torch.Generator().manual_seed(n * 7 + v)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    old, adv = torch.randn(n, generator=g) - 6, torch.randn(n, generator=g)
    ref_lp, mask = torch.randn(n, generator=g) - 6, torch.rand(n, generator=g) > 0.2
    opts = dict(beta=0.05, entropy_coef=0.01, temperature=0.8, ref_logprobs=ref_lp.cuda())
    outs = {}
    for backend in ["cuda", "triton"] if dler_kernels.HAS_TRITON else ["cuda"]:
        x = logits.cuda().requires_grad_(True)
        out = policy_loss(x, targets.cuda(), old.cuda(), adv.cuda(), mask.cuda(), backend=backend, **opts)
        out.loss.backward()
        outs[backend] = (out, x.grad)
        lp, ent = token_logprobs(x.detach(), targets.cuda(), temperature=0.8, return_entropy=True, backend=backend)
        torch.testing.assert_close(lp, out.logprobs * mask.cuda(), rtol=0, atol=1e-6)
    x64 = logits.double().requires_grad_(True)
    loss64, _, lp64, ent64, _ = reference.policy_loss_ref(
        x64, targets, old.double(), adv.double(), mask, **{**opts, "ref_logprobs": ref_lp.double()}
    )
    loss64.backward()
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    g64 = x64.grad
    bound = rounding * g64.abs() + 1e-4 * g64.abs().max()
    for backend, (out, grad) in outs.items():  # each one against float64, not only the extension
        assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item())), backend
        assert (out.logprobs.double().cpu() - lp64).abs().max() <= 1e-5, backend
        assert (out.entropy.double().cpu() - ent64).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item()), backend
        assert bool(((grad.double().cpu() - g64).abs() <= bound).all()), backend


@pytest.mark.gpu
def test_cuda_backend_unaligned_rows_and_linear_path():
    if not _ext.has_cuda():
        pytest.fail(f"a GPU machine must build the CUDA kernels; dler_kernels._C: {_ext.status()[1]}")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(9, 1001, device="cuda", generator=g)
    logits = base[:, 1:]  # rows start 4 bytes past a 16-byte boundary: the one-element-per-load kernel
    targets = torch.randint(0, 1000, (9,), device="cuda", generator=g)
    lp = token_logprobs(logits, targets, backend="cuda")
    torch.testing.assert_close(lp, token_logprobs(logits.contiguous(), targets, backend="reference"), atol=1e-5, rtol=0)
    from dler_kernels import linear_policy_loss

    hidden = torch.randn(33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5003, 64, device="cuda") / 8).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 5003, (33,), device="cuda")
    old, adv = torch.randn(33, device="cuda") - 8, torch.randn(33, device="cuda")
    args = (t, old, adv, torch.ones(33, device="cuda", dtype=torch.bool))
    grads = {}
    for backend in ("cuda", "reference"):
        h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        linear_policy_loss(h, w, *args, backend=backend, chunk_size=8).loss.backward()
        grads[backend] = (h.grad.float(), w.grad.float())
    for ours, ref in zip(grads["cuda"], grads["reference"]):
        assert ((ours - ref).norm() / ref.norm()).item() <= 1e-2  # both round dZ to bf16 once
