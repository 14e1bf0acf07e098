"""trainer.update.loss_metrics.MiniBatchMetrics: the mini-batch's loss figures, token-weighted, reduced over the
ranks. Two ranks run as two gloo processes on the CPU, the collectives a multi-GPU run makes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.update.loss_metrics import MiniBatchMetrics

REPO = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")


def kernel_metrics(clip_low: float, entropy: float, ratio_max: float, ratio_min: float, nonfinite: int = 0):
    """The metrics of one policy_loss call, as the kernel returns them (0-d tensors)."""
    values = dict(clip_frac_low=clip_low, clip_frac_high=0.0, clip_frac_dual=0.0, approx_kl=0.01, entropy=entropy,
                  num_nonfinite=nonfinite, ratio_max=ratio_max, ratio_min=ratio_min)  # fmt: skip
    return {k: torch.tensor(float(v)) for k, v in values.items()}


def test_means_are_weighted_by_the_unmasked_tokens_of_each_micro_batch():
    m = MiniBatchMetrics()
    m.add(torch.tensor(0.25), 10, kernel_metrics(0.5, 2.0, 1.3, 0.9), valid=6)
    m.add(torch.tensor(-0.05), 4, kernel_metrics(0.0, 1.0, 1.1, 0.7, nonfinite=1))
    out = m.reduced(CPU)
    assert out["loss"] == pytest.approx(0.2) and out["tokens"] == 14 and out["valid"] == 10
    assert out["clip_frac_low"] == pytest.approx(0.5 * 6 / 10)
    assert out["entropy"] == pytest.approx((2.0 * 6 + 1.0 * 4) / 10)
    assert out["num_nonfinite"] == 1
    assert (out["ratio_max"], out["ratio_min"]) == pytest.approx((1.3, 0.7))  # float32 from the kernel
    assert "kl_ref" not in out  # the kernel gave none (beta = 0)


# Rank 0 has two micro-batches; rank 1 only dummy ones (no rows in this mini-batch: never adds).
TWO_RANKS = r"""
import datetime, json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from trainer.update.loss_metrics import MiniBatchMetrics
from test_loss_metrics import kernel_metrics as metrics

def worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    m = MiniBatchMetrics()
    if rank == 0:
        m.add(torch.tensor(0.25), 10, metrics(0.5, 2.0, 1.3, 0.9), valid=6)
        m.add(torch.tensor(-0.05), 4, metrics(0.0, 1.0, 1.1, 0.7))
    got = m.reduced(torch.device("cpu"))
    check = torch.tensor([float(rank)])
    dist.all_reduce(check)  # after reduced(): both ranks are still paired
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"metrics": got, "check": check.item()}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_with_only_dummy_micro_batches_reduces_alike_and_gets_the_other_ranks_figures(tmp_path):
    """Before the fix the idle rank reduced 4 values where the others reduced 10: its collectives paired
    with the wrong ones and the busy rank waited for ones never made (a hang, here gloo's 30 s timeout)."""
    # the repository and this folder (the workers take kernel_metrics from this file)
    path = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    script = tmp_path / "two_ranks.py"  # a file, not -c: spawned workers import their function from it
    script.write_text(TWO_RANKS)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["check"] == 1.0
    got = ranks[0]["metrics"]
    assert got["loss"] == pytest.approx(0.2) and got["tokens"] == 14 and got["valid"] == 10
    assert got["entropy"] == pytest.approx(1.6) and got["clip_frac_low"] == pytest.approx(0.3)
    assert (got["ratio_max"], got["ratio_min"]) == pytest.approx((1.3, 0.7)) and "kl_ref" not in got
    assert not any(math.isnan(v) for v in got.values())
