"""dler_kernels.integrations.verl, and dler train's rollout correction, against the real verl (0.9.1), in its own
venv (`make verl-env`: verl pins transformers < 5.11 and omegaconf's antlr4 4.9, which the main environment cannot
hold). One run of tests/helpers/verl_checks.py there measures every comparison (one more run, its
rollout_correction section, the trainer's); the tests here assert on it. The run imports this checkout's packages
(PYTHONPATH), not whichever the venv was installed from.

Tolerances (fp32): loss rel <= 1e-5, gradient rel <= 1e-4, log-probs / entropies 1e-5 absolute: the two
sides differ in float32 summation order only (the fused loss also in its log-probs, the kernels' against torch's
log_softmax: its loss error is measured against the scale of its terms), and verl's +1e-8 in seq-mean-token-mean
and in GMPO's means.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERL_PYTHON = ROOT / os.environ.get("DLER_VERL_VENV", ".venv-verl") / "bin" / "python"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def verl_python():
    if not VERL_PYTHON.exists():
        if os.environ.get("CI") == "true":  # CI's `make test` builds it: its absence is a failure there
            pytest.fail(f"{VERL_PYTHON} is missing: `make verl-env` should have built it")
        pytest.skip(f"no verl environment at {VERL_PYTHON} (build it with `make verl-env`)")
    return str(VERL_PYTHON)


def _checks(verl_python, *sections):
    proc = subprocess.run([verl_python, str(ROOT / "tests/helpers/verl_checks.py"), *sections], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def results(verl_python):
    return _checks(verl_python)


@pytest.fixture(scope="module")
def correction(verl_python):
    return _checks(verl_python, "rollout_correction")["rollout_correction"]


# The registered losses (verl name -> objective: dler_kernels.integrations.verl.VERL_LOSSES; dler_vanilla is dler).
LOSSES = ("dler", "dler_gspo", "dler_gspo_sequence", "dler_cispo", "dler_sapo", "dler_geo_mean", "dler_dppo_tv",
          "dler_dppo_kl", "dler_vespo", "dler_luspo")  # fmt: skip
WITHOUT_VERL_COUNTERPART = ("dler_gspo_sequence", "dler_vespo", "dler_luspo")
# The clip fractions that show a loss's clip or mask acting on the checks' batches (SAPO and VESPO clip nothing).
CLIPPING = {"dler": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"), "dler_gspo": ("actor/pg_clipfrac",),
            "dler_gspo_sequence": ("actor/pg_clipfrac",), "dler_luspo": ("actor/pg_clipfrac",),
            "dler_cispo": ("actor/pg_clipfrac",), "dler_geo_mean": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"),
            "dler_dppo_tv": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"),
            "dler_dppo_kl": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower")}  # fmt: skip
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _cases(kind):
    cases = [f"{n}/{m}/{info}" for n in LOSSES for m in MODES for info in ("local", "dp2")]
    return [f"{c}/{w}" for c in cases for w in ("no_is", "is")] if kind == "registered" else cases


def test_the_tested_verl_version_is_installed(results):
    assert results["verl_version"] == "0.9.1"


def test_every_loss_is_in_verls_policy_loss_registry(results):
    assert results["registered"] == dict.fromkeys((*LOSSES, "dler_vanilla"), True)
    assert results["vanilla_alias"]


def test_import_verl_loads_the_plugin(verl_python):
    """The entry point verl.plugins: dler registers the losses and the backend in any process that imports verl."""
    code = ("import verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn as f; "
            "from verl.models.transformers import monkey_patch as m; "
            f"print(*[f(n).__module__ for n in {LOSSES!r}], m.patch_forward_with_backends.__module__)")  # fmt: skip
    proc = subprocess.run([verl_python, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-len(LOSSES) - 1 :] == ["dler_kernels.integrations.verl"] * (len(LOSSES) + 1)


@pytest.mark.parametrize("case", _cases("registered"))
def test_registered_loss_matches_verl(results, case):
    """Each registered loss against verl's loss of the same math (dler: vanilla, dler_X: X), or, for the three verl
    lacks, the reference's per-token loss aggregated by verl's agg_loss: every loss_agg_mode (SAPO and GMPO ignore
    it in verl, and here), local and dp_size=2 global_batch_info, with and without rollout IS weights (one of them 0):
    loss, d(loss)/d(log_prob) and verl's three metrics."""
    (c,) = [c for c in results["registered_loss"] if c["case"] == case]
    assert c["grad_norm"] > 1e-3, c  # the loss moves these log-probs
    assert c["loss_rel"] <= 1e-5, c
    assert c["grad_rel"] <= 1e-4, c
    if c["name"] == "dler":
        assert c["metrics_verl"]["actor/pg_clipfrac_lower"] > 0  # the dual clip acts
    if c["name"] in WITHOUT_VERL_COUNTERPART:
        assert set(c["metrics_dler"]) == {"actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"}, c
    else:
        assert set(c["metrics_dler"]) == set(c["metrics_verl"]), c
        for key, value in c["metrics_verl"].items():
            assert c["metrics_dler"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("name", list(CLIPPING))
def test_the_clip_of_each_loss_acts_in_the_checks(results, name):
    """The comparisons above see each clip or mask act (else they show nothing of it)."""
    cases = [c for c in results["registered_loss"] if c["name"] == name]
    for key in CLIPPING[name]:
        assert max(c["metrics_dler"][key] for c in cases) > 0, key


@pytest.mark.parametrize("case", _cases("fused"))
def test_fused_loss_from_hidden_states_matches_verl(results, case):
    """linear_policy_loss_verl (no logits) of each loss against the same comparison as above on
    log_softmax(hidden @ W.T / T), with IS weights: loss and the gradients of hidden and W. The loss's error is
    measured against the aggregation of |per-token loss| (the repository's convention, tests/kernels/oracle_checks):
    the kernels' float32 log-probs differ from torch's log_softmax by about eps |log p| per token, an error that
    scales with sum |term|, not with |loss|, which near-cancelling batches make small (SAPO's: 0.009)."""
    (c,) = [c for c in results["fused_loss"] if c["case"] == case]
    if c["name"] == "dler":
        assert c["dual_clip_active"]
    assert c["dhidden_norm"] > 1e-3, c
    assert c["loss_scaled_err"] <= 1e-5, c
    assert c["dhidden_rel"] <= 1e-4 and c["dweight_rel"] <= 1e-4, c


def test_legacy_compute_policy_loss_matches(results):
    for mode, c in results["legacy"].items():
        assert c["loss_dler"] == pytest.approx(c["loss_verl"], rel=1e-5), mode
        assert c["clipfrac_dler"] == pytest.approx(c["clipfrac_verl"], abs=1e-6), mode
        assert c["clipfrac_lower_dler"] == pytest.approx(c["clipfrac_lower_verl"], abs=1e-6), mode
    assert len(results["legacy"]) == 5


@pytest.mark.parametrize("layout", ["padded", "rmpad"])
def test_fused_backend_matches_verls_fused_linear_for_ppo(results, layout):
    """apply_monkey_patch(..., fused_kernels_backend='dler') against verl's 'torch' backend on the same model:
    log-probs, entropies and every parameter's gradient of a random combination of both."""
    (c,) = [c for c in results["fused_backend"] if c["case"] == layout]
    assert (c["forward_torch"], c["forward_dler"]) == ("forward_with_torch_backend", "forward_with_dler_backend")
    assert c["logp_max_abs"] <= 1e-5 and c["entropy_max_abs"] <= 1e-5, c
    assert c["grad_rel"] <= 1e-4 and c["grad_norm"] > 0, c


def test_vision_language_models_are_refused_by_name(results):
    assert "model_type='qwen2_vl' is a vision-language model" in results["vlm_error"]


@pytest.mark.parametrize(
    "name,message",
    [
        ("loss_agg_mode", "loss_agg_mode must be one of"),
        ("clip_ratio_c", "clip_ratio_c must be > 1"),
        ("batch_num_tokens", "batch_num_tokens is required when dp_size > 1"),
        ("global_batch_size", "global_batch_size is required when dp_size > 1"),
        ("config", "config: the actor config"),
        ("hidden", "hidden must be (batch, response_length, H) = (2, 3, H)"),
        ("loss_mode", "loss_mode must be one of 'dler', 'dler_vanilla', 'dler_gspo', "),
        ("ratio_cap", "clip_ratio_c (the ratio_cap of objective 'dppo_tv'): ratio_cap must be > 0"),
        ("clip_ratio_low", "clip_ratio_low (the eps_low of objective 'cispo'): eps_low must be < 1.0, got 1.5"),
        ("verl_name_taken", "verl already registers a policy loss 'vanilla' (verl.trainer.ppo.core_algos."),
        ("untested_version_warning", "verl 0.8.0 is outside the tested versions (>=0.9.1, <0.10.0)"),
    ],
)
def test_bad_input_is_named(results, name, message):
    assert message in results["errors"][name]


# ------------------------------------------------------------------ dler train's rollout correction


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "token_mis", "seq_mis", "icepop"])
def test_each_rollout_correction_mode_gives_verls_weights_and_mask(correction, mode):
    """trainer.rollout.correction against verl's preset for the mode (rollout_corr_helper's
    compute_rollout_correction_and_rejection_mask) on one batch of wide pi_old / pi_sampler ratios."""
    c = correction["modes"][mode]
    assert c["masks_equal"], c
    # the trainer's float32 weights of float64 ratios against verl's float64 ones: 1 float32 ulp (6e-8)
    assert c["weight_max_rel"] <= 1e-6, c
    if mode in ("token_mis", "seq_mis"):
        assert c["masked"] > 0, "the batch must reject some tokens, or the comparison shows nothing"
    if mode == "icepop":  # off the band: weight 0 and the response mask left whole, as verl's decoupled_token_icepop
        assert c["zero_weights"] > 0 and c["masked"] == 0, c


def test_the_sequence_modes_clamp_the_log_ratios_where_verl_does(correction):
    """One response with token log-ratios +25 and -24 (each beyond +-20, sum 1): seq_tis clamps the sum, e capped
    at 2, as verl's decoupled_seq_is; seq_mis the tokens' before their mean, (20 - 20) / 2 = 0, kept by the default
    band, as verl's decoupled_geo_rs (seq_mean_k1)."""
    tis, mis = correction["sequence_clamp"]["seq_tis"], correction["sequence_clamp"]["seq_mis"]
    assert tis["verl_weights"] == pytest.approx([2.0, 2.0])
    assert tis["dler_weights"] == pytest.approx(tis["verl_weights"]), tis
    assert tis["dler_mask"] == tis["verl_mask"] == [True, True]
    assert mis["verl_weights"] is None and mis["dler_weights"] == [1.0, 1.0]
    assert mis["dler_mask"] == mis["verl_mask"] == [True, True], mis


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])  # fmt: skip
def test_icepops_loss_is_verls_decoupled_token_icepop_under_every_aggregation(correction, loss_agg):
    """4 tokens with ratios 1, 1, 1, 10, advantage 1, policy unchanged: -3/4 (the off-band token counts in
    |y_i|; a mask would make seq-mean-token-mean -1); and a random batch through the update's correction_inputs
    against verl's compute_policy_loss_vanilla with verl's IcePop weights."""
    example = correction["example_loss"][loss_agg]
    want = -3.0 if loss_agg == "seq-mean-token-sum" else -0.75
    assert example["verl"] == pytest.approx(want, abs=1e-6)
    assert example["dler"] == pytest.approx(want, abs=1e-6), example
    c = correction["icepop_loss"][loss_agg]
    assert c["off_band"] > 0, c
    assert c["dler"] == pytest.approx(c["verl"], rel=1e-5), c


@pytest.mark.parametrize("key", ["ppl_ratio", "log_ppl_diff"])
def test_the_perplexity_mismatch_metrics_are_verls(correction, key):
    """mismatch_ppl_ratio / mismatch_log_ppl_diff against verl's compute_offpolicy_metrics on one float64 batch of
    responses of 2 to 7 tokens; verl's masked mean adds 1e-8 to each response's token count (relative 1e-8)."""
    c = correction["perplexity"][key]
    assert c["dler"] == pytest.approx(c["verl"], rel=1e-7), c


def test_package_imports_without_verl():
    """dler_kernels.integrations itself needs neither verl nor trl (the main venv has no verl)."""
    code = "import dler_kernels.integrations, sys; print('verl' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ------------------------------------------------------------------------------------------ objectives
# Every objective verl 0.9.1 ships against dler_kernels' objective of the same math, on the same logits: loss and
# d(loss)/d(logits), on the reference and the C++ backends (the latter through the two-pass objective path, PPO-clip
# through its fused kernel), for each aggregation verl honours (tests/helpers/verl_objective_checks.py).
# Tolerances, float64 inputs on both sides: the gradient 1e-8 relative (verl adds 1e-8 to each sequence's token count
# in seq-mean-token-mean and in GMPO's means, a relative change of about 1e-8 / |y|; the rest agrees to 1e-15); the
# loss 2e-7 relative (policy_loss returns its loss in float32: one rounding, 6e-8).

VERL_OBJECTIVES = ("vanilla", "gspo", "cispo", "sapo", "geo_mean", "dppo_tv", "dppo_kl")


@pytest.fixture(scope="module")
def objective_results(verl_python):
    proc = subprocess.run([verl_python, str(ROOT / "tests/helpers/verl_objective_checks.py")], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_both_backends_were_compared(objective_results):
    assert objective_results["backends"] == ["reference", "cpu"]


@pytest.mark.parametrize("name", VERL_OBJECTIVES)
def test_objective_matches_verl(objective_results, name):
    cases = {k: v for k, v in objective_results["cases"].items() if k.startswith(f"{name}/")}
    assert len(cases) >= 4, cases.keys()  # 2 seeds x 2 backends x each aggregation verl honours
    for key, case in cases.items():
        assert case["grad_norm"] > 1e-3, key  # the objective moves these logits
        assert case["grad_rel"] <= 1e-8, (key, case)
        assert case["loss_rel"] <= 2e-7, (key, case)
