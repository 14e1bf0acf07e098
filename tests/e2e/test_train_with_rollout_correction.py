"""The rollout correction and the bypass in `dler train`: with an exact engine (the HF engine in float32
on the CPU, the trainer's own numerics) every correction and the bypass train as the plain run does; with
a deliberately mismatched engine (another sampling temperature) the metrics see the gap and the
corrections act on it."""

import json
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.run.run_log import METRICS_FILE
from trainer.train import train

MISMATCH_KEYS = {
    "mismatch_logp_abs_mean",
    "mismatch_logp_abs_max",
    "mismatch_kl_k1",
    "mismatch_kl_k3",
    "mismatch_ratio_outside",
    "mismatch_seq_log_ratio_min",
    "mismatch_seq_log_ratio_max",
    "mismatch_log_ppl_diff",
    "mismatch_ppl_ratio",
}
CORRECTION_KEYS = {"mismatch_masked_frac", "mismatch_weight_mean"}
MODES = ("token_tis", "seq_tis", "token_mis", "seq_mis", "icepop")


def _run(model: Path, out: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One seeded step through the HF engine in float32; its metrics record and the weights it ends with."""
    from safetensors.torch import load_file

    overrides = [
        f"model.path={model}",
        f"run.out={out}",
        "run.steps=1",
        "run.save_every=1",
        "rollout.engine=hf",
        "rollout.dtype=float32",
        "rollout.sampling.prompts_per_step=2",
        "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.dynamic_sampling=false",
        "rollout.sampling.max_tokens=32",
        "reward.penalty.name=kimi",
        "reward.penalty.length_budget=32",
        "algorithm.mini_batch_prompts=2",  # one optimizer step: its loss is of the same weights in every run
        "optim.lr=1e-2",
        "eval.data=null",
        *extra,
    ]
    train(load_config("toy-cpu", overrides), progress=False)
    (record,) = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    (step_dir,) = (out / "checkpoints").glob("step-*")
    return record, load_file(str(step_dir / "model" / "model.safetensors"))


def _assert_same_update(a: tuple[dict, dict], b: tuple[dict, dict], what: str) -> None:
    """The same step, up to the engine's float32 rounding. A correction's weight differs from 1 by at
    most |log rho| of its token or response (both ~1e-6 here), so the loss, -sum(w A) / N on this
    on-policy step (PPO ratio 1), and the gradient move by at most that much relative to |A| and to the
    gradient: the tolerance is the largest |response log-ratio| of the run, times the largest |A| for the
    loss. The weights after AdamW's first step, lr * g / (|g| + eps), agree only to what that step makes
    of the rounding on gradient entries near 0: a fraction of lr (lr 1e-2; measured <= 1.9e-4)."""
    (ra, wa), (rb, wb) = a, b
    gap = max(abs(ra["mismatch_seq_log_ratio_min"]), abs(ra["mismatch_seq_log_ratio_max"]), 1e-7)
    largest_advantage = max(abs(ra["advantage_min"]), abs(ra["advantage_max"]))
    assert rb["loss"] == pytest.approx(ra["loss"], abs=gap * largest_advantage + 1e-7), what
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=gap), what
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-3, msg=f"{what}: {name}")


def test_with_an_exact_engine_every_correction_and_the_bypass_train_as_the_plain_run(demo_model, tmp_path):
    base = _run(demo_model, tmp_path / "none")
    plain = base[0]
    assert MISMATCH_KEYS <= plain.keys() and not CORRECTION_KEYS & plain.keys()
    # the HF engine's float32 log-probs are the trainer's up to float32 rounding
    assert plain["mismatch_logp_abs_max"] < 1e-5, plain["mismatch_logp_abs_max"]
    assert plain["mismatch_ratio_outside"] == 0.0
    assert plain["grad_norm"] > 0, "the step must actually train"

    for mode in MODES:
        corrected = _run(demo_model, tmp_path / mode, f"algorithm.rollout_correction.mode={mode}")
        assert corrected[0]["mismatch_masked_frac"] == 0.0, mode
        assert corrected[0]["mismatch_weight_mean"] == pytest.approx(1.0, abs=1e-6), mode
        _assert_same_update(base, corrected, mode)

    bypass = _run(demo_model, tmp_path / "bypass", "algorithm.old_logprobs=sampler")
    assert not (MISMATCH_KEYS | CORRECTION_KEYS) & bypass[0].keys(), "no trainer old log-probs: no mismatch figures"
    _assert_same_update(base, bypass, "bypass")


def test_a_mismatched_engine_is_measured_and_corrected(demo_model, tmp_path):
    """The engine samples at temperature 0.7 while the trainer scores at 1.0: a gap the size of a bf16
    engine's or larger, which the metrics report and the corrections weigh or mask."""
    hot = ["rollout.sampling.temperature=0.7", "algorithm.allow_temperature_mismatch=true"]
    plain, plain_weights = _run(demo_model, tmp_path / "none", *hot)
    assert plain["mismatch_logp_abs_max"] > 0.1, plain
    assert plain["mismatch_kl_k3"] > 0 and plain["mismatch_ratio_outside"] > 0
    assert plain["mismatch_seq_log_ratio_min"] < plain["mismatch_seq_log_ratio_max"]

    masked, masked_weights = _run(
        demo_model, tmp_path / "token_mis", *hot, "algorithm.rollout_correction.mode=token_mis"
    )
    # the same rollouts (same seed, same engine): the figures of the gap are the plain run's
    assert masked["mismatch_ratio_outside"] == plain["mismatch_ratio_outside"]
    # token_mis masks exactly the tokens whose ratio leaves [0.5, 2]
    assert masked["mismatch_masked_frac"] == pytest.approx(plain["mismatch_ratio_outside"])
    assert masked["mismatch_weight_mean"] == 1.0
    assert any(not torch.allclose(masked_weights[n], plain_weights[n], rtol=0, atol=1e-6) for n in plain_weights)

    tis, _ = _run(demo_model, tmp_path / "token_tis", *hot, "algorithm.rollout_correction.mode=token_tis")
    assert tis["mismatch_masked_frac"] == 0.0
    assert tis["mismatch_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    assert tis["loss"] != pytest.approx(plain["loss"], rel=1e-4)
