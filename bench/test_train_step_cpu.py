"""pytest-benchmark on the CPU: the policy update of the trainer on the tiny config (fp32).

    make bench          # or: .venv/bin/python -m pytest bench/ --benchmark-only

One round is ``trainer.update.policy.accumulate_gradients`` over a mini-batch of 4 sequences x 64 tokens
(16 prompt) in micro-batches of <= 128 tokens, alone and followed by the trainer's gradient
clipping and (fused) AdamW step. Tokens per round and model FLOPs per round (bench_train_step.py's
formula) are in each result's extra_info.
Throughput and MFU on a real model: bench_train_step.py.
"""

import contextlib

import pytest
from bench_train_step import LOSS, build_model, fill_old_logprobs, make_rows, model_config, param_counts, step_flops

from trainer.config import OptimConfig
from trainer.update.optim import build_optimizer, clip_gradients
from trainer.update.policy import accumulate_gradients

SEQUENCES, SEQ_LEN, PROMPT_LEN, MICRO_BATCH_TOKENS = 4, 64, 16, 128


@pytest.fixture(scope="module")
def setup():
    config = model_config("tiny")
    model = build_model(config, "cpu", "sdpa", gradient_checkpointing=False)
    rows = make_rows(SEQUENCES, SEQ_LEN, PROMPT_LEN, config.vocab_size)
    fill_old_logprobs(model, rows, "model", config.vocab_size, MICRO_BATCH_TOKENS, contextlib.nullcontext)
    extra = dict(tokens=SEQUENCES * SEQ_LEN, flops=step_flops(config, rows, param_counts(model)[0]))
    return model, rows, extra


def _step(model, rows, optimizer=None):
    def step():
        accumulate_gradients(model, rows, LOSS, token_budget=MICRO_BATCH_TOKENS)
        if optimizer is not None:
            clip_gradients(model, 1.0)
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


@pytest.mark.benchmark(group="train-step-cpu")
def test_fwd_bwd(benchmark, setup):
    model, rows, extra = setup
    benchmark.extra_info.update(extra)
    benchmark(_step(model, rows))


@pytest.mark.benchmark(group="train-step-cpu")
def test_fwd_bwd_adamw(benchmark, setup):
    model, rows, extra = setup
    benchmark.extra_info.update(extra)
    step = _step(model, rows, build_optimizer(model, OptimConfig()))
    step()  # the optimizer state is created outside the timing
    benchmark(step)
