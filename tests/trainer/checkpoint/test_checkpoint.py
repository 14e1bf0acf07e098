"""Checkpoints: exact resume, the HF export, atomicity under SIGKILL, corruption, pruning, FSDP2 on gloo."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.checkpoint.manager import CheckpointManager, export_hf, find_checkpoint, load_trainer_state
from trainer.fsutil import COMPLETE_MARKER, UserError

HELPERS = Path(__file__).parents[2] / "helpers"
REPO = Path(__file__).parents[3]
STATE = {"data": {"epoch": 0, "position": 7}, "record": {"q1": [0.5, 3]}, "best": None, "lr": 1e-3}


def make_run(model_dir: Path):
    """A float32 policy, AdamW and a warmup LambdaLR, built the way the trainer builds them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> tuple[float, float]:
    """One update on a batch drawn from the global torch generator; also draws from python's and
    numpy's, so that a resume that forgets any generator shows up in the returned values."""
    ids = torch.randint(0, 1000, (2, 12))
    draw = random.random() + float(np.random.rand())
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), draw


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def snapshot(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """Two steps, a checkpoint, two more steps: the reference a resume must reproduce."""
    run = tmp_path_factory.mktemp("run")
    seed_all(0)
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    path = CheckpointManager(run, source_model_dir=tiny_llama_dir).save(2, model, optimizer, scheduler, STATE)
    saved = snapshot(model)
    after = [train_step(model, optimizer, scheduler) for _ in range(2)]
    return SimpleNamespace(run=run, path=path, saved=saved, after=after, final=snapshot(model))


def test_resume_continues_bit_for_bit(trained, tiny_llama_dir):
    seed_all(123)  # other generators, other weights: everything must come from the checkpoint
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    state = CheckpointManager(trained.run).load(trained.path, model, optimizer, scheduler)
    assert state == STATE
    assert scheduler.last_epoch == 2
    assert [train_step(model, optimizer, scheduler) for _ in range(2)] == trained.after
    final = snapshot(model)
    assert all(torch.equal(final[name], trained.final[name]) for name in final)


def test_layout_and_trainer_state(trained):
    assert trained.path == trained.run / "checkpoints" / "step-00000002"
    names = {p.relative_to(trained.path).as_posix() for p in trained.path.rglob("*") if p.is_file()}
    for required in ("optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "manifest.json", COMPLETE_MARKER):
        assert required in names
    saved = json.loads((trained.path / "state.json").read_text())
    assert saved["step"] == 2 and saved["world_size"] == 1 and saved["torch"] == torch.__version__
    assert load_trainer_state(trained.run) == STATE
    assert find_checkpoint(trained.run) == trained.path


def test_model_folder_loads_in_transformers(trained):
    folder = export_hf(trained.run)
    assert folder == trained.path / "model"
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weights = loaded.state_dict()
    assert weights.keys() == trained.saved.keys()
    assert all(torch.equal(weights[name], trained.saved[name]) for name in weights)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied by transformers
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # stored once, HF-style
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    assert tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
    assert not (folder / COMPLETE_MARKER).exists()  # the source folder's marker is not copied


def test_sharded_weights_load_everywhere(trained, tiny_llama_dir, tmp_path):
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    CheckpointManager(trained.run).load(trained.path, model, optimizer, scheduler)
    manager = CheckpointManager(tmp_path, source_model_dir=tiny_llama_dir, max_shard_bytes=200_000)
    path = manager.save(2, model, optimizer, scheduler, STATE)
    index = json.loads((path / "model" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (path / "model" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[name], trained.saved[name]) for name in trained.saved)
    model2, optimizer2, scheduler2 = make_run(tiny_llama_dir)
    manager.load(path, model2, optimizer2, scheduler2)
    assert all(torch.equal(t, trained.saved[name]) for name, t in model2.state_dict().items())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "rel, damage, problem",
    [
        ("model/model.safetensors", flip_byte, "sha256 mismatch"),
        ("optimizer.pt", truncate, "truncated"),
        ("state.json", Path.unlink, "is missing"),
        ("rng.pt", flip_byte, "sha256 mismatch"),
        ("manifest.json", Path.unlink, "is missing"),
        (COMPLETE_MARKER, Path.unlink, "incomplete"),
    ],
)
def test_damage_is_detected(trained, tiny_llama_dir, tmp_path, rel, damage, problem):
    shutil.copytree(trained.run, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "checkpoints" / trained.path.name
    damage(path / rel)
    manager = CheckpointManager(tmp_path)
    pattern = re.escape(rel if rel != COMPLETE_MARKER else str(path)) + ".*" + re.escape(problem)
    with pytest.raises(UserError, match=pattern):
        manager.verify(path)
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    with pytest.raises(UserError, match=pattern):
        manager.load(path, model, optimizer, scheduler)


def test_a_fresh_optimizer_stays_fresh(tiny_llama_dir, tmp_path):
    """Saved before the first step: the optimizer must not be initialised by the save (that would
    change every later bias correction), and the resumed one must be as fresh."""
    seed_all(1)
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    manager = CheckpointManager(tmp_path, source_model_dir=tiny_llama_dir)
    path = manager.save(0, model, optimizer, scheduler, {})
    assert len(optimizer.state) == 0
    reference = train_step(model, optimizer, scheduler)
    model2, optimizer2, scheduler2 = make_run(tiny_llama_dir)
    train_step(model2, optimizer2, scheduler2)  # give it state that the load must drop
    manager.load(path, model2, optimizer2, scheduler2)
    assert len(optimizer2.state) == 0 and scheduler2.last_epoch == 0
    assert train_step(model2, optimizer2, scheduler2)[0] == reference[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_pruning_leftovers_and_abandoned_timelines(tiny_llama_dir, tmp_path):
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    train_step(model, optimizer, scheduler)
    manager = CheckpointManager(tmp_path, keep=2, source_model_dir=tiny_llama_dir)
    for step in (1, 2, 3, 4):
        manager.save(step, model, optimizer, scheduler, {"step": step})
    assert [step for step, _ in manager.checkpoints()] == [3, 4]

    # What killed saves leave: a temporary folder, and a renamed one whose marker never landed.
    (manager.root / ".step-00000005.tmp-x1y2").mkdir()
    (manager.root / "step-00000006").mkdir()
    assert manager.latest() == manager.step_dir(4)
    manager.save(5, model, optimizer, scheduler, {"step": 5})
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-00000004", "step-00000005"]

    flip_byte(manager.step_dir(5) / "scheduler.pt")
    # The hint is a command that works (a resume of the run, which checks every checkpoint), never an
    # older checkpoint named unchecked (`--resume RUN/checkpoints/step-N` is not a run folder).
    with pytest.raises(UserError, match=re.escape(f"`dler train --resume {tmp_path}` skips damaged")) as caught:
        manager.verify(manager.step_dir(5))
    assert str(manager.step_dir(4)) not in str(caught.value)
    good, skipped = manager.newest_good()
    assert good == manager.step_dir(4) and [p for p, _ in skipped] == [manager.step_dir(5)]
    assert "sha256 mismatch" in skipped[0][1]

    # Saving step 3 after resuming step 2 of an older timeline: 4 and 5 are moved aside, not resumed.
    manager.save(3, model, optimizer, scheduler, {"step": 3})
    assert manager.latest() == manager.step_dir(3)
    aside = sorted(p.name for p in manager.root.iterdir() if p.name.startswith("abandoned-"))
    assert [name.rsplit("-", 1)[0] for name in aside] == ["abandoned-step-00000004", "abandoned-step-00000005"]


def test_bad_trainer_state_is_refused_before_writing(tiny_llama_dir, tmp_path):
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"key 3 \(int\)"):
        manager.save(1, model, optimizer, scheduler, {"record": {3: 0.5}})
    with pytest.raises(TypeError, match=r"state\['t'\] is a Tensor"):
        manager.save(1, model, optimizer, scheduler, {"t": torch.zeros(1)})
    assert manager.latest() is None and not manager.root.exists()


def test_sigkill_during_a_save_resumes_from_the_last_complete_one(tiny_llama_dir, tmp_path):
    run, cue = tmp_path / "run", tmp_path / "blocked"
    proc = subprocess.Popen(
        [sys.executable, str(HELPERS / "ckpt_kill.py"), str(tiny_llama_dir), str(run), str(cue)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not cue.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cue.exists(), f"the helper never reached the middle of its second save:\n{proc.stderr.read()[-3000:]}"
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.kill()
        proc.wait(timeout=30)
    manager = CheckpointManager(run, source_model_dir=tiny_llama_dir)
    leftovers = [p for p in manager.root.iterdir() if p.name.startswith(".step-00000002.tmp-")]
    assert leftovers and (leftovers[0] / "model" / "model.safetensors").is_file()  # killed mid-save
    assert manager.latest() == manager.step_dir(1)
    manager.verify(manager.step_dir(1))

    model, optimizer, scheduler = make_run(tiny_llama_dir)
    assert manager.load(manager.latest(), model, optimizer, scheduler) == {"step": 1}
    train_step(model, optimizer, scheduler)
    manager.save(2, model, optimizer, scheduler, {"step": 2})
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-00000001", "step-00000002"]


def test_fsdp2_on_gloo_saves_full_state_that_a_plain_model_loads(tiny_llama_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, str(HELPERS / "ckpt_fsdp.py"), str(tiny_llama_dir), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tied_after_fully_shard"]
    assert result["state"] == {"ranks": 2}
    assert result["reload_equal"] and result["lr_equal"], "the FSDP2 model that loaded the checkpoint differs"
    assert result["losses"][0] == result["losses"][1] and result["next_step_equal"]
    # Failures on rank 0 reach rank 1 too (no hang), and a failed save leaves nothing behind.
    (save0, load0), (save1, load1) = result["errors"]["messages"]
    assert "No space left on device" in save0 and save1.startswith("rank 0: ") and save0 in save1
    assert "optimizer.pt sha256 mismatch" in load0 and load0 in load1
    assert result["errors"]["left_in_checkpoints"] == ["step-00000001"]

    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    path = Path(result["path"])
    assert json.loads((path / "state.json").read_text())["world_size"] == 2
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    CheckpointManager(tmp_path / "run").load(path, model, optimizer, scheduler)
    names = {id(p): name for name, p in model.named_parameters()}
    assert all(torch.equal(p, expected["weights"][name]) for name, p in model.named_parameters())
    assert {names[id(p)] for p in optimizer.state} == expected["optim"].keys()
    for p, state in optimizer.state.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], expected["optim"][names[id(p)]][key]), (names[id(p)], key)
    hf = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32)
    assert all(torch.equal(p, expected["weights"][name]) for name, p in hf.named_parameters())


@pytest.mark.vllm
def test_vllm_serves_the_model_folder(tiny_llama_dir, tmp_path):
    """vLLM loads a checkpoint's model/ as is (tied head stored once) and computes what the trainer's
    weights compute. Large random weights, so that greedy decoding is not one repeated token."""
    model, optimizer, scheduler = make_run(tiny_llama_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15, generator=gen)
    path = CheckpointManager(tmp_path, source_model_dir=tiny_llama_dir).save(1, model, optimizer, scheduler, {})
    spec = {"prompts": ["What is 3 + 4?"], "chat": True, "max_tokens": 16, "temperature": 0.0, "dtype": "float32"}
    out = subprocess.run(
        [sys.executable, str(HELPERS / "vllm_generate.py"), str(path / "model"), json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    sample = result["groups"][0][0]
    prompt_ids = AutoTokenizer.from_pretrained(path / "model")(result["prompts"][0]).input_ids
    ids = torch.tensor([prompt_ids + sample["token_ids"]])
    with torch.no_grad():
        logits = model.eval()(ids).logits[0, len(prompt_ids) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample["token_ids"])[:, None])[:, 0]
    assert len(set(sample["token_ids"])) > 1
    torch.testing.assert_close(torch.tensor(sample["logprobs"]), expected, atol=1e-4, rtol=0)
