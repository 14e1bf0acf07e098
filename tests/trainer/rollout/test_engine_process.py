"""The engine in its own process (trainer/rollout/engine_process.py): it samples as the same engine in this
process does, takes weights through shared memory, and every way it can fail is one clear error, bounded in
time: an error inside it, a crash (SIGKILL), no answer within the timeout, a model it cannot load."""

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from trainer.fsutil import UserError
from trainer.rollout.engine_process import EngineDied, EngineProcess, EngineTimeout
from trainer.rollout.hf_engine import HFEngine

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.fixture(scope="module")
def engine(demo_model, tmp_path_factory):
    """One engine process for the tests below, in file order; the last of them kills it (a start costs ~4 s of
    CPU: torch and transformers imported again)."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    e = EngineProcess("hf", demo_model, log_file=log, timeout_s=60, dtype="float32", device="cpu")
    yield e
    e.close()


def _tokens(groups):
    return [[(s.token_ids, s.finish_reason) for s in g] for g in groups]


def test_it_samples_and_takes_weights_as_the_engine_in_this_process(engine, demo_model):
    local = HFEngine(demo_model, dtype="float32", device="cpu")
    sampling = dict(n=3, max_tokens=24, temperature=1.0, seed=5)
    theirs, ours = engine.generate(PROMPTS, **sampling), local.generate(PROMPTS, **sampling)
    assert _tokens(theirs) == _tokens(ours)
    for a, b in zip(theirs, ours):
        for s, t in zip(a, b):
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs), rtol=0, atol=1e-5)
    # New weights (a copy, as the trainer's snapshot is) change both alike.
    g = torch.Generator().manual_seed(0)
    new = [(n, (p + 0.05 * torch.randn(p.shape, generator=g)).detach()) for n, p in local.model.named_parameters()]
    stats = engine.update_weights(new)
    local.update_weights([(n, t.clone()) for n, t in new])
    assert stats.tensors == len(new)
    theirs, ours = engine.generate(PROMPTS, **sampling), local.generate(PROMPTS, **sampling)
    assert _tokens(theirs) == _tokens(ours)


def test_an_error_inside_the_engine_comes_back_as_its_own_class_and_the_engine_goes_on(engine):
    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.generate(PROMPTS, n=0, max_tokens=4)
    assert len(engine.generate(PROMPTS, n=1, max_tokens=4, seed=0)) == 2


def test_a_killed_engine_is_one_clear_error_naming_its_log(engine):
    os.kill(engine.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDied, match=r"was killed by signal 9 during generate; its log: .*engine\.log"):
        engine.generate(PROMPTS, n=1, max_tokens=4)
    assert time.monotonic() - start < 10
    engine.close()  # and closing it after is harmless


def test_an_engine_that_does_not_answer_in_time_is_stopped_with_an_error(demo_model, tmp_path):
    e = EngineProcess("hf", demo_model, log_file=tmp_path / "engine.log", timeout_s=0.5, dtype="float32",
                      device="cpu", batch_size=8)  # fmt: skip
    try:
        start = time.monotonic()
        with pytest.raises(EngineTimeout, match=r"did not answer generate within 0.5 s .*and was stopped"):
            e.generate([[5, 6, 7]] * 64, n=16, max_tokens=300, temperature=1.0, seed=0)  # far beyond 1 s
        assert time.monotonic() - start < 15
        with pytest.raises(EngineDied):
            e.generate(PROMPTS, n=1, max_tokens=4)
    finally:
        e.close()


def test_an_engine_that_cannot_start_fails_the_constructor_and_leaves_no_process(tmp_path):
    with pytest.raises(UserError, match="has no weights"):
        EngineProcess("hf", tmp_path, log_file=tmp_path / "engine.log", timeout_s=60)
    assert not multiprocessing.active_children()


def test_the_engine_process_is_outside_the_job_and_on_the_devices_it_is_given(demo_model, tmp_path, monkeypatch):
    """Under torchrun the child must not see the job's variables (vLLM would join the job); ``devices`` becomes
    its CUDA_VISIBLE_DEVICES (``rollout.engine_devices``; the HF engine on the CPU ignores it here)."""
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    e = EngineProcess("hf", demo_model, log_file=tmp_path / "engine.log", timeout_s=60, devices="3", dtype="float32",
                      device="cpu")  # fmt: skip
    try:
        assert e.info["cuda_visible_devices"] == "3" and e.info["launcher_variables"] == []
        assert e.info["pid"] == e.pid != os.getpid()
    finally:
        e.close()


def test_the_trainer_gives_each_local_rank_its_own_engine_gpu():
    """``rollout.engine_devices`` on a GPU node: local rank r's engine process sees entry r alone, as cuda:0."""
    from types import MethodType, SimpleNamespace

    from trainer.config import load_config
    from trainer.dist.distributed_env import DistEnv
    from trainer.train import Trainer

    def engine_process_kwargs(cfg, env):  # the trainer's, without building a trainer (no CUDA device here)
        trainer = SimpleNamespace(cfg=cfg, env=env, out=Path("run"))
        trainer._engine_kwargs = MethodType(Trainer._engine_kwargs, trainer)
        return Trainer._engine_process_kwargs(trainer)

    cfg = load_config("toy-cpu", ["run.device=cuda", "rollout.async_staleness=1", "rollout.engine_devices=4,5,6,7"])
    env = DistEnv(rank=2, world_size=4, local_rank=2, device=torch.device("cuda", 2))
    got = engine_process_kwargs(cfg, env)
    assert got["devices"] == "6" and got["device"] == "cuda:0" and got["threads"] is None
    env = DistEnv(rank=5, world_size=8, local_rank=5, device=torch.device("cuda", 5))
    with pytest.raises(UserError, match="names 4 devices, none for local rank 5"):
        engine_process_kwargs(cfg, env)
    cfg = load_config("toy-cpu", ["rollout.async_staleness=1"])  # on a CPU: half the cores each
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    got = engine_process_kwargs(cfg, env)
    assert got["devices"] is None and got["device"] == "cpu" and got["threads"] == max(1, (os.cpu_count() or 2) // 2)
