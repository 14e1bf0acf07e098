"""FSDP2 policy update: 2 ranks (gloo) equal 1 process; process setup, model loading and its errors.

Exactness tests compute in float32 (``param_dtype`` and ``reduce_dtype``): then sharding changes only
the order of float additions, and the updated parameters agree with the single process to 1e-5.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import FSDPConfig, ModelConfig
from trainer.dist.distributed_env import DistEnv, destroy_distributed, init_distributed
from trainer.dist.fsdp import decoder_layers, load_policy
from trainer.fsutil import UserError
from trainer.models import resolve as models
from trainer.update.packing import Packed, plan_micro_batches

pytestmark = pytest.mark.trainer_kernels  # the trainer's update, as a CPU user runs it (tests/conftest.py)

HELPERS = Path(__file__).parents[1] / "helpers"
REPO = Path(__file__).parents[2]
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FLOAT32 = dict(param_dtype="float32", reduce_dtype="float32")

# The update procedure is the helper's, so that the 2-rank run and the 1-process oracle run the same code.
_spec = importlib.util.spec_from_file_location("fsdp_update", HELPERS / "fsdp_update.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)


def make_case(seed: int = 0, n: int = 8) -> dict:
    """Rows of different lengths (prompts 1-6, responses 1-12 tokens), advantages of both signs, and
    shifts of the old log-probs. Loss with DLER's clips, a temperature, and a clip norm below the
    gradient norm (measured 1.34), so that clipping engages."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, r = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 13, (1,), generator=gen))
        ids = torch.randint(0, 49152, (p + r,), generator=gen).tolist()
        rows.append(
            dict(
                prompt=ids[:p],
                response=ids[p:],
                advantage=float(torch.randn(1, generator=gen)),
                shift=0.3 * torch.randn(r, generator=gen),
            )
        )
    return dict(
        rows=rows,
        loss=dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, loss_agg="token-mean", temperature=0.8),
        big_budget=10**6,  # the whole share of a rank in one micro-batch
        small_budget=1,  # one micro-batch per row: the same count (4) on both ranks
        uneven_budget=17,  # 4 micro-batches on rank 0, 2 on rank 1 (one of 3 packed rows)
        max_norm=0.01,
        optim=dict(lr=1e-3, weight_decay=0.01),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and threads that compete with other processes for the
    cores slow every step down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def single(tiny_llama_dir, case):
    """The oracle: the whole batch in one process, without FSDP."""
    model = load_policy(tiny_llama_dir, ModelConfig(path="tiny"), FSDPConfig(enabled=False), CPU)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, shifts = helper.rows_of(case)
    result = helper.run_update(model, rows, shifts, case)
    result["initial"] = initial
    return result


@pytest.fixture(scope="module")
def two_ranks(tiny_llama_dir, case, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    torch.save(case, out / "case.pt")
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "fsdp_update.py"), str(tiny_llama_dir), str(out), str(free_port())],
        cwd=REPO,
        # the repository first: a script's sys.path starts at its own folder, not at the working directory
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    return facts, torch.load(out / "result.pt", weights_only=True)


@pytest.fixture
def one_process_group():
    """Tests that make load_policy create its in-memory group leave no group behind for the next test."""
    assert not dist.is_initialized()
    yield
    destroy_distributed()
    assert not dist.is_initialized()


def assert_same(got: dict, want: dict, atol: float, rtol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------- 2 ranks equal 1 process


def test_two_ranks_are_set_up_and_sharded(two_ranks):
    facts, _ = two_ranks
    assert [f["env"] for f in facts] == [[0, 2, 0, "cpu", True], [1, 2, 1, "cpu", False]]
    assert all(f["backend"] == "gloo" and f["all_dtensors"] and f["tied"] for f in facts)
    # each rank holds about half of every parameter (dim 0 split in two, padded when odd)
    assert all(0.45 < f["local_fraction"] <= 0.55 for f in facts)


def test_two_rank_update_equals_the_single_process_update(two_ranks, single, case):
    _, dist_result = two_ranks
    big = case["big_budget"]
    # Gradients are the big batch's: FSDP sums over ranks (an average would halve them).
    assert_same(dist_result["grads"][big], single["grads"][big], atol=1e-6, rtol=1e-4)
    # The norm is of the full gradient on both ranks (a shard's would be ~1/sqrt(2) of it) and clips.
    assert dist_result["norm"] == pytest.approx(single["norm"], rel=1e-5)
    assert single["norm"] > 2 * case["max_norm"]
    assert_same(dist_result["clipped"], single["clipped"], atol=1e-7, rtol=1e-4)
    assert dist_result["fused"] and single["fused"]
    # One AdamW step on the shards: the parameters of one process on the whole batch, to 1e-5 ...
    assert_same(dist_result["params"], single["params"], atol=1e-5)
    # ... which is a real test: the step moved parameters by about lr.
    moved = max(float((single["params"][n] - single["initial"][n]).abs().max()) for n in single["initial"])
    assert moved > 5e-4
    # The weights' norm (the divergence check's) is of the full weights on rank 0 too: that of the gathered
    # parameters to 1e-3 (torch's float32 norm of these 3.2M weights is 5e-5 off float64's, measured on one
    # process; a shard's norm would be ~1/sqrt(2) of it).
    full_norm = float(torch.cat([p.flatten() for p in dist_result["params"].values()]).double().norm())
    assert dist_result["weight_norm"] == pytest.approx(full_norm, rel=1e-3)


def test_accumulation_loss_and_gradients_equal_one_big_batch(two_ranks, single, case):
    """Also with a different number of micro-batches per rank: every FSDP2 forward is collective, so
    the rank with fewer must run dummy ones (``trainer.update.packing`` pads the plans to the longest), or
    both would wait for each other for ever."""
    lengths = [len(r["prompt"]) + len(r["response"]) for r in case["rows"]]
    counts = [len(plan_micro_batches(lengths[rank::2], case["uneven_budget"])) for rank in (0, 1)]
    assert counts == [4, 2]
    _, dist_result = two_ranks
    big = case["big_budget"]
    for budget in (case["small_budget"], case["uneven_budget"]):
        for result in (single, dist_result):
            # float32: micro-batching changes only the summation order (measured ~1e-7)
            assert result["loss"][budget] == pytest.approx(single["loss"][big], rel=1e-5, abs=1e-7)
            assert_same(result["grads"][budget], single["grads"][big], atol=1e-6, rtol=1e-4)
    assert abs(single["loss"][big]) > 1e-3  # a loss that gradients flow from, not a zero


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(two_ranks, case):
    facts, dist_result = two_ranks
    assert all(f["checkpointed_layer_calls"] == 2 for f in facts)  # forward + recompute in the backward
    assert_same(dist_result["checkpointed_grads"], dist_result["grads"][case["big_budget"]], atol=1e-7, rtol=1e-5)


def test_fused_head_on_two_ranks_equals_the_logits_path(two_ranks, single, case):
    """linear_policy_loss inside the sharded root's forward (tied head): the head's weight is the
    unsharded one there, its gradient is reduce-scattered like any other."""
    facts, dist_result = two_ranks
    assert_same(dist_result["fused_grads"], dist_result["grads"][case["big_budget"]], atol=1e-6, rtol=1e-4)
    for f in facts:
        assert f["fused_loss"] == pytest.approx(single["loss"][case["big_budget"]], rel=1e-5, abs=1e-7)
        assert f["fused_logprob_error"] < 1e-5


def test_reference_model_is_sharded_frozen_and_scores_like_the_policy(two_ranks):
    facts, _ = two_ranks
    for f in facts:
        assert f["ref_all_dtensors"] and not f["ref_training"] and not f["ref_requires_grad"]
        assert f["ref_logprob_error"] < 1e-5


# ---------------------------------------------------------------------------- one process


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_on_one_process_equals_the_plain_update(tiny_llama_dir, case, single, one_process_group, cpu_offload):
    fsdp = FSDPConfig(enabled=True, cpu_offload=cpu_offload, **FLOAT32)
    model = load_policy(tiny_llama_dir, ModelConfig(path="tiny"), fsdp, CPU)
    assert dist.is_initialized() and dist.get_world_size() == 1  # created in memory by load_policy
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rows, shifts = helper.rows_of(case)
    result = helper.run_update(model, rows, shifts, case)
    assert result["norm"] == pytest.approx(single["norm"], rel=1e-5)
    assert_same(result["params"], single["params"], atol=1e-5)


def test_mixed_precision_computes_in_bf16_and_keeps_fp32_masters(tiny_llama_dir, case, one_process_group):
    model = load_policy(tiny_llama_dir, ModelConfig(path="tiny"), FSDPConfig(enabled=True), CPU)  # bf16 compute
    rows, shifts = helper.rows_of(case)
    packed = Packed.of(rows, torch.device("cpu"))
    assert packed.response_logits(model).dtype == torch.bfloat16
    model.zero_grad(set_to_none=True)
    packed.response_logits(model).float().logsumexp(-1).sum().backward()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}  # reduced in reduce_dtype float32


def test_without_fsdp_the_model_is_plain_and_in_its_dtype(tiny_llama_dir):
    model = load_policy(tiny_llama_dir, ModelConfig(path="tiny", dtype="bfloat16"), FSDPConfig(), CPU)
    assert not dist.is_initialized()  # one process, fsdp auto: no sharding, no process group
    assert model.training and not any(isinstance(p, DTensor) for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = load_policy(tiny_llama_dir, ModelConfig(path="tiny"), FSDPConfig(), CPU, trainable=False)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_decoder_layers_are_found_in_other_layouts(tiny_qwen2_dir):
    qwen2 = load_policy(tiny_qwen2_dir, ModelConfig(path="tiny"), FSDPConfig(), CPU)
    assert decoder_layers(qwen2) == list(qwen2.model.layers) and len(qwen2.model.layers) == 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    class Other(nn.Module):  # blocks under another name, next to a smaller list and a mixed one
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.mixed = nn.ModuleList([nn.Linear(8, 64), nn.ReLU()])

    other = Other()
    assert decoder_layers(other) == list(other.blocks)
    assert decoder_layers(nn.Linear(2, 2)) == []


# ---------------------------------------------------------------------------- errors


def test_unavailable_attention_is_a_user_error(tiny_llama_dir):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    cfg = ModelConfig(path="tiny", attn_implementation="flash_attention_2")
    with pytest.raises(UserError, match="attn_implementation='flash_attention_2'.*sdpa works everywhere"):
        load_policy(tiny_llama_dir, cfg, FSDPConfig(), CPU)


def test_a_folder_without_weights_fails_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)  # must not be reached
    (tmp_path / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(UserError, match=f"model folder {tmp_path} has no weights"):
        load_policy(tmp_path, ModelConfig(path="x"), FSDPConfig(), CPU)
    with pytest.raises(UserError, match="does not exist or has no config.json"):
        load_policy(tmp_path / "missing", ModelConfig(path="x"), FSDPConfig(), CPU)


@pytest.fixture
def single_process_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_creates_no_group(single_process_env):
    env = init_distributed("auto" if not torch.cuda.is_available() else "cpu")
    assert env == CPU and env.is_main
    assert not dist.is_initialized()
    destroy_distributed()  # safe without a group


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_user_error(single_process_env):
    with pytest.raises(UserError, match="device 'cuda' was asked for but this torch sees no CUDA device"):
        init_distributed("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        init_distributed("gpu")


def test_on_a_cuda_node_each_rank_owns_its_local_device_and_joins_nccl_with_gloo(single_process_env):
    """The CUDA branch of process setup, on torch's CUDA module stood in for a 2-GPU node: the rank's
    device becomes current, and the group carries gloo for CPU tensors next to NCCL (FSDP2 offload)."""
    calls = []
    single_process_env.setattr(torch.cuda, "is_available", lambda: True)
    single_process_env.setattr(torch.cuda, "device_count", lambda: 2)
    single_process_env.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    single_process_env.setattr(dist, "is_initialized", lambda: False)
    single_process_env.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["device_id"], kw["rank"]))
    )
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1").items():
        single_process_env.setenv(name, value)
    try:
        env = init_distributed("auto")
    finally:
        destroy_distributed()  # forgets the (stood-in) group: is_initialized() says False, nothing to destroy
    assert env.device == torch.device("cuda", 1) and env.rank == 1
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl", torch.device("cuda", 1), 1)]
    single_process_env.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="LOCAL_RANK=2 but this node has 2 CUDA device"):
        init_distributed("cuda")


def test_bad_torchrun_environment(single_process_env):
    single_process_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")
    single_process_env.setenv("WORLD_SIZE", "2")
    single_process_env.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK=2 and WORLD_SIZE=2 are inconsistent"):
        init_distributed("cpu")
    single_process_env.setenv("RANK", "1")
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT not set: launch the trainer with torchrun"):
        init_distributed("cpu")
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------- hub ids


def test_hub_id_without_internet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the value
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="could not download model 'dler-test-org/no-such-model'.*local folder"):
        models.resolve_model("dler-test-org/no-such-model")


def test_hub_ids_download_and_local_folders_win(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(snapshot))
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("org/model") == snapshot and asked == ["org/model"]
    (tmp_path / "org" / "local").mkdir(parents=True)
    (tmp_path / "org" / "local" / "config.json").write_text("{}")
    assert models.resolve_model("org/local") == Path("org/local") and asked == ["org/model"]
    with pytest.raises(UserError, match="neither an alias .* nor a folder"):
        models.resolve_model("a/b/c")  # not a hub id: the folder error, no download
    assert asked == ["org/model"]
