"""Ahead-of-time compile of every Triton kernel of ``dler_kernels`` for real GPUs, without a GPU.

``python -m dler_kernels.aot_check`` (``--arch 90``, ``--jobs N``) compiles, with Triton's own
compiler and the ``ptxas`` inside the Triton wheel, exactly the launches the package makes on CUDA
at N=16384 tokens, V=151936 (and an odd V=151935), bf16/fp16/fp32: the logits path (every KL type,
with and without gradient, log-probs only), the fused-linear row and vocab (slab) passes and the
log-probs' backward, and the advantages kernel, for ``GPUTarget("cuda", arch, 32)`` with arch 80,
90 and 100. The launches are not described here: the package's launch wrappers run on meta
tensors inside ``_launch.recording(cuda)``, which configures them for CUDA and records them, and
each recorded launch goes through the kernel's own ``warmup`` (Triton's binder: the signature,
constexprs, num_warps and the divisibility-by-16 specialisation of pointers and integers that a
real launch gets; meta tensors sit at address 0 plus their offset, as CUDA allocations are
aligned) under a stand-in driver that reports the target.

It fails (exit status 1) on a compile error, a register spill, a 32-bit multiply of a
``program_id``-derived value (row offsets must be 64-bit: ``N * V`` exceeds 2**31), a row kernel
without a 64-bit row-offset multiply, or a row/slab kernel over 16-byte-aligned rows whose widest
global load or store is narrower than 128 bits. It prints one table row per compiled variant and
architecture. Needs no CUDA torch and no GPU; keep TRITON_INTERPRET unset (the kernels must be
``JITFunction``s) -- ``main`` refuses otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCHS = (90, 80, 100)
N_TOKENS = 16384
VOCAB = 151936
ODD_VOCAB = 151935
HIDDEN = 3584  # only shapes the matmuls of the fused-linear path (meta tensors): any H gives the same launches
N_RESPONSES, N_GROUPS = 1024, 128
DTYPES = ("bf16", "fp16", "fp32")
KL_TYPES = (None, "k1", "k2", "mse", "k3", "low_var_kl", "k3_ratio")  # None: beta = 0, no KL term
FUSED_OBJECTIVES = ("cispo", "sapo", "dppo_tv", "dppo_kl")  # besides ppo_clip: objectives with a kernel_code


# ------------------------------------------------------------------------------------------ PTX rules

_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);", re.M)
_REG = re.compile(r"%[a-z]+\d+")
_MEM = re.compile(r"^(ld|st)\.global\b([\w.:]*)$")
_MUL32 = re.compile(r"^(mul|mad)\.(lo|hi)\.[su]32$|^(mul|mad)24\.|^shl\.b32$")
_MUL64 = re.compile(r"^(mul|mad)\.wide\.[su]32$|^(mul|mad)\.lo\.[su]64$|^shl\.b64$")


@dataclass
class PtxFacts:
    widest_load: int = 0  # bits
    widest_store: int = 0
    uses_program_id: bool = False
    row_offset_ops: list[str] = field(default_factory=list)  # 64-bit multiplies of program_id-derived values
    narrow_products: list[str] = field(default_factory=list)  # 32-bit ones (the bug this check exists for)


def _access_bits(modifiers: str) -> int:
    parts = modifiers.strip(".").split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    width = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 0)
    return vec * width


def ptx_facts(ptx: str) -> PtxFacts:
    """Widest global access, and how ``%ctaid`` (program_id) values are multiplied: every register
    computed from a ``%ctaid`` register is tracked; a 32-bit multiply, mad or left shift of one is a
    32-bit row offset (it wraps at 2**31 elements, e.g. row 14135 of a 151936-wide bf16 logits), a
    ``mul.wide.s32``/``mul.lo.s64`` of one is the 64-bit row offset the kernels must use."""
    facts = PtxFacts()
    tainted: set[str] = set()
    for op, operands in _INSTR.findall(ptx):
        mem = _MEM.match(op)
        if mem:
            bits = _access_bits(mem.group(2))
            if mem.group(1) == "ld":
                facts.widest_load = max(facts.widest_load, bits)
            else:
                facts.widest_store = max(facts.widest_store, bits)
            continue
        if "%ctaid" in operands:
            facts.uses_program_id = True
            tainted.update(_REG.findall(operands.split(",")[0]))
            continue
        if op.startswith(("ld.", "st.", "atom.", "red.", "bra", "setp")):  # a loaded value is data, not an offset
            continue
        regs = _REG.findall(operands)
        if len(regs) < 2 or not tainted.intersection(regs[1:]):
            continue
        line = f"{op} {operands.strip()}"
        if _MUL32.match(op):
            facts.narrow_products.append(line)
        elif _MUL64.match(op):
            facts.row_offset_ops.append(line)
        tainted.add(regs[0])
    return facts


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_facts(log: str) -> tuple[int, int, int]:
    """(registers, spill bytes (stores + loads), stack frame bytes) from ``ptxas -v``'s log."""
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"no register/spill report in the ptxas log:\n{log}")
    return int(regs.group(1)), int(spill.group(2)) + int(spill.group(3)), int(spill.group(1))


# -------------------------------------------------------------------------- the launches to compile


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _token_inputs(n):
    import torch

    return dict(
        targets=_meta(n, torch.int64), valid=_meta(n, torch.bool), old=_meta(n, torch.float32),
        adv=_meta(n, torch.float32), ref_lp=_meta(n, torch.float32),
    )  # fmt: skip


def _loss_options(kl_type, objective="ppo_clip"):
    from .loss_inputs import LossOptions

    return LossOptions(beta=0.0 if kl_type is None else 0.04, kl_type=kl_type or "k3", objective=objective)


def _token_data(t):
    from .loss_inputs import TokenData

    return TokenData(t["targets"], t["valid"], t["old"], t["adv"], t["ref_lp"], None, None)


def _logits_loss(dtype, vocab, kl_type, grad, objective="ppo_clip"):
    """policy_loss on [N, V] logits: grad 'grad' (autograd), 'inplace' (inplace_grad) or 'none'."""
    import torch

    from .triton_backend import TritonBackend

    t = _token_inputs(N_TOKENS)
    logits = _meta((N_TOKENS, vocab), _torch_dtype(dtype)).requires_grad_(grad == "grad")
    with torch.set_grad_enabled(grad == "grad"):
        TritonBackend().policy_loss(
            logits, _token_data(t), _loss_options(kl_type, objective), inplace_grad=grad == "inplace"
        )


def _logprobs(dtype, vocab):
    """token_logprobs on [N, V] logits (no gradient: old/ref log-probs)."""
    from .triton_policy_loss import triton_token_logprobs

    triton_token_logprobs(_meta((N_TOKENS, vocab), _torch_dtype(dtype)), _token_inputs(N_TOKENS)["targets"])


def _linear_loss(dtype, kl_type, objective="ppo_clip"):
    """linear_policy_loss from hidden states: row pass per chunk, vocab pass per slab (bf16/fp16)."""
    from .linear_policy_loss import fused_linear, rows_per_chunk
    from .triton_backend import TritonBackend

    dt = _torch_dtype(dtype)
    t = _token_inputs(N_TOKENS)
    options = _loss_options(kl_type, objective)
    data = _token_data(t)
    backend = TritonBackend()
    fused_linear(
        _meta((N_TOKENS, HIDDEN), dt), _meta((VOCAB, HIDDEN), dt), None, data, data.aggregation_weights(options),
        options, rows=rows_per_chunk(N_TOKENS, VOCAB, None, backend), backend=backend, need_dx=True, need_dw=True,
        need_db=False,
    )  # fmt: skip


def _linear_logprobs_backward(dtype):
    """The backward of linear_token_logprobs: slab kernel over row chunks, then over vocab slabs."""
    import torch

    from .linear_policy_loss import logprobs_grads, rows_per_chunk
    from .triton_backend import TritonBackend

    dt = _torch_dtype(dtype)
    t = _token_inputs(N_TOKENS)
    f = [_meta(N_TOKENS, torch.float32) for _ in range(4)]
    backend = TritonBackend()
    logprobs_grads(
        _meta((N_TOKENS, HIDDEN), dt), _meta((VOCAB, HIDDEN), dt), None, t["targets"], t["valid"], *f, 1.0,
        rows_per_chunk(N_TOKENS, VOCAB, None, backend), backend, (True, True, False),
    )  # fmt: skip


def _advantages(method, dynamic):
    import torch

    from .triton_advantages import advantages_launch

    launch, _ = advantages_launch(
        _meta(N_RESPONSES, torch.float32), _meta(N_RESPONSES, torch.int64), N_GROUPS, method=method,
        correctness=_meta(N_RESPONSES, torch.float32), token_counts=_meta(N_RESPONSES, torch.int64),
        weighting="token", eps=1e-6, dynamic_sampling=dynamic,
    )  # fmt: skip
    launch.run()


def scenarios() -> list[tuple[str, object, tuple]]:
    """(label, function, arguments): each function runs one wrapper of the package on meta tensors."""
    out = []
    for dt in DTYPES:
        for kl in KL_TYPES:
            out.append((f"loss {dt} V={VOCAB} grad kl={kl}", _logits_loss, (dt, VOCAB, kl, "grad")))
        out.append((f"loss {dt} V={VOCAB} inplace kl=k3", _logits_loss, (dt, VOCAB, "k3", "inplace")))
        out.append((f"loss {dt} V={VOCAB} no-grad kl=k3", _logits_loss, (dt, VOCAB, "k3", "none")))
        out.append((f"loss {dt} V={ODD_VOCAB} grad kl=k3", _logits_loss, (dt, ODD_VOCAB, "k3", "grad")))
        out.append((f"loss {dt} V={ODD_VOCAB} no-grad kl=None", _logits_loss, (dt, ODD_VOCAB, None, "none")))
        for vocab in (VOCAB, ODD_VOCAB):
            out.append((f"logprobs {dt} V={vocab}", _logprobs, (dt, vocab)))
        out.append((f"linear loss {dt} kl=k3", _linear_loss, (dt, "k3")))
        out.append((f"linear logprobs backward {dt}", _linear_logprobs_backward, (dt,)))
    # The row kernel of each other token-local objective with a fused kernel (its OBJECTIVE constexpr), in the
    # dtype of training: the logits path and the fused-linear path (which also stores the row state).
    for objective in FUSED_OBJECTIVES:
        out.append((f"loss bf16 V={VOCAB} grad kl=k3 objective={objective}", _logits_loss,
                    ("bf16", VOCAB, "k3", "grad", objective)))  # fmt: skip
        out.append((f"linear loss bf16 kl=k3 objective={objective}", _linear_loss, ("bf16", "k3", objective)))
    for method in ("grpo", "dr_grpo", "dler"):
        for dynamic in (True, False):
            out.append((f"advantages {method} dynamic={dynamic}", _advantages, (method, dynamic)))
    return out


# ------------------------------------------------------------------------------------- compilation


class _StandInDriver:
    """What a launch's compile path asks the active driver: the target, a device index, a stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # A JITFunction keeps one cache (and one target) per device: one stand-in device per arch.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for(arch: int):
    """Launches' ``warmup`` compiles for ``GPUTarget("cuda", arch, 32)`` inside (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32)))
    try:
        yield
    finally:
        driver.set_active(None)  # back to the lazily created default driver


def warm_up(launch):
    """Compiles ``launch`` (a KernelLaunch) the way launching it would, without running it; returns
    the CompiledKernel (Triton's own cache returns the same one for the same specialisation)."""
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.constexprs, num_warps=launch.num_warps)


@dataclass
class Row:
    kernel: str
    variant: str
    arch: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    widest_load: int
    widest_store: int
    row_offset: str
    problems: list[str]


def check_variant(kernel_name, variant, arch, compiled, ptxas_log, launch) -> Row:
    from ._launch import rows_aligned

    regs, spill, stack = ptxas_facts(ptxas_log)
    facts = ptx_facts(compiled.asm["ptx"])
    problems = []
    if spill:
        problems.append(f"{spill} bytes of register spills")
    if facts.narrow_products:
        problems.append(f"32-bit multiply of a program_id value: {facts.narrow_products[0]}")
    if facts.uses_program_id and not facts.row_offset_ops:
        problems.append("no 64-bit row-offset multiply of program_id")
    if launch.name in ("rows", "slab") and rows_aligned(launch.args[0]):
        # Rows that start 16-byte aligned must be read (and, where a gradient is written over them,
        # written) 128 bits at a time; narrower accesses cost a multiple of the instructions.
        writes_rows = launch.name == "slab" or launch.constexprs.get("WRITE_GRAD", False)
        if facts.widest_load < 128 or (writes_rows and facts.widest_store < 128):
            problems.append(
                f"16-byte aligned rows but widest load/store {facts.widest_load}/{facts.widest_store} bits (< 128)"
            )
    row_offset = facts.row_offset_ops[0].split()[0] if facts.row_offset_ops else "-"
    return Row(kernel_name, variant, arch, regs, spill, stack, compiled.metadata.shared, facts.widest_load,
               facts.widest_store, row_offset, problems)  # fmt: skip


def compile_scenario(arch: int, label: str, fn, args) -> list[Row]:
    """Runs one scenario's wrapper on meta tensors, compiles each new specialisation of its launches
    for ``arch``, and checks it. Also checks ``_launch.compiled_variants`` against the kernels'
    distinct CompiledKernels (it is the counter the no-recompilation test relies on)."""
    import torch
    from triton import knobs

    from ._launch import compiled_variants, recording

    with recording(torch.device("cuda")) as launches:
        fn(*args)
    if not launches:
        raise RuntimeError(f"{label}: the wrapper made no launch")
    rows = []
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log of each compile
    with compiling_for(arch):
        for launch in launches:
            before = compiled_variants(launch.kernel)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = warm_up(launch)
            name = launch.kernel.fn.__name__
            variant = label if len(launches) == 1 else f"{label} [{_launch_label(launch)}]"
            if compiled_variants(launch.kernel) == before:  # an earlier launch's specialisation: no new code
                first = _FIRST.get(id(compiled), "")
                if not first.startswith(label):  # not just another chunk or slab of this scenario
                    SHARED.setdefault((label, first.split(" [")[0]), None)
                continue
            _FIRST[id(compiled)] = variant
            if "Used" not in log.getvalue():
                raise RuntimeError(f"{label}: {name} was not compiled (a warm on-disk cache? set TRITON_CACHE_DIR)")
            seen = _SEEN.setdefault(name, set())
            seen.add(id(compiled))
            if compiled_variants(launch.kernel) != len(seen):
                raise RuntimeError(
                    f"compiled_variants({name}) = {compiled_variants(launch.kernel)}, but {len(seen)} distinct "
                    f"kernels were compiled: the helper misreads this Triton's JITFunction cache"
                )
            rows.append(check_variant(name, variant, arch, compiled, log.getvalue(), launch))
    return rows


_SEEN: dict = {}  # kernel name -> ids of its distinct CompiledKernels
_FIRST: dict = {}  # id(CompiledKernel) -> the variant that compiled it
SHARED: dict = {}  # (scenario, variant it reuses) -> None, in order: launches with no code of their own


def _launch_label(launch) -> str:
    named = dict(zip(launch.kernel.arg_names, launch.args))
    col0 = f" col0={named['col0']}" if "col0" in named else ""
    return f"{launch.name} {tuple(launch.args[0].shape)}{col0}"


def _run_arch_scenario(task):
    arch, index = task
    label, fn, args = scenarios()[index]
    return compile_scenario(arch, label, fn, args)


def _run_arch_list(tasks):
    rows = [row for task in tasks for row in _run_arch_scenario(task)]
    return rows, list(SHARED)


def run(archs=ARCHS, jobs: int = 1) -> tuple[list[Row], list[tuple[str, str]]]:
    """Every scenario for every arch, in ``jobs`` worker processes, one arch each (Triton's in-memory
    cache then merges equal specialisations within an arch). Returns the rows and the scenarios
    whose launches reuse another variant's code (scenario, that variant)."""
    by_arch = [[(arch, i) for i in range(len(scenarios()))] for arch in archs]
    if jobs <= 1:
        parts = [_run_arch_list(tasks) for tasks in by_arch]
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_run_arch_list, by_arch))
    shared = list(dict.fromkeys(pair for _, part in parts for pair in part))
    return [row for rows, _ in parts for row in rows], shared


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "variant", "arch", "regs", "spill B", "stack B", "smem B", "ld bits", "st bits", "row offset")
    body = [(r.kernel, r.variant, f"sm_{r.arch}", r.registers, r.spill_bytes, r.stack_bytes, r.shared_bytes,
             r.widest_load, r.widest_store, r.row_offset) for r in rows]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90,100")
    parser.add_argument(
        "--jobs", type=int, default=0, help="worker processes (default: one per arch, at most the CPUs)"
    )
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    # A fresh on-disk cache, so that every variant is really compiled (and ptxas reports on it).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dler-aot-")
    import triton

    archs = tuple(int(a) for a in opts.arch.split(","))
    jobs = opts.jobs or min(len(archs), os.cpu_count() or 1)
    start = time.perf_counter()
    rows, shared = run(archs, jobs)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    for scenario, first in shared:
        print(f"same code as above: {scenario} -> {first}")
    bad = [r for r in rows if r.problems]
    for r in bad:
        print(f"FAIL {r.kernel} {r.variant} sm_{r.arch}: {'; '.join(r.problems)}")
    n_kernels = len({r.kernel for r in rows})
    print(f"triton {triton.__version__}: {len(rows)} compiled variants of {n_kernels} kernels for "
          f"{', '.join(f'sm_{a}' for a in archs)} in {elapsed:.1f} s; {len(bad)} failed")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
