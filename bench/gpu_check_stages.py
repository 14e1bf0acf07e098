"""What each stage of ``gpu_check.py`` does, run inside the stage's own process (``--stage-child NAME``).

Every stage gets a :class:`StageContext` and fills ``ctx.record``: ``status`` (passed / failed / skipped /
not run), ``reason``, ``figures`` (every number, for gpu_report.json), ``tables`` (for gpu_report.md),
``parts`` (sub-checks, each with its own status) and ``targets`` (the performance targets, met or not).
``ctx.save()`` writes it as the stage goes, so a stage killed at its budget keeps what it finished.
The measuring code is the benchmark scripts' own (bench_policy_loss, bench_linear_policy_loss,
bench_train_step): this file only chooses shapes and reads their results.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from gpu_check_runner import run_command, tail

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL_PACKAGES = ("liger_kernel", "math_verify", "vllm", "flash_attn")


@dataclass
class StageContext:
    name: str
    out: Path
    smoke: bool
    wheels: Path | None
    budget_s: float = 600.0  # the parent kills this process then; parts that start commands fit inside it
    record: dict = field(default_factory=lambda: dict(status="failed", reason="did not finish", figures={}))
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        path = self.out / "stages" / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(path)  # a stage killed mid-write leaves the previous complete file

    def earlier(self, stage: str) -> dict:
        """An earlier stage's figures ({} if it did not run or failed before measuring)."""
        path = self.out / "stages" / f"{stage}.json"
        return json.loads(path.read_text()).get("figures", {}) if path.exists() else {}

    def part(self, name: str, status: str, reason: str = "", **figures) -> dict:
        part = dict(name=name, status=status, reason=reason, **figures)
        self.record.setdefault("parts", []).append(part)
        self.save()
        return part

    def finish_from_parts(self) -> None:
        """failed if any part failed, passed if any passed, else skipped (each part keeps its reason)."""
        statuses = [p["status"] for p in self.record.get("parts", [])]
        if "failed" in statuses:
            failed = [p["name"] for p in self.record["parts"] if p["status"] == "failed"]
            self.record.update(status="failed", reason="failed: " + ", ".join(failed))
        elif "passed" in statuses:
            self.record.update(status="passed", reason="")
        else:
            self.record.update(status="skipped", reason="; ".join(p["reason"] for p in self.record.get("parts", [])))
        self.save()


def judge_only_on_a_gpu(ctx: StageContext, targets: list[dict], cuda: bool) -> list[dict]:
    """The targets are for the GPU shapes: a CPU or --smoke run shows the figures, judges none."""
    if cuda and not ctx.smoke:
        return targets
    why = "smoke mode: tiny shapes" if ctx.smoke else "a CPU run"
    for t in targets:
        if t.get("met") is not None:
            t.update(met=None, reason=f"{why}, not judged (the target is for the GPU shapes)")
    return targets


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env(**extra) -> dict:
    """The environment of a command a stage starts: this process's (its PYTHONPATH names the checkout)."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------------------- 1. environment


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
    machine's environment; gpu_check.py puts that folder on every later stage's PYTHONPATH."""
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


# ----------------------------------------------------------------------------------------------- 2. build


def build(ctx: StageContext) -> None:
    """The extension built in place for the local GPU (CUDA kernels included), then loaded in a fresh
    process: its CUDA backend must be usable. ``setup.py build_ext --inplace`` changes nothing outside
    the checkout (no install); the later stages import the checkout's dler_kernels."""
    from dler_kernels import available_backends

    if ctx.smoke:
        backends = available_backends()
        ctx.record.update(status="skipped", reason="smoke mode: the CI builds the extension (make setup)",
                          figures=dict(backends_in_use=backends))  # fmt: skip
        return ctx.save()
    if not has_cuda():
        ctx.record.update(status="skipped", reason="no CUDA device")
        return ctx.save()
    import torch

    # For this GPU only: a TORCH_CUDA_ARCH_LIST inherited from the container could name several architectures
    # (nvcc time multiplies) or ones CUDA 13 no longer compiles for (below 7.5), failing a good build.
    major, minor = torch.cuda.get_device_capability()
    env = child_env(DLER_BUILD_CUDA=1, MAX_JOBS=os.cpu_count() or 4, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}")
    log = ctx.out / "logs" / "build-ext.log"
    # What is left after the build loads the result in a fresh process (~10 s) and reports.
    done = run_command([sys.executable, "setup.py", "build_ext", "--inplace"], ctx.remaining() - 20, env=env,
                       cwd=ROOT, log=log)  # fmt: skip
    ctx.record["figures"].update(build_seconds=round(done.seconds, 1), build_log=str(log.relative_to(ctx.out)))
    if done.returncode != 0:
        why = "timed out" if done.returncode is None else f"exit {done.returncode}"
        ctx.record.update(status="failed", reason=f"setup.py build_ext --inplace: {why}", error=tail(done.output))
        return ctx.save()
    # The answer carries a prefix: stderr is merged into the output, and a warning may follow the line.
    probe = "import json, dler_kernels; print('BACKENDS=' + json.dumps(dler_kernels.available_backends()))"
    loaded = run_command([sys.executable, "-c", probe], max(ctx.remaining() - 2, 5), env=child_env(), cwd=ROOT)
    answers = [line for line in loaded.output.splitlines() if line.startswith("BACKENDS=")]
    backends = json.loads(answers[-1].removeprefix("BACKENDS=")) if loaded.returncode == 0 and answers else {}
    ctx.record["figures"]["backends_after_build"] = backends
    if not str(backends.get("cuda", "")).startswith("yes"):
        ctx.record.update(status="failed", reason=f"built, but the CUDA backend is not usable: {backends.get('cuda')}",
                          error=tail(loaded.output))  # fmt: skip
    else:
        ctx.record.update(status="passed", reason="")
    ctx.save()


# ----------------------------------------------------------------------------------------- 3. correctness

# On a CPU in --smoke: a few fast kernel tests, so that the pytest run and its parsing are exercised.
SMOKE_KERNEL_TESTS = ["tests/kernels/test_advantages.py", "-k", "by_hand or unbiased or bad_input"]
# The demo's policy at toy size (tests/conftest.py's demo_model, smaller still): a character tokenizer and a
# tiny Llama, built locally; nothing comes from a hub.
DEMO_MODEL = dict(examples=16, batch_sequences=16, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=2, num_kv_heads=1)  # fmt: skip
TRAIN_STEPS = 3


def pytest_counts(junit: Path) -> dict:
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                failed_tests=failed[:30])  # fmt: skip


# A test's outcome as ``pytest -v`` prints it while it runs: what a killed pytest leaves of its counts.
VERBOSE_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)
OUTCOMES = dict(PASSED="passed", XFAIL="passed", XPASS="passed", FAILED="failed", ERROR="failed", SKIPPED="skipped")


def verbose_outcomes(output: str) -> dict[str, str]:
    """{test id: passed / failed / skipped} from ``pytest -v`` output, each test's line as it finished (a test
    that errors in teardown prints a second line: the last one counts)."""
    return {node: OUTCOMES[outcome] for node, outcome in VERBOSE_OUTCOME.findall(output)}


def junit_outcomes(junit: Path) -> list[tuple[str, str, str, float]]:
    """(classname, name, passed / failed / skipped, seconds) of every test case of a junit report."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        cases.append((case.get("classname", ""), case.get("name", ""), outcome, float(case.get("time", 0.0))))
    return cases


def tally(outcomes: dict[str, str]) -> dict:
    """Passed / failed / skipped counts (and the first failed tests) of {test id: outcome}."""
    failed = [node for node, outcome in outcomes.items() if outcome == "failed"]
    passed = sum(outcome == "passed" for outcome in outcomes.values())
    skipped = sum(outcome == "skipped" for outcome in outcomes.values())
    return dict(passed=passed, failed=len(failed), skipped=skipped, failed_tests=failed[:30])


def counts_from_verbose_output(output: str) -> dict:
    """The counts a killed pytest leaves in its ``-v`` output."""
    return tally(verbose_outcomes(output))


def run_pytest(
    ctx: StageContext, label: str, selection: list[str], env: dict, timeout: float, why_skipped: str = ""
) -> None:
    junit = ctx.out / "logs" / f"pytest-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label).strip('-')}.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *selection, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    done = run_command(cmd, timeout, env=env, cwd=ROOT)
    if done.returncode is None:
        partial = counts_from_verbose_output(done.output)
        ctx.part(label, "failed", f"timed out after {timeout:.0f} s (counts: the tests done by then)",
                 command=" ".join(cmd[1:]), seconds=round(done.seconds, 1), **partial,
                 error=tail(done.output))  # fmt: skip
        return
    if not junit.exists():
        ctx.part(label, "failed", f"pytest exited {done.returncode} with no report", error=tail(done.output))
        return
    counts = pytest_counts(junit)
    if counts["failed"]:
        status, reason = "failed", f"{counts['failed']} failed"
    elif done.returncode not in (0, 5):  # 5: nothing selected, which the counts report as all skipped
        status, reason = "failed", f"pytest exited with status {done.returncode}"
    elif counts["passed"] == 0:
        status, reason = "skipped", f"all {counts['skipped']} selected tests skipped{why_skipped}"
    else:
        status, reason = "passed", ""
    ctx.part(label, status, reason, command="pytest " + " ".join(selection), seconds=round(done.seconds, 1),
             **counts, error=tail(done.output) if status == "failed" else "")  # fmt: skip


def gpu_test_files() -> list[str]:
    """The kernel test files with tests marked ``gpu``, test_cuda_oracles.py (the longest) last."""
    files = [p for p in sorted((ROOT / "tests" / "kernels").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    files.sort(key=lambda p: p.name == "test_cuda_oracles.py")
    return [str(p.relative_to(ROOT)) for p in files]


def outcomes_by_file(files: list[str], killed: bool, output: str, junit: Path) -> tuple[dict, dict]:
    """({file: {test id: outcome}}, {file: seconds}) from the junit report, or from the ``-v`` lines of a killed
    pytest (which wrote none, nor any time); the key None collects what belongs to no file of ``files`` (a
    collection error, say)."""
    grouped: dict[str | None, dict[str, str]] = {}
    seconds: dict[str | None, float] = {}
    if killed:
        for node, outcome in verbose_outcomes(output).items():
            path = node.split("::")[0]
            grouped.setdefault(path if path in files else None, {})[node] = outcome
        return grouped, seconds
    modules = {f.removesuffix(".py").replace("/", "."): f for f in files}
    for classname, name, outcome, took in junit_outcomes(junit):
        path = next((f for m, f in modules.items() if classname == m or classname.startswith(m + ".")), None)
        grouped.setdefault(path, {})[f"{path or classname}::{name}"] = outcome
        seconds[path] = seconds.get(path, 0.0) + took
    return grouped, seconds


def run_gpu_tests(ctx: StageContext, env: dict, share_s: float, why_skipped: str) -> None:
    """``pytest -m gpu`` on every kernel test file with gpu tests, in one process (one start-up, one Triton
    cache) killed at ``share_s``; one part per file with its counts, from the junit report, or, when pytest
    was killed, from the lines ``-v`` printed as each test ended: the files done keep their counts, the file
    cut off reports those it finished, the files not reached are failed parts (not run: out of time)."""
    files = gpu_test_files()
    junit = ctx.out / "logs" / "pytest-gpu.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    done = run_command(cmd, share_s, env=env, cwd=ROOT, log=ctx.out / "logs" / "pytest-gpu.log")
    killed = done.returncode is None
    if not killed and not junit.exists():
        ctx.part("kernel tests on CUDA (-m gpu)", "failed", f"pytest exited {done.returncode} with no report",
                 command=" ".join(cmd[1:]), error=tail(done.output))  # fmt: skip
        return
    grouped, seconds = outcomes_by_file(files, killed, done.output, junit)
    reached = [f for f in files if grouped.get(f)]
    cut_off = (reached[-1] if reached else files[0]) if killed else None
    for path in files:
        label = f"kernel tests on CUDA (-m gpu, {Path(path).name})"
        counts = tally(grouped.get(path, {}))
        timing = dict(seconds=round(seconds[path], 1)) if path in seconds else {}
        if path == cut_off:
            ctx.part(label, "failed", f"timed out: pytest killed at the end of the kernel tests' {share_s:.0f} s "
                     "(counts: the tests done by then)", **counts, error=tail(done.output))  # fmt: skip
        elif killed and path not in reached:
            ctx.part(label, "failed", "not run: out of time (pytest was killed before this file)", **counts)
        elif counts["failed"]:
            ctx.part(label, "failed", f"{counts['failed']} failed", **counts, **timing, error=tail(done.output))
        elif counts["passed"] == 0:
            ctx.part(label, "skipped", f"all {counts['skipped']} selected tests skipped{why_skipped}", **counts,
                     **timing)  # fmt: skip
        else:
            ctx.part(label, "passed", "", **counts, **timing)
    if grouped.get(None) or (not killed and done.returncode not in (0, 1, 5)):
        ctx.part("kernel tests on CUDA (-m gpu): pytest itself", "failed",
                 f"pytest exited with status {done.returncode}" if done.returncode not in (0, 1, 5) else
                 "tests outside the selected files failed (a collection error?)",
                 **tally(grouped.get(None, {})), error=tail(done.output))  # fmt: skip


def train_smoke(ctx: StageContext, cuda: bool, timeout: float) -> None:
    """``dler train`` for 3 steps on the tiny demo model with the transformers engine (vLLM is not on the GPU
    machine), the fused LM-head path (the default), FSDP2 on one process; the loop calls the engine's
    sleep / wake_up around every update. The transformers engine reports that it cannot sleep (its calls are
    no-ops that check their tags): the report's note says so, from the engine's own ``can_sleep``."""
    from trainer.models.demo import WarmStartConfig
    from trainer.models.warm_start import warm_start

    start = time.perf_counter()
    model = warm_start(WarmStartConfig(**DEMO_MODEL), out=ctx.out / "work" / "demo-model", progress=False)
    run_out = ctx.out / "work" / "train"
    shutil.rmtree(run_out, ignore_errors=True)
    overrides = [
        f"model.path={model}", f"run.out={run_out}", f"run.steps={TRAIN_STEPS}", "run.save_every=0",
        f"run.device={'cuda' if cuda else 'cpu'}", "rollout.engine=hf", "rollout.dtype=float32",
        "rollout.sampling.prompts_per_step=2", "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.dynamic_sampling=false", "rollout.sampling.max_tokens=24",
        # Kimi's length reward has spread even when every answer is wrong: the update gets a gradient.
        "reward.penalty.name=kimi", "reward.penalty.length_budget=24", "algorithm.mini_batch_prompts=1",
        "algorithm.use_fused_linear=true", "fsdp.enabled=true", "optim.lr=1e-2", "eval.data=null",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "trainer", "train", "toy-cpu", *overrides, "--no-progress"]
    done = run_command(cmd, max(timeout - (time.perf_counter() - start), 5), env=child_env(), cwd=ROOT,
                       log=ctx.out / "logs" / "train.log")  # fmt: skip
    label = f"dler train, {TRAIN_STEPS} steps ({'cuda' if cuda else 'cpu'}, hf engine, fused head, FSDP2)"
    if done.returncode != 0:
        why = "timed out" if done.returncode is None else f"exit {done.returncode}"
        ctx.part(label, "failed", why, command="python -m trainer train " + " ".join(overrides),
                 error=tail(done.output))  # fmt: skip
        return
    records = [json.loads(line) for line in (run_out / "metrics.jsonl").read_text().splitlines()]
    problems = []
    if len(records) != TRAIN_STEPS:
        problems.append(f"{len(records)} steps recorded, not {TRAIN_STEPS}")
    if "cannot take the fused LM-head path" in done.output:
        problems.append("the fused LM-head path was not taken")
    if any(r["num_nonfinite"] for r in records):
        problems.append("non-finite losses")
    if not any(r["grad_norm"] > 0 for r in records):
        problems.append("no step had a gradient")
    steps = [{k: r[k] for k in ("step", "loss", "grad_norm", "entropy", "mean_response_length", "step_s")}
             for r in records]  # fmt: skip
    can_sleep = engine_can_sleep(model, cuda)
    ctx.part(label, "failed" if problems else "passed", "; ".join(problems), seconds=round(done.seconds, 1),
             steps=steps, engine_can_sleep=can_sleep, error=tail(done.output) if problems else "")  # fmt: skip
    ctx.record.setdefault("notes", []).append(sleep_note(can_sleep))
    ctx.save()


def engine_can_sleep(model: Path, cuda: bool) -> bool:
    """What the rollout engine of the train run (the transformers one) says of itself: whether its ``sleep``
    frees device memory (``trainer.rollout.contract.RolloutEngine.can_sleep``)."""
    from trainer.rollout.hf_engine import HFEngine

    engine = HFEngine(model, device="cuda" if cuda else "cpu")
    try:
        return engine.can_sleep
    finally:
        engine.close()


def sleep_note(can_sleep: bool) -> str:
    """What the 3-step train showed of the loop's engine sleep / wake sequence, and what it did not."""
    if can_sleep:
        return ("Engine sleep/wake: the loop's sleep(), wake_up(['weights']) and wake_up(['kv_cache']) ran with an "
                "engine that reports it can sleep: its device memory was released and re-allocated around each "
                "update.")  # fmt: skip
    return ("Engine sleep/wake: the loop's sleep(), wake_up(['weights']) and wake_up(['kv_cache']) calls ran in "
            "their order with the transformers engine, which reports that it cannot sleep (can_sleep = False: both "
            "free and re-allocate nothing, they only check their tags). Releasing and re-allocating a sleeping "
            "engine's memory (vLLM's sleep mode) was NOT exercised: vLLM is not on the GPU machine.")  # fmt: skip


def correctness(ctx: StageContext) -> None:
    """The kernel tests marked ``gpu`` (on a CPU too: there they are collected, under the packages of the
    machine that runs this, and skipped), a few fast CPU kernel tests in --smoke on a CPU, then the train."""
    cuda = has_cuda()
    # tests/conftest.py turns the Triton interpreter on unless told otherwise: on a GPU the kernels must compile.
    env = child_env(TRITON_INTERPRET=0) if cuda else child_env()
    run_gpu_tests(ctx, env, ctx.budget_s * 0.6, why_skipped="" if cuda else ": no CUDA device")
    if ctx.smoke and not cuda:
        run_pytest(ctx, "kernel tests, CPU subset", SMOKE_KERNEL_TESTS, env, ctx.budget_s * 0.2)
    train_smoke(ctx, cuda, ctx.remaining() - 5)
    ctx.finish_from_parts()


# -------------------------------------------------------------------------------------- 4. kernel benchmark

KERNEL_TARGETS = dict(copy_bw=0.80, vs_liger=1.5, vs_eager=8.0, peak_vs_eager=0.25)
# The slowest to measure (it compiles for every shape) and the least important: measured last, so that a stage
# killed at its budget has lost only it.
COMPILED_REFERENCE = "torch.compile reference"


def kernel_implementations(bench_policy_loss, args, device: str) -> list[str]:
    """The benchmark's implementations, in the order they are measured: torch.compile last. Read from
    ``implementations`` on tiny inputs (nothing is run or compiled)."""
    import argparse

    tiny_args = argparse.Namespace(**{**vars(args), "n": 64, "vocab": 128, "seq_len": 64})
    tiny = bench_policy_loss.make_inputs(64, 128, bench_policy_loss.DTYPES[args.dtype], device, 64)
    names = list(bench_policy_loss.implementations(tiny_args, tiny))
    return [n for n in names if n != COMPILED_REFERENCE] + [n for n in names if n == COMPILED_REFERENCE]


def kernel_bench(ctx: StageContext) -> None:
    """bench_policy_loss on the target shapes (bf16, V=151936, N in {4096, 16384}); --smoke: one tiny shape.
    Each implementation is measured in its own ``measure`` call and saved to the stage's JSON at once (a stage
    killed at its budget keeps every figure it measured). torch.compile comes last, compiled afresh for each
    N with static shapes (``torch.compiler.reset`` and no automatic dynamic shapes: a recompile for the second
    N would otherwise trace a dynamic-shape graph, a different program from the one a training loop with a
    fixed shape runs); its compilation happens in the untimed first call."""
    import bench_policy_loss
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    copy_gbps = ctx.earlier("environment").get("copy", {}).get("gbps") if cuda else None
    if ctx.smoke:
        shapes = [["--n", "256", "--vocab", "2048", "--seq-len", "64", "--dtype", "bf16" if cuda else "fp32"]]
    else:
        shapes = [["--n", str(n), "--vocab", "151936", "--dtype", "bf16"] for n in (4096, 16384)]
    exclude = {}
    if ctx.smoke and not cuda:
        exclude[COMPILED_REFERENCE] = "smoke mode on the CPU: compiling takes longer than the whole smoke run"
    results = ctx.record["figures"].setdefault("shapes", [])
    ctx.record["tables"], ctx.record["targets"] = [], []
    for argv in shapes:
        args = bench_policy_loss.parse_args([*argv, "--repeats", "2", "--memory", "0"])
        names = kernel_implementations(bench_policy_loss, args, device)
        result = None
        for name in names:
            alone = {other: "measured in its own call" for other in names if other != name}
            if name == COMPILED_REFERENCE:
                torch.compiler.reset()
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                one = bench_policy_loss.measure(args, copy_gbps=copy_gbps, exclude={**alone, **exclude})
            copy_gbps = one["copy_gbps"]  # measured by the first call when stage 1 had none
            if result is None:
                result = {**one, "rows": [], "not_run": {}, "failed": {}}
                results.append(result)
            result["rows"] += one["rows"]
            result["not_run"].update({k: v for k, v in one["not_run"].items() if k == name})
            result["failed"].update(one["failed"])
            save_kernel_shape(ctx, results, cuda)
        if not cuda:
            result["not_run"]["dler triton"] = "needs CUDA (the interpreter is a correctness tool, not a speed)"
            result["not_run"]["liger triton_grpo_loss"] = "needs CUDA"
            save_kernel_shape(ctx, results, cuda)
        if cuda:
            torch.cuda.empty_cache()
    ctx.record.update(status="passed" if all(r["rows"] for r in results) else "failed",
                      reason="" if all(r["rows"] for r in results) else "no implementation ran")  # fmt: skip
    failed = {k: v for r in results for k, v in r["failed"].items()}
    if failed:
        ctx.record.update(status="failed", reason="failed: " + ", ".join(sorted(failed)))
    ctx.save()


def save_kernel_shape(ctx: StageContext, results: list[dict], cuda: bool) -> None:
    """The tables and targets from every figure measured so far, written to the stage's JSON."""
    for result in results:
        result["targets"] = judge_only_on_a_gpu(ctx, kernel_targets(result), cuda)
    ctx.record["tables"] = [kernel_table(r) for r in results]
    ctx.record["targets"] = [t for r in results for t in r["targets"]]
    ctx.save()


def kernel_targets(result: dict) -> list[dict]:
    rows = {r["impl"]: r for r in result["rows"]}
    n = result["args"]["n"]
    ours = rows.get("dler triton")
    eager, liger = rows.get("eager reference"), rows.get("liger triton_grpo_loss")
    out = []

    def target(what, value, goal, met):
        out.append(dict(target=f"N={n}: {what}", value=value, goal=goal, met=met))

    if ours is None:
        why = result["not_run"].get("dler triton") or result["failed"].get("dler triton") or "not run"
        target("dler triton", None, "-", None)
        out[-1]["reason"] = why
        return out
    copy = result["copy_gbps"]
    target("% of copy bandwidth", 100 * ours["gbps"] / copy if copy else None, ">= 80%",
           ours["gbps"] >= KERNEL_TARGETS["copy_bw"] * copy if copy else None)  # fmt: skip
    target("speed-up over Liger", liger["ms"] / ours["ms"] if liger else None, ">= 1.5x",
           liger["ms"] / ours["ms"] >= KERNEL_TARGETS["vs_liger"] if liger else None)  # fmt: skip
    if not liger:
        why = result["not_run"].get("liger triton_grpo_loss") or result["failed"].get("liger triton_grpo_loss")
        out[-1]["reason"] = f"not run: {why}" if why else "not measured before the stage ended"
    target("speed-up over eager", eager["ms"] / ours["ms"] if eager else None, ">= 8x",
           eager["ms"] / ours["ms"] >= KERNEL_TARGETS["vs_eager"] if eager else None)  # fmt: skip
    peaks = eager and eager["peak_bytes"] and ours["peak_bytes"] is not None
    target("peak memory / eager's", ours["peak_bytes"] / eager["peak_bytes"] if peaks else None, "<= 0.25",
           ours["peak_bytes"] <= KERNEL_TARGETS["peak_vs_eager"] * eager["peak_bytes"] if peaks else None)  # fmt: skip
    return out


def kernel_table(result: dict) -> dict:
    a, copy, logits = result["args"], result["copy_gbps"], result["logits_bytes"]
    eager = next((r["ms"] for r in result["rows"] if r["impl"] == "eager reference"), None)
    rows = []
    for r in result["rows"]:
        rows.append([r["impl"], f"{r['ms']:.3f}", f"{r['gbps']:.1f}", f"{100 * r['gbps'] / copy:.1f}%" if copy else "-",
                     f"{r['peak_bytes'] / logits:.2f}x" if r["peak_bytes"] is not None else "-",
                     f"{eager / r['ms']:.2f}x" if eager else "-"])  # fmt: skip
    for name, why in {**result["not_run"], **result["failed"]}.items():
        status = "failed" if name in result["failed"] else "not run"
        rows.append([name, f"{status}: {why}", "", "", "", ""])
    return dict(title=f"Policy loss fwd+bwd, N={a['n']} V={a['vocab']} {a['dtype']} ({result['device']})",
                columns=["implementation", "median ms", "GB/s", "% copy BW", "peak / logits", "vs eager"],
                rows=rows)  # fmt: skip


# ------------------------------------------------------------------------------------ 5. fused-linear bench


def linear_bench(ctx: StageContext) -> None:
    """bench_linear_policy_loss on the target (H, V) shapes at N=16384, bf16; --smoke: one tiny shape."""
    import bench_linear_policy_loss
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if ctx.smoke:
        argv = ["--n", "256", "--seq-len", "64", "--dtype", "bf16" if cuda else "fp32"]
        shapes = [(32, 1024)]
    else:
        argv, shapes = ["--n", "16384"], bench_linear_policy_loss.ISSUE_SHAPES
    args = bench_linear_policy_loss.parse_args([*argv, "--repeats", "2", "--memory", "0"])
    results = ctx.record["figures"].setdefault("shapes", [])
    ctx.record["tables"] = []
    for hidden, vocab in shapes:
        result = bench_linear_policy_loss.bench_shape(args, hidden, vocab, device)
        result["targets"] = judge_only_on_a_gpu(ctx, linear_targets(result, args.n), cuda)
        results.append(result)
        ctx.record["tables"].append(linear_table(result, args))
        ctx.record.setdefault("targets", []).extend(result["targets"])
        ctx.save()
        if cuda:
            torch.cuda.empty_cache()
    failed = sorted({k for r in results for k in r["failed"]})
    reason = ("failed: " + ", ".join(failed)) if failed else ""
    ctx.record.update(status="failed" if failed else "passed", reason=reason)
    ctx.save()


def linear_targets(result: dict, n: int) -> list[dict]:
    rows = {r["impl"]: r for r in result["rows"]}
    shape = f"N={n} H={result['hidden']} V={result['vocab']}"
    ours, mm = rows.get("dler linear_policy_loss"), rows.get("3 matmuls (torch.mm)")
    liger, chunked = rows.get("liger LigerFusedLinearGRPOLoss"), rows.get("chunked torch (verl-style, 512)")
    if ours is None:
        return [dict(target=f"{shape}: dler linear_policy_loss", value=None, goal="-", met=None, reason="did not run")]
    peak = ours["peak_bytes"]
    out = [
        dict(target=f"{shape}: time / 3 matmuls", value=ours["ms"] / mm["ms"], goal="<= 1.3x",
             met=ours["ms"] <= 1.3 * mm["ms"]),
        dict(target=f"{shape}: peak extra / logits",
             value=None if peak is None else 100 * peak / result["logits_bytes"],
             goal="< 5%", met=None if peak is None else peak < 0.05 * result["logits_bytes"],
             reason="" if peak is not None else "not measured in smoke mode"),
        dict(target=f"{shape}: faster than chunked torch", value=chunked["ms"] / ours["ms"] if chunked else None,
             goal="> 1x", met=chunked["ms"] > ours["ms"] if chunked else None),
        dict(target=f"{shape}: faster than Liger", value=liger["ms"] / ours["ms"] if liger else None, goal="> 1x",
             met=liger["ms"] > ours["ms"] if liger else None,
             reason="" if liger else "not run: " + result["not_run"].get("liger LigerFusedLinearGRPOLoss", "missing")),
    ]  # fmt: skip
    return out


def linear_table(result: dict, args) -> dict:
    mm = next(r["ms"] for r in result["rows"] if r["impl"].startswith("3 matmuls"))
    rows = []
    for r in result["rows"]:
        peak = r["peak_bytes"]
        rows.append([r["impl"], f"{r['ms']:.2f}", f"{r['ms'] / mm:.2f}x", f"{r['tflops']:.1f}",
                     "-" if peak is None else f"{peak / 2**20:.1f} MiB",
                     "-" if peak is None else f"{100 * peak / result['logits_bytes']:.2f}%"])  # fmt: skip
    for name, why in {**result["not_run"], **result["failed"]}.items():
        status = "failed" if name in result["failed"] else "not run"
        rows.append([name, f"{status}: {why}", "", "", "", ""])
    return dict(title=f"Fused-linear policy loss fwd+bwd, N={args.n} H={result['hidden']} V={result['vocab']} "
                      f"{args.dtype}",
                columns=["implementation", "median ms", "vs 3 mm", "TFLOP/s (6NVH)", "peak extra", "% logits"],
                rows=rows)  # fmt: skip


# --------------------------------------------------------------------------------------- 6. train step


def train_step(ctx: StageContext) -> None:
    """bench_train_step under FSDP2 on one process: Qwen2-1.5B config (random weights), bf16 compute, fp32
    master weights; MFU against the datasheet peak (the script's) and the matmul rate of stage 1."""
    import bench_train_step
    import torch

    cuda = torch.cuda.is_available()
    argv = ["--fsdp"]
    if not ctx.smoke:  # the script's CUDA defaults (Qwen2-1.5B, 16 x 4096 tokens) with fewer steps: the budget
        argv += ["--steps", "3", "--warmup", "1"]
    else:
        argv += ["--model-config", "tiny", "--seq-len", "64", "--prompt-len", "16", "--sequences", "2",
                 "--micro-batch-tokens", "128", "--steps", "2", "--warmup", "1",
                 "--old-logprobs", "random"]  # fmt: skip
    args = bench_train_step.parse_args(argv)
    try:
        result = bench_train_step.run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    bench_train_step.print_result(result)
    matmul = ctx.earlier("environment").get("matmul", {}).get("tflops")
    for row in result["rows"]:
        row["mfu_vs_measured_matmul"] = row["tflops"] / matmul if row["tflops"] is not None and matmul else None
    ctx.record["figures"] = {k: v for k, v in result.items() if k not in ("last_metrics",)}
    ctx.record["figures"]["measured_matmul_tflops"] = matmul
    step = next(r for r in result["rows"] if r["phase"] == "fwd+bwd")
    target = dict(target=f"{args.model_config} fwd+bwd MFU (vs {result['peak_source']})",
                  value=None if step["mfu"] is None else 100 * step["mfu"], goal=">= 40%",
                  met=None if step["mfu"] is None else step["mfu"] >= 0.40,
                  reason="" if step["mfu"] is not None else result["peak_source"])  # fmt: skip
    ctx.record["targets"] = judge_only_on_a_gpu(ctx, [target], cuda)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    ctx.record["tables"] = [dict(
        title=f"Policy update, {args.model_config} ({result['params'] / 1e6:.1f}M params), {result['mode']}, "
              f"{result['tokens_per_step']} tokens/step [{result['device']}]",
        columns=["phase", "median s", "tokens/s", "TFLOP/s", "MFU (peak)", "MFU (measured matmul)"],
        rows=[[r["phase"], f"{r['median_s']:.4f}", fmt(r["tokens_per_s"], ".1f"), fmt(r["tflops"], ".3f"),
               fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"),
               fmt(None if r["mfu_vs_measured_matmul"] is None else 100 * r["mfu_vs_measured_matmul"], ".1f")]
              for r in result["rows"]],
    )]  # fmt: skip
    ctx.record["notes"] = [flops_note(result)]
    ctx.record.update(status="passed", reason="")
    ctx.save()


def flops_note(result: dict) -> str:
    """How bench_train_step counts the model FLOPs and which steps it times (its docstring has the detail)."""
    a = result["args"]
    return (f"Model FLOPs per step ({result['flops_per_step'] / 1e12:.3f} TFLOP): 6 * P * T with P the "
            f"{result['non_embedding_params'] / 1e6:.1f}M non-embedding parameters and T the "
            f"{result['tokens_per_step']} tokens, + 6 * V * H * T_resp for the LM head at the "
            f"{result['response_tokens_per_step']} response positions, + the sum over sequences of "
            "6 * layers * d_attn * S^2 for causal attention; recomputation is not counted. Times are medians over "
            f"{a['steps']} timed steps after {a['warmup']} untimed warm-up step(s) (compilation, autotuning and "
            "allocator growth excluded), each between device synchronisations. MFU = FLOPs / median seconds / "
            "peak.")  # fmt: skip


STAGE_FUNCTIONS = dict(environment=environment, build=build, correctness=correctness, kernel_bench=kernel_bench,
                       linear_bench=linear_bench, train_step=train_step)  # fmt: skip
