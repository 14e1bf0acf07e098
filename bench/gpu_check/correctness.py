"""Stage 3, correctness: ``pytest -m gpu`` on every kernel test file with gpu tests (counts per file, kept by a
kill), a few fast CPU kernel tests in --smoke on a CPU, and a 3-step ``dler train`` of the tiny demo model."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .context import StageContext, child_env, has_cuda
from .pytest_results import outcomes_by_file, run_pytest, tally
from .runner import ROOT, run_command, tail

# On a CPU in --smoke: a few fast kernel tests, so that the pytest run and its parsing are exercised.
SMOKE_KERNEL_TESTS = ["tests/kernels/test_advantages.py", "-k", "by_hand or unbiased or bad_input"]
# The demo's policy at toy size (tests/conftest.py's demo_model, smaller still): a character tokenizer and a
# tiny Llama, built locally; nothing comes from a hub.
DEMO_MODEL = dict(examples=16, batch_sequences=16, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=2, num_kv_heads=1)  # fmt: skip
TRAIN_STEPS = 3


def gpu_test_files() -> list[str]:
    """The kernel test files with tests marked ``gpu``, test_cuda_oracles.py (the longest) last."""
    files = [p for p in sorted((ROOT / "tests" / "kernels").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    files.sort(key=lambda p: p.name == "test_cuda_oracles.py")
    return [str(p.relative_to(ROOT)) for p in files]


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
