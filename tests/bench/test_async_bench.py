"""bench/async_projection.py's model and bench/async_staleness.py's report, on numbers given by hand."""

import json

import pytest

from bench.async_projection import best_split, project
from bench.async_staleness import report


def test_the_projection_of_balanced_phases_on_a_split_equal_to_their_ratio():
    # 8 GPUs, generation 3x the training: the best split gives the engine 6, and with linear scaling the
    # asynchronous step equals generation + training, gaining the sync it no longer pays, less the publish.
    best = best_split(30.0, 10.0, 4.0, 1.0, gpus=8)
    assert best["engine_gpus"] == 6
    assert best["async_s"] == pytest.approx(40.0 + 1.0) and best["sync_s"] == pytest.approx(44.0)
    # a tail of idle generation, filled by sampling ahead, is where the gain comes from
    assert project(30.0, 10.0, 4.0, 1.0, 8, 6, tail=0.5)["async_s"] == pytest.approx(max(15 * 8 / 6, 40.0) + 1)
    # the CPU demo: the synchronous loop ran on one core of two, each side gets one
    assert project(0.9, 0.8, 0.0, 0.0, 2, 1, measured_on=1)["async_s"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="engine_gpus"):
        project(1.0, 1.0, 0.0, 0.0, 2, 2)


def _fake_run(folder, staleness, step_s, accuracy, length):
    folder.mkdir(parents=True)
    records = [{"step": i + 1, "step_s": step_s, "staleness": s, "overlap": 0.5 if s else 0.0, "rollout_wait_s": 0.1,
                "rollout_s": 1.0, "update_s": 0.5, "logprob_s": 0.2, "mismatch_kl_k3": 1e-3 * (1 + s)}
               for i, s in enumerate(staleness)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    after = {"accuracy": accuracy, "mean_length": length}
    (folder / "summary.json").write_text(json.dumps({"after": after, "before": after}))


def test_the_report_pairs_each_k_with_k0_by_seed(tmp_path):
    for seed, (a0, a1) in enumerate([(0.80, 0.82), (0.70, 0.69)]):
        _fake_run(tmp_path / f"k0-seed{seed}", [0, 0, 0], 2.0, a0, 30.0)
        _fake_run(tmp_path / f"k1-seed{seed}", [0, 1, 1], 1.5, a1, 28.0)
    text = report(tmp_path, [0, 1], [0, 1], "1+1")
    k1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    cells = [c.strip() for c in k1.split("|")[1:-1]]
    assert cells[1] == "1.50 ± 0.00"  # step s, the first step left out
    assert cells[8] == "{0: 2, 1: 4}"  # the staleness histogram over both seeds
    assert cells[11] == "0.5 ± 2.1"  # +2 pt and -1 pt, paired with k = 0
    assert "| 1 | 2.00e-03 |" in text  # the mismatch at staleness 1
    assert (tmp_path / "report-split1x1.md").read_text() == text
