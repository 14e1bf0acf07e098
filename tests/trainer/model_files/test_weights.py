"""Model folders: safetensors weights only, and a damaged file reported by name, by every reader of a model
folder (the policy, both rollout engines, dler eval, dler merge) before any weight is read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.config import FSDPConfig, ModelConfig
from trainer.dist.distributed_env import DistEnv
from trainer.dist.fsdp import check_weights, load_policy
from trainer.fsutil import UserError
from trainer.rollout.contract import CheckpointLayout
from trainer.rollout.hf_engine import HFEngine

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BENCHMARK = Path(__file__).parents[2] / "fixtures" / "benchmarks" / "amc.jsonl"
_NOT_WEIGHTS = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def pickle_only(tmp_path, tiny_llama_dir) -> Path:
    """The tiny model's folder with its weights as a pickle (``pytorch_model.bin``) instead of safetensors."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in _NOT_WEIGHTS:
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, folder / name)
    torch.save(load_file(str(tiny_llama_dir / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def truncated(tmp_path, tiny_llama_dir) -> Path:
    """The tiny model's folder with its model.safetensors cut to half its size (an interrupted copy)."""
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


@pytest.fixture
def nothing_is_read(monkeypatch):
    """Any attempt to read weights fails the test: the folder must be refused first."""
    import safetensors
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the model folder was checked")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)


READERS = {
    "check_weights": lambda folder, tmp, base: check_weights(folder),
    "load_policy": lambda folder, tmp, base: load_policy(folder, ModelConfig(path="x"), FSDPConfig(), CPU),
    "engine layout": lambda folder, tmp, base: CheckpointLayout(folder),
    "hf engine": lambda folder, tmp, base: HFEngine(folder),
}
# The commands that read model folders, run through the CLI: exit code 2 and one line on stderr.
COMMANDS = {
    "eval": lambda folder, tmp, base: ["eval", "--model", folder, "--data", BENCHMARK, "--out", tmp / "out",
                                       "--engine", "hf", "--samples", "1", "--max-tokens", "4", "--limit", "1",
                                       "--scaling-k", "none", "--no-progress"],
    "train": lambda folder, tmp, base: ["train", "toy-cpu", f"model.path={folder}", f"run.out={tmp / 'run'}",
                                        "--no-progress"],
    "merge --tuned": lambda folder, tmp, base: ["merge", "--base", base, "--tuned", folder, "--out", tmp / "out",
                                                "--no-progress"],
    "merge --base": lambda folder, tmp, base: ["merge", "--base", folder, "--tuned", base, "--out", tmp / "out",
                                               "--no-progress"],
}  # fmt: skip


def _refused(case, folder, tmp_path, tiny_llama_dir, capsys) -> str:
    """The one-line message with which ``case`` refuses ``folder``."""
    if case in READERS:
        with pytest.raises(UserError) as info:
            READERS[case](folder, tmp_path, tiny_llama_dir)
        return str(info.value)
    assert main([str(a) for a in COMMANDS[case](folder, tmp_path, tiny_llama_dir)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "out").exists()
    return line


@pytest.mark.parametrize("case", [*READERS, *COMMANDS])
def test_a_folder_with_only_pickled_weights_is_refused_before_anything_is_loaded(
    case, pickle_only, nothing_is_read, tmp_path, tiny_llama_dir, capsys
):
    message = _refused(case, pickle_only, tmp_path, tiny_llama_dir, capsys)
    assert f"model folder {pickle_only} holds only pickled weights (pytorch_model.bin)" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message  # how to convert it


@pytest.mark.parametrize("case", [*READERS, *COMMANDS])
def test_a_truncated_safetensors_file_is_named_before_anything_is_loaded(
    case, truncated, nothing_is_read, tmp_path, tiny_llama_dir, capsys
):
    message = _refused(case, truncated, tmp_path, tiny_llama_dir, capsys)
    weights = truncated / "model.safetensors"
    assert f"{weights} is truncated" in message and "copy" in message


def test_a_folder_with_both_formats_loads_the_safetensors_and_never_unpickles(pickle_only, tiny_llama_dir, monkeypatch):
    shutil.copy(tiny_llama_dir / "model.safetensors", pickle_only / "model.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    model = load_policy(pickle_only, ModelConfig(path="x"), FSDPConfig(), CPU)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert set(CheckpointLayout(pickle_only).shapes) >= {"model.embed_tokens.weight"}


def test_a_shard_missing_from_the_index_is_named(tmp_path, tiny_llama_dir):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, folder)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors, which is missing"):
        check_weights(folder)


def test_a_merge_does_not_copy_the_tuned_folders_pickles_into_its_output(pickle_only, tiny_llama_dir, tmp_path):
    # The output's weights are the merge's safetensors; a stale pickle of the tuned model beside them would be
    # loaded by any tool that prefers it.
    shutil.copy(tiny_llama_dir / "model.safetensors", pickle_only / "model.safetensors")
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_llama_dir), "--tuned", str(pickle_only), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
