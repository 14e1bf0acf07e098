"""trainer.models.warm_start: the demo's warm start is the same bit for bit when built twice on one machine, survives
SIGTERM (resuming to the weights of an uninterrupted build), is built once by concurrent processes, and leaves no
temporaries behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

from trainer.fsutil import UserError
from trainer.models.demo import WarmStartConfig
from trainer.models.warm_start import RECORD_FILE, parse_alias, warm_start

# A toy-size warm start: 24 batches of a 2-layer, 64-wide model (about a second), enough batches to stop mid-way.
TOY = WarmStartConfig(
    examples=384, batch_sequences=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1
)
BATCHES = 24
ROOT = Path(__file__).resolve().parents[3]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, name
        assert wa[name].numpy().tobytes() == wb[name].numpy().tobytes(), name  # bit for bit, not within a tolerance


def leftovers(parent: Path, name: str) -> list[str]:
    """What a build leaves beside its folder other than the folder and its lock file."""
    return sorted(p.name for p in parent.iterdir() if p.name not in (name, f".{name}.lock"))


def test_the_same_config_on_one_machine_builds_the_same_weights_bit_for_bit(tmp_path):
    a = warm_start(TOY, tmp_path / "a" / "model", progress=False)
    b = warm_start(TOY, tmp_path / "b" / "model", progress=False)
    assert_bitwise_equal(a, b)
    record = json.loads((a / RECORD_FILE).read_text())
    assert record["warm_start"] == asdict(TOY) and record["resumed_after_batch"] == 0
    assert record["machine"]["cpu"] and record["torch_threads"] >= 1
    assert leftovers(a.parent, "model") == []
    other = warm_start(WarmStartConfig(**{**asdict(TOY), "seed": 1}), tmp_path / "c" / "model", progress=False)
    assert weights(other)["model.embed_tokens.weight"].ne(weights(a)["model.embed_tokens.weight"]).any()


def _build_script(out: Path, heartbeat: bool, hold_until: Path | None = None) -> str:
    """A build of TOY into ``out``: a heartbeat line per batch, or none; with ``hold_until``, its batches wait until
    that file exists (60 s at most)."""
    return textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from trainer.models import warm_start as w
        from trainer.models.demo import WarmStartConfig
        w.HEARTBEAT_S = 0.0 if {heartbeat} else 3600.0
        w.SAVE_EVERY = 5
        step = w._Sft.step

        def held_step(self):
            hold, deadline = {str(hold_until) if hold_until else None!r}, time.monotonic() + 60
            while hold and not Path(hold).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return step(self)

        w._Sft.step = held_step
        cfg = WarmStartConfig(**{asdict(TOY)!r})
        w.warm_start(cfg, {str(out)!r}, progress=True, say=lambda line: print(line, flush=True))
        print("DONE", flush=True)
        """
    )


def _start(script: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_sigterm_saves_the_state_and_the_next_build_resumes_to_the_uninterrupted_weights(tmp_path):
    out = tmp_path / "stopped" / "model"
    child = _start(_build_script(out, heartbeat=True))
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith("warm start (SFT): 7/"):  # past the save after batch 5
            child.send_signal(signal.SIGTERM)
            break
    rest, _ = child.communicate(timeout=120)
    output = "".join(lines) + rest
    assert child.returncode != 0, output
    assert "stopped by SIGTERM after batch " in output and "the next build resumes from it" in output, output
    assert not out.exists()
    assert leftovers(out.parent, "model") == [".model.partial"]  # the saved state, no temporary folder
    stopped_at = int(output.split("stopped by SIGTERM after batch ")[1].split("/")[0])
    assert 7 <= stopped_at < BATCHES

    said = []
    warm_start(TOY, out, progress=True, say=said.append)
    assert any(f"resuming after batch {stopped_at}" in line for line in said), said
    assert json.loads((out / RECORD_FILE).read_text())["resumed_after_batch"] == stopped_at
    assert leftovers(out.parent, "model") == []  # the partial state is gone once the folder is whole
    assert_bitwise_equal(out, warm_start(TOY, tmp_path / "whole" / "model", progress=False))


def test_concurrent_builds_of_one_warm_start_build_it_once_and_both_use_it(tmp_path):
    out, release = tmp_path / "shared" / "model", tmp_path / "release"
    first = _start(_build_script(out, heartbeat=False, hold_until=release))  # holds the lock, building, until released
    head = first.stdout.readline()
    assert "demo warm start: building" in head, head
    second = _start(_build_script(out, heartbeat=False))
    said = []
    for line in second.stdout:  # the first build is released once the second waits for it
        said.append(line)
        if "is on it; waiting for it" in line:
            break
    release.touch()
    outputs = [head + first.communicate(timeout=300)[0], "".join(said) + second.communicate(timeout=300)[0]]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert all("DONE" in o for o in outputs)
    assert "is on it; waiting for it" in outputs[1] and f"pid {first.pid} " in outputs[1], outputs[1]
    assert "building" not in outputs[1]  # it found the folder whole once the lock was its
    assert leftovers(out.parent, "model") == []


def test_a_killed_builds_temporaries_are_removed_by_the_next_build(tmp_path):
    out = tmp_path / "m" / "model"
    out.parent.mkdir()
    (out.parent / ".model.tmp-abc123").mkdir()  # what a kill -9 during the final write leaves
    (out.parent / ".model.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    warm_start(TOY, out, progress=False)
    assert leftovers(out.parent, "model") == []


def test_a_partial_state_of_other_settings_is_not_resumed(tmp_path):
    import torch

    out = tmp_path / "m" / "model"
    out.parent.mkdir()
    torch.save({"config": {"seed": 99}}, out.parent / ".model.partial")
    said = []
    warm_start(TOY, out, progress=True, say=said.append)
    assert any("not resuming" in line and "other settings" in line for line in said), said
    assert_bitwise_equal(out, warm_start(TOY, tmp_path / "whole" / "model", progress=False))


def test_the_alias_names_a_seed_and_refuses_anything_else():
    assert parse_alias("demo-verbose-arith") == WarmStartConfig()
    assert parse_alias("demo-verbose-arith?seed=2") == WarmStartConfig(seed=2)
    assert parse_alias("tiny-llama") is None and parse_alias("runs/demo-verbose-arith") is None
    for bad in ("demo-verbose-arith?seed=-1", "demo-verbose-arith?seed=", "demo-verbose-arith?lr=1"):
        with pytest.raises(UserError, match=r"demo-verbose-arith\?seed=N"):
            parse_alias(bad)
