"""The GPU run's engine choreography, executed on the CPU: sleep, wake in two parts, reload, sample.

vLLM's CPU backend has no sleep mode, so these tests put a double of vLLM (``helpers/fake_vllm.py``,
which mirrors vLLM 0.32's contract and samples with a real copy of the model) on a platform that has
one, and run the real ``VLLMEngine`` and the whole ``Trainer.fit`` on it. What the loop does around
the engine is decided by capabilities (the engine's ``can_sleep``, the device's caching allocator),
never by the device's name, so this is the sequence a CUDA run performs.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import trainer.train as train_mod
from trainer.config import load_config
from trainer.fsutil import UserError
from trainer.rollout.contract import SLEEP_TAGS
from trainer.rollout.vllm_engine import VLLMEngine
from trainer.train import train

pytestmark = pytest.mark.trainer_kernels  # the trainer's update, as a CPU user runs it (tests/conftest.py)

_spec = importlib.util.spec_from_file_location("fake_vllm", Path(__file__).parents[1] / "helpers" / "fake_vllm.py")
fake_vllm = importlib.util.module_from_spec(_spec)
sys.modules["fake_vllm"] = fake_vllm  # its dataclasses look their module up there
_spec.loader.exec_module(fake_vllm)

CONTRACTS = ("0.32", "none-return")  # what LLM.wake_up returns: vLLM 0.32's bool, or None as before 0.32


@pytest.fixture
def vllm_double(monkeypatch):
    """Installs the double as ``vllm``; yields a function that switches its wake_up contract."""

    def install(contract: str = "0.32"):
        modules = fake_vllm.modules(contract)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return modules["vllm"].LLM

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return install


def _overrides(model: Path, out: Path, steps: int, sleep_level: int) -> list[str]:
    return [
        f"model.path={model}",
        f"run.out={out}",
        f"run.steps={steps}",
        "run.save_every=0",
        "rollout.engine=vllm",
        "rollout.dtype=float32",
        f"rollout.sleep_level={sleep_level}",
        "rollout.sampling.prompts_per_step=2",
        "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.dynamic_sampling=false",  # one round per step: one generate call
        "rollout.sampling.oversample=1.0",
        "rollout.sampling.max_tokens=24",
        "reward.penalty.name=kimi",  # lengths rank the answers: advantages are not all zero
        "reward.penalty.length_budget=24",
        "algorithm.mini_batch_prompts=1",
        "optim.lr=1e-2",
        "eval.limit=2",
        "eval.samples_per_prompt=1",
        "eval.max_tokens=16",
    ]


@pytest.mark.parametrize("contract, sleep_level", [("0.32", 1), ("none-return", 2)])
def test_fit_with_a_sleeping_engine_runs_the_gpu_sequence_and_samples_with_the_synced_weights(
    demo_model, tmp_path, vllm_double, monkeypatch, contract, sleep_level
):
    """Three steps of ``Trainer.fit`` with sleep mode on: per step exactly rollouts -> sleep -> (update)
    -> free cached memory -> wake weights -> reload -> reset prefix cache -> free cached memory -> wake
    KV cache, and every generate call samples with the weights of the latest update, bit for bit."""
    llm_class = vllm_double(contract)
    released, synced = [], []

    def release(device):  # the device's cached-memory release, recorded in the engine's call log
        released.append(device)
        llm_class.instances[-1].calls.append(("release_cached_memory", str(device)))
        return False

    monkeypatch.setattr(train_mod, "release_cached_memory", release)
    sync = train_mod.Trainer.sync_weights

    def sync_and_remember(self, step):
        seconds = sync(self, step)
        synced.append({n: p.detach().clone() for n, p in self.policy.named_parameters()})
        return seconds

    monkeypatch.setattr(train_mod.Trainer, "sync_weights", sync_and_remember)
    initial = None
    init = train_mod.Trainer.__init__

    def init_and_remember(self, *args, **kwargs):
        nonlocal initial
        init(self, *args, **kwargs)
        initial = {n: p.detach().clone() for n, p in self.policy.named_parameters()}

    monkeypatch.setattr(train_mod.Trainer, "__init__", init_and_remember)

    summary = train(load_config("toy-cpu", _overrides(demo_model, tmp_path / "run", 3, sleep_level)), progress=False)
    assert summary["finished"] and summary["steps"] == 3

    (llm,) = llm_class.instances
    assert llm.kwargs["enable_sleep_mode"] is True
    # vLLM's log goes to the run folder: applied here, and named in the config vLLM applies in its processes.
    assert (tmp_path / "run" / "engine.log").is_file() and llm.kwargs["logging_config"].configure_logging
    step_calls = [
        ("generate", 2),
        ("sleep", sleep_level),
        ("release_cached_memory", "cpu"),
        ("wake_up", ["weights"]),
        ("collective_rpc", "reload_weights"),
        ("reset_prefix_cache", None),
        ("release_cached_memory", "cpu"),
        ("wake_up", ["kv_cache"]),
    ]
    # eval before, three steps, eval after, then the engine is shut down before the process group
    assert llm.calls == [("generate", 2)] + step_calls * 3 + [("generate", 2), ("shutdown", None)]
    assert len(released) == 6

    # generate calls: eval before, steps 1-3, eval after; each must see the weights of the last sync
    expected = [initial, initial, synced[0], synced[1], synced[2]]
    assert len(llm.generated_with) == len(expected)
    for call, (seen, want) in enumerate(zip(llm.generated_with, expected)):
        for name, value in want.items():
            # the engine's untied head must receive the tied embedding too
            assert torch.equal(seen[name], value), (call, name)
        if "lm_head.weight" in seen and "lm_head.weight" not in want:
            assert torch.equal(seen["lm_head.weight"], want["model.embed_tokens.weight"]), call
    assert any(not torch.equal(synced[-1][n], initial[n]) for n in initial), "the updates must move the weights"


def test_engine_tracks_its_sleeping_tags_itself(demo_model, vllm_double):
    """With either wake_up contract, the engine knows which tags sleep from its own calls."""
    for contract in CONTRACTS:
        vllm_double(contract)
        engine = VLLMEngine(demo_model, dtype="float32", device="cpu")
        assert engine.can_sleep and engine.asleep == frozenset()
        engine.sleep()
        assert engine.asleep == frozenset(SLEEP_TAGS)
        engine.sleep()  # asleep already: vLLM is not asked again
        assert [c for c in engine.llm.calls if c[0] == "sleep"] == [("sleep", 1)]
        engine.wake_up(["weights"])
        assert engine.asleep == {"kv_cache"}
        engine.wake_up(["weights"])  # awake already: not passed on
        engine.wake_up()
        assert engine.asleep == frozenset()
        assert [c for c in engine.llm.calls if c[0] == "wake_up"] == [
            ("wake_up", ["weights"]),
            ("wake_up", ["kv_cache"]),
        ]
        assert len(engine.generate([[1, 2]], max_tokens=2)[0]) == 1
        engine.close()
        engine.close()  # idempotent
        assert engine.llm is None


def test_a_sleeping_engine_refuses_to_sample_and_to_load_weights_into_sleeping_memory(demo_model, vllm_double):
    vllm_double()
    engine = VLLMEngine(demo_model, dtype="float32", device="cpu")
    weights = [(n, p.detach().clone()) for n, p in engine.llm.model.named_parameters()]
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"generate\(\) while \['kv_cache', 'weights'\] sleep: call wake_up"):
        engine.generate([[1, 2]], max_tokens=2)
    with pytest.raises(RuntimeError, match=r"update_weights\(\) while the weights sleep"):
        engine.update_weights(weights)
    engine.wake_up(["weights"])
    engine.update_weights(weights)  # weights awake, KV cache asleep: the trainer's order
    with pytest.raises(RuntimeError, match="kv_cache"):
        engine.generate([[1, 2]], max_tokens=2)
    with pytest.raises(ValueError, match="wake_up tags must be a list of"):
        engine.wake_up(["scheduling"])
    with pytest.raises(ValueError, match="wake_up tags must be a list of"):
        engine.wake_up("weights")


def test_after_a_level_2_sleep_the_engine_samples_only_once_its_weights_are_reloaded(demo_model, vllm_double):
    vllm_double()
    engine = VLLMEngine(demo_model, dtype="float32", device="cpu", sleep_level=2)
    weights = [(n, p.detach().clone()) for n, p in engine.llm.model.named_parameters()]
    engine.sleep()
    engine.wake_up()
    assert torch.isnan(next(engine.llm.model.parameters())).all(), "the double discards weights at level 2"
    with pytest.raises(RuntimeError, match="level-2 sleep discarded the weights: call update_weights"):
        engine.generate([[1, 2]], max_tokens=2)
    engine.update_weights(weights)
    assert len(engine.generate([[1, 2]], max_tokens=2)[0]) == 1


def test_sleep_mode_follows_the_platform_and_is_off_where_it_is_missing(demo_model, vllm_double, monkeypatch):
    vllm_double()
    assert not VLLMEngine(demo_model, dtype="float32", device="cpu", enable_sleep_mode=False).can_sleep
    monkeypatch.setattr(
        type(sys.modules["vllm.platforms"].current_platform), "is_sleep_mode_available", lambda self: False
    )
    engine = VLLMEngine(demo_model, dtype="float32", device="cpu", enable_sleep_mode=True)
    assert not engine.can_sleep and engine.llm.kwargs["enable_sleep_mode"] is False
    engine.sleep()
    engine.wake_up(["weights"])
    assert engine.asleep == frozenset() and not [c for c in engine.llm.calls if c[0] in ("sleep", "wake_up")]


def test_under_torchrun_every_rank_gets_its_own_engine_through_the_external_launcher(
    demo_model, vllm_double, monkeypatch
):
    """vLLM's default in-process executor would put every rank's engine on device 0; the external
    launcher with one data-parallel replica per tensor-parallel group keeps each on its rank's device."""
    vllm_double()
    assert "distributed_executor_backend" not in VLLMEngine(demo_model, device="cpu").llm.kwargs
    for world, tp, dp in ((2, 1, 2), (8, 1, 8), (8, 2, 4)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        kwargs = VLLMEngine(demo_model, device="cpu", tensor_parallel_size=tp).llm.kwargs
        assert kwargs["distributed_executor_backend"] == "external_launcher"
        assert kwargs["data_parallel_size"] == dp and kwargs["tensor_parallel_size"] == tp
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match=r"tensor_parallel_size=3 must divide the number of processes \(4\)"):
        VLLMEngine(demo_model, device="cpu", tensor_parallel_size=3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="torchrun --nproc-per-node 2"):
        VLLMEngine(demo_model, device="cpu", tensor_parallel_size=2)


def test_a_weight_update_of_a_tied_model_also_loads_the_engine_head(demo_model, vllm_double, monkeypatch):
    vllm_double()
    engine = VLLMEngine(demo_model, dtype="float32", device="cpu")
    embed = torch.randn(engine.layout.shapes["model.embed_tokens.weight"])
    engine.update_weights([("model.embed_tokens.weight", embed)])
    head = engine.llm.model.get_output_embeddings().weight
    assert torch.equal(head, embed), "vLLM keeps its own head tensor: the update must send it"


def test_on_an_accelerator_platform_the_engine_starts_with_the_gpu_settings(demo_model, vllm_double):
    vllm_double()
    engine = VLLMEngine(demo_model, device="cpu")
    kwargs = engine.llm.kwargs
    assert kwargs["gpu_memory_utilization"] == 0.85 and kwargs["enforce_eager"] is False
    assert "enable_chunked_prefill" not in kwargs  # the CPU backend's work-around only
    assert kwargs["enable_sleep_mode"] is True and engine.device_name == "FakeGPU (test double)"
