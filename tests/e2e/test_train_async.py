"""``dler train`` with ``rollout.async_staleness`` k >= 1: the engine in its own process samples ahead.

* The batch of step b is sampled with the weights of step max(0, b-1-k) (``sampled_with_step``), every
  step trains on exactly ``prompts_per_step`` groups with spread, and the metrics record staleness,
  overlap and wait times.
* kill -9 in the middle of a run, then ``--resume``: the same metrics and weights as a run never
  interrupted (the checkpoint holds the batches sampled ahead).
* An engine process that dies is one clear error naming the engine's log, within seconds.
* Two ranks under torchrun, each with its own vLLM engine process.
"""

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_files import metrics, newest_weights, small_run, without_timings

from trainer.config import load_config
from trainer.fsutil import UserError
from trainer.run.run_log import METRICS_FILE
from trainer.train import Trainer, load_run_config, train

REPO = Path(__file__).parents[2]


def _overrides(model: Path, out: Path, steps: int, k: int = 1, engine: str = "hf") -> list[str]:
    return [*small_run(model, out, steps), f"rollout.engine={engine}", f"rollout.async_staleness={k}",
            "rollout.engine_timeout_s=120", "rollout.sampling.max_rounds=4"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def straight(demo_model, tmp_path_factory):
    """4 steps with k = 2, evaluated at step 2, checkpoints at 2 and 4: the run the others are compared with."""
    out = tmp_path_factory.mktemp("async") / "straight"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        summary = train(load_config("toy-cpu", [*_overrides(demo_model, out, 4, k=2), "run.eval_every=2"]),
                        progress=False)  # fmt: skip
    return out, summary, capture.getvalue()


def test_kill_9_then_resume_equals_the_run_never_interrupted(straight, demo_model, tmp_path):
    straight, summary, console = straight
    assert summary["finished"]
    records = metrics(straight)
    assert [r["sampled_with_step"] for r in records] == [0, 0, 0, 1]  # max(0, b - 1 - k), k = 2
    assert [r["staleness"] for r in records] == [0, 1, 2, 2]
    assert all(r["groups_with_spread"] >= 2 and not r["sampling_capped"] for r in records)
    assert all(0.0 <= r["overlap"] <= 1.0 and r["rollout_wait_s"] >= 0 for r in records)
    assert all(r["stale_dropped_groups"] == 0 for r in records)
    assert "eval step 2: accuracy" in console  # the engine between two batches, with step 2's weights
    assert any(r["grad_norm"] > 0 for r in records), "the run must actually train"

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer", "train", "--no-progress", *_overrides(demo_model, killed, 4, k=2),
           "run.eval_every=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((killed / METRICS_FILE).exists() and len(metrics(killed)) >= 3):  # checkpoint 2 is saved
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = train(load_run_config(killed), resume=True, progress=False)
    assert summary["finished"] and summary["steps"] == 4
    resumed = {r["step"]: r for r in metrics(killed)}  # step 3 ran twice: before the kill and after the resume
    assert [without_timings(resumed[s]) for s in (1, 2, 3, 4)] == [without_timings(r) for r in records]
    wa, wb = newest_weights(straight), newest_weights(killed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_an_engine_process_that_dies_is_one_clear_error_naming_its_log(demo_model, tmp_path, monkeypatch):
    update = Trainer.update

    def update_then_kill_the_engine(self, rows, step):
        if step == 2:
            os.kill(self.engine.pid, signal.SIGKILL)
        return update(self, rows, step)

    monkeypatch.setattr(Trainer, "update", update_then_kill_the_engine)
    out = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"rollout engine process \(pid \d+\) was killed by signal 9 .*engine\.log"):
        train(load_config("toy-cpu", [*_overrides(demo_model, out, 6), "eval.data=null"]), progress=False)
    assert time.monotonic() - start < 120


def test_a_resume_with_a_smaller_k_drops_what_was_sampled_ahead_too_long_ago(straight, tmp_path, capsys):
    # Checkpoint 2 of the k = 2 run holds batches 3 and 4, sampled with step 0's and step 1's weights: 2
    # versions before their updates.
    smaller, synchronous = tmp_path / "k1", tmp_path / "k0"
    for folder in (smaller, synchronous):
        shutil.copytree(straight[0], folder)
    late = ["run.steps=3", "run.eval_every=0", "eval.data=null"]
    train(load_run_config(smaller, ["rollout.async_staleness=1", *late]), resume=True, from_step=2, progress=False)
    step3 = metrics(smaller)[-1]
    assert step3["step"] == 3 and step3["stale_dropped_groups"] == 4  # both batches (2 groups each): too old
    assert step3["sampled_with_step"] == 2 and step3["staleness"] == 0  # sampled again with the resumed weights
    summary = train(load_run_config(synchronous, ["rollout.async_staleness=0", *late]), resume=True, from_step=2,
                    progress=False)  # fmt: skip
    assert summary["finished"] and summary["steps"] == 3
    assert "4 groups the asynchronous loop had sampled ahead are dropped" in capsys.readouterr().out


@pytest.mark.vllm
@pytest.mark.slow
def test_two_ranks_each_with_its_own_vllm_engine_process(demo_model, tmp_path):
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    overrides = _overrides(demo_model, out, 3, k=1, engine="vllm")
    overrides = [o for o in overrides if not o.startswith(("rollout.sampling.prompts_per_step", "algorithm.mini"))]
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "trainer", "train",
         "--no-progress", *overrides, "rollout.sampling.prompts_per_step=4", "algorithm.mini_batch_prompts=2",
         "rollout.gpu_memory_utilization=0.05", "eval.data=null"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**_env(), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    records = metrics(out)
    assert [r["sampled_with_step"] for r in records] == [0, 0, 1]
    assert all(r["groups_with_spread"] >= 4 for r in records)  # both ranks' batches, full
    assert any(r["grad_norm"] > 0 for r in records)
