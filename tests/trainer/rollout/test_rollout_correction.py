"""Rollout correction and the mismatch metrics: each mode's weights and masks on crafted ratios, the
corrected loss and gradients against the float64 reference, the normaliser a masked token leaves as it
is, the update path carrying the correction into the fused loss, and the metrics of a hand-made batch."""

import json
import math

import pytest
import torch

import dler_kernels as dk
from dler_kernels import reference as ref
from trainer.rollout.correction import RolloutCorrectionConfig, correct_rows, correction
from trainer.run.step_metrics import UpdateTotals, mismatch_record
from trainer.update.mismatch_metrics import MismatchSums
from trainer.update.packing import UpdateRow
from trainer.update.policy import accumulate_gradients, compute_logprobs, correction_inputs

# Four responses with chosen per-token ratios rho = pi_old(trainer) / pi_sampler:
#   response 0: 4, 1/4, 1   (product 1, geometric mean 1)
#   response 1: 1.5, 1.2    (product 1.8, geometric mean sqrt(1.8) = 1.342)
#   response 2: 0.4         (product and geometric mean 0.4)
#   response 3: 2, 2        (product 4, geometric mean 2)
RATIOS = [4.0, 0.25, 1.0, 1.5, 1.2, 0.4, 2.0, 2.0]
SEQ_IDS = [0, 0, 0, 1, 1, 2, 3, 3]
T, F = True, False

# (mode, low, high) -> (weights or None for all 1, mask), worked out by hand from RATIOS.
CASES = {
    ("none", None, None): (None, [T] * 8),
    # min(rho, 2) per token
    ("token_tis", None, None): ([2.0, 0.25, 1.0, 1.5, 1.2, 0.4, 2.0, 2.0], [T] * 8),
    ("token_tis", None, 3.0): ([3.0, 0.25, 1.0, 1.5, 1.2, 0.4, 2.0, 2.0], [T] * 8),
    # min(product of the response's ratios, 2) on each of its tokens
    ("seq_tis", None, None): ([1.0, 1.0, 1.0, 1.8, 1.8, 0.4, 2.0, 2.0], [T] * 8),
    # rho in [0.5, 2] kept (the bounds included), weight 1
    ("token_mis", None, None): (None, [F, F, T, T, T, F, T, T]),
    # geometric mean in [0.999, 1.001]: only response 0 (exactly 1)
    ("seq_mis", None, None): (None, [T, T, T, F, F, F, F, F]),
    ("seq_mis", 0.5, 1.5): (None, [T, T, T, T, T, F, F, F]),
    # rho in [0.5, 5] weighted rho, outside weighted 0 and left in the mask (IcePop's 1/|y_i| counts them)
    ("icepop", None, None): ([4.0, 0.0, 1.0, 1.5, 1.2, 0.0, 2.0, 2.0], [T] * 8),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
def test_each_mode_gives_the_hand_computed_weights_and_mask(case):
    mode, low, high = case
    want_weights, want_mask = CASES[case]
    log_ratio = torch.tensor(RATIOS, dtype=torch.float64).log()
    got = correction(RolloutCorrectionConfig(mode, low, high), log_ratio, torch.tensor(SEQ_IDS), 4)
    assert got.mask.tolist() == want_mask
    if want_weights is None:
        assert got.weights is None
    else:
        # float32 weights of float64 ratios: 1 ulp of float32 at these sizes
        torch.testing.assert_close(got.weights, torch.tensor(want_weights), rtol=1e-6, atol=0)


def test_the_modes_defaults_follow_the_papers():
    bounds = {m: RolloutCorrectionConfig(m).bounds for m in ("token_tis", "seq_tis", "token_mis", "seq_mis", "icepop")}
    assert bounds == {
        "token_tis": (None, 2.0),  # Yao et al.: C = 2
        "seq_tis": (None, 2.0),  # verl rollout_is_threshold
        "token_mis": (0.5, 2.0),  # verl rollout_rs: token, threshold 2 and its reciprocal
        "seq_mis": (0.999, 1.001),  # verl decoupled_geo_rs
        "icepop": (0.5, 5.0),  # Ring-1T: alpha 0.5, beta 5
    }


def test_ratios_beyond_the_log_clamp_give_finite_weights():
    cfg = RolloutCorrectionConfig("seq_tis", high=1e9)
    got = correction(cfg, torch.tensor([30.0, 30.0]), torch.tensor([0, 0]), 1)
    assert got.weights.tolist() == pytest.approx([math.exp(20.0)] * 2)  # the product clamped at exp(20)


def test_the_sequence_modes_clamp_where_verl_does():
    """Token log-ratios +25 and -24, each beyond the +-20 clamp, sum 1. seq_tis clamps the response's sum
    (verl's rollout_is: sequence): the product e, min(e, C); clamping each token first gave 20 - 20 = 0,
    weight 1. seq_mis clamps each token's before the mean (verl's seq_mean_k1): 0, kept by the default band."""
    log_ratio, seq = torch.tensor([25.0, -24.0]), torch.tensor([0, 0])
    capped = correction(RolloutCorrectionConfig("seq_tis"), log_ratio, seq, 1)
    assert capped.weights.tolist() == pytest.approx([2.0, 2.0])
    uncapped = correction(RolloutCorrectionConfig("seq_tis", high=10.0), log_ratio, seq, 1)
    assert uncapped.weights.tolist() == pytest.approx([math.e] * 2, rel=1e-6)  # float32 weights
    assert correction(RolloutCorrectionConfig("seq_mis"), log_ratio, seq, 1).mask.tolist() == [T, T]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="tis"), "mode must be one of 'none', 'token_tis'"),
        (dict(mode="none", high=2.0), "mode is 'none'"),
        (dict(mode="token_tis", low=0.5), "low is not used"),
        (dict(mode="seq_tis", high=0.5), "high .* must be >= 1"),
        (dict(mode="icepop", low=1.2), r"must hold 1 .* got \[1.2, 5.0\]"),
        (dict(mode="token_mis", high=0.9), r"got \[0.5, 0.9\]"),
        (dict(mode="seq_mis", low=-1.0), "low must be > 0"),
        (dict(mode="seq_mis", high=math.nan), "high must be a finite number"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCorrectionConfig(**kwargs)


def test_rows_are_corrected_together_and_split_back():
    old = [torch.tensor([math.log(4.0), math.log(0.25), 0.0]), torch.tensor([math.log(1.5), math.log(1.2)])]
    sampler = [torch.zeros(3), torch.zeros(2)]
    a, b = correct_rows(RolloutCorrectionConfig("seq_tis"), old, sampler)
    torch.testing.assert_close(a.weights, torch.ones(3), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.weights, torch.full((2,), 1.8), rtol=1e-6, atol=0)
    assert a.mask.tolist() == [T, T, T] and b.mask.tolist() == [T, T]
    with pytest.raises(ValueError, match="response 1 has none"):
        correct_rows(RolloutCorrectionConfig("icepop"), old, [sampler[0], None])
    with pytest.raises(ValueError, match="response 0: 2 sampler log-probs for 3"):
        correct_rows(RolloutCorrectionConfig("icepop"), old, [torch.zeros(2), sampler[1]])


# ------------------------------------------------------------------------- the loss with a correction


def _loss_inputs(seed=0, n=8, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    old = logp + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)  # PPO ratios near 1, some clipped
    adv = torch.tensor([1.0, 1.0, 1.0, -0.5, -0.5, 2.0, -1.0, -1.0], dtype=torch.float64)
    return logits, targets, old, adv


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "token_mis", "seq_mis", "icepop"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_the_corrected_fused_loss_and_gradient_equal_the_float64_reference(mode, loss_agg):
    logits, targets, old, adv = _loss_inputs()
    seq = torch.tensor(SEQ_IDS)
    fix = correction(RolloutCorrectionConfig(mode), torch.tensor(RATIOS, dtype=torch.float64).log(), seq, 4)
    weights, mask = CASES[(mode, None, None)]
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    mask = torch.tensor(mask)
    # the normaliser without the correction: every token (token-mean), every response (seq-mean)
    normalizer = 8.0 if loss_agg == "token-mean" else 4.0
    options = dict(seq_ids=seq, loss_agg=loss_agg, normalizer=normalizer, eps_low=0.2, eps_high=0.28, clip_c=10.0)

    leaf64 = logits.clone().requires_grad_(True)
    want = ref.policy_loss_ref(leaf64, targets, old, adv, mask, token_weights=weights, **options)[0]
    want.backward()

    leaf = logits.float().requires_grad_(True)
    got = dk.policy_loss(leaf, targets, old.float(), adv.float(), fix.mask, token_weights=fix.weights, **options)
    got.loss.backward()
    # float32 kernel against the float64 reference on O(1) values: measured ~1e-7
    assert float(got.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-6)


def test_a_masked_token_leaves_the_numerator_and_not_the_normaliser():
    """token-mean: loss = sum over kept tokens of w * l / (all 8 tokens), not / (the 5 kept)."""
    logits, targets, old, adv = _loss_inputs()
    mask = torch.tensor(CASES[("token_mis", None, None)][1])
    plain = ref.policy_loss_ref(logits, targets, old, adv, torch.ones(8, dtype=torch.bool), normalizer=8.0)
    per_token = plain[1]
    masked = ref.policy_loss_ref(logits, targets, old, adv, mask, normalizer=8.0)[0]
    assert float(masked) == pytest.approx(float(per_token[mask].sum() / 8), rel=1e-12)
    assert float(masked) != pytest.approx(float(per_token[mask].sum() / 5), rel=1e-3)


def test_truncation_and_masking_move_each_tokens_gradient_as_expected():
    """Token 0 has ratio 4: token_tis weighs it C = 2 (twice the uncorrected gradient, half the full
    IS weight's); token_mis masks it (zero gradient) and leaves every other row's gradient unchanged."""
    logits, targets, old, adv = _loss_inputs()
    log_ratio, seq = torch.tensor(RATIOS, dtype=torch.float64).log(), torch.tensor(SEQ_IDS)

    def grad(mode, full_is=False):
        fix = correction(RolloutCorrectionConfig(mode), log_ratio, seq, 4)
        weights = torch.tensor(RATIOS) if full_is else fix.weights
        leaf = logits.float().requires_grad_(True)
        dk.policy_loss(
            leaf, targets, old.float(), adv.float(), fix.mask, token_weights=weights, normalizer=8.0
        ).loss.backward()
        return leaf.grad

    none, tis, mis, full = grad("none"), grad("token_tis"), grad("token_mis"), grad("none", full_is=True)
    assert none[0].abs().sum() > 0
    torch.testing.assert_close(tis[0], 2.0 * none[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tis[0], 0.5 * full[0], rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(mis[0]) == 0
    kept = torch.tensor(CASES[("token_mis", None, None)][1])
    torch.testing.assert_close(mis[kept], none[kept], rtol=0, atol=0)


# ----------------------------------------------------------------------- the update path (policy.py)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused-head"])
def test_the_update_passes_the_rows_correction_to_the_fused_loss(model, fused_head):
    """accumulate_gradients with rows carrying icepop weights (0 off the band) and masks equals the reference
    on one unpacked batch with those weights and mask, normalised by every response token."""
    gen = torch.Generator().manual_seed(4)
    rows = []
    for p, r in ((3, 4), (2, 3), (4, 1)):
        ids = torch.randint(0, 49152, (p + r,), generator=gen).tolist()
        rows.append(UpdateRow(ids[:p], ids[p:], float(torch.randn(1, generator=gen))))
    old = compute_logprobs(model, rows, token_budget=10**6, temperature=1.0)
    sampler = [o + 0.8 * torch.randn(o.shape, generator=gen) for o in old]  # a badly mismatched engine
    fixes = correct_rows(RolloutCorrectionConfig("icepop"), old, sampler)
    assert 0 < sum(int((f.weights == 0).sum()) for f in fixes) < 8, "the crafted gap must drop some tokens, not all"
    for row, o, f in zip(rows, old, fixes):
        row.old_logprobs, row.token_weights, row.loss_mask = o + 0.05, f.weights, f.mask

    model.zero_grad(set_to_none=True)
    logits = torch.cat(
        [
            model(input_ids=torch.tensor([r.prompt_ids + r.response_ids])).logits[0, len(r.prompt_ids) - 1 : -1]
            for r in rows
        ]
    )
    targets = torch.tensor([t for r in rows for t in r.response_ids])
    adv = torch.tensor([r.advantage for r in rows for _ in r.response_ids])
    want = ref.policy_loss_ref(
        logits, targets, torch.cat([r.old_logprobs for r in rows]), adv, torch.cat([f.mask for f in fixes]),
        token_weights=torch.cat([f.weights for f in fixes]), normalizer=8.0,
    )[0]  # fmt: skip
    want.backward()
    expected = _grads(model)

    model.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, rows, {}, token_budget=6, fused_head=fused_head)
    # float32, packing changes only the summation order (as test_policy): measured ~1e-7
    assert metrics["loss"] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    assert metrics["tokens"] == 8 and metrics["valid"] == sum(int(f.mask.sum()) for f in fixes)
    got = _grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------- the metrics


def _row(old, sampler, **kwargs):
    n = len(old)
    return UpdateRow(
        [1], list(range(n)), 0.0, old_logprobs=torch.tensor(old), sampler_logprobs=torch.tensor(sampler), **kwargs
    )


def test_mismatch_metrics_of_a_hand_made_batch():
    # d = old - sampler per token: [0.5, -1.0] and [0.0, 2.0, -0.25]
    rows = [_row([-1.0, -2.0], [-1.5, -1.0]), _row([-0.5, -1.0, -3.0], [-0.5, -3.0, -2.75])]
    rows.append(UpdateRow([1], [5], 0.0, old_logprobs=torch.tensor([-9.0])))  # no engine log-probs: left out
    got = MismatchSums.of(rows, corrected=False).as_record()
    d = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.25], dtype=torch.float64)
    assert got["mismatch_logp_abs_mean"] == pytest.approx(3.75 / 5)
    assert got["mismatch_logp_abs_max"] == pytest.approx(2.0)
    assert got["mismatch_kl_k1"] == pytest.approx(-float(d.sum()) / 5)  # mean of log sampler - log trainer
    assert got["mismatch_kl_k3"] == pytest.approx(float((d.exp() - 1 - d).mean()))
    assert got["mismatch_ratio_outside"] == pytest.approx(2 / 5)  # e^-1 = 0.37 and e^2 = 7.4 leave [0.5, 2]
    assert (got["mismatch_seq_log_ratio_min"], got["mismatch_seq_log_ratio_max"]) == pytest.approx((-0.5, 1.75))
    assert "mismatch_masked_frac" not in got and "mismatch_weight_mean" not in got


def test_the_perplexity_ratio_is_taken_per_response_then_averaged_over_responses_and_ranks():
    # d = old - sampler per token: [0.5, -1.0] (mean -0.25) and [0.0, 2.0, -0.25] (mean 7/12); the log of the
    # trainer's perplexity over the sampler's is -mean d per response: 0.25 and -7/12
    a, b = _row([-1.0, -2.0], [-1.5, -1.0]), _row([-0.5, -1.0, -3.0], [-0.5, -3.0, -2.75])
    empty = _row([], [])  # no tokens, no perplexity: left out of the average, not counted as ratio 1
    got = mismatch_record([MismatchSums.of([a, empty], corrected=False), MismatchSums.of([b], corrected=False)])
    assert got["mismatch_log_ppl_diff"] == pytest.approx((0.25 - 7 / 12) / 2, rel=1e-12)
    assert got["mismatch_ppl_ratio"] == pytest.approx((math.exp(0.25) + math.exp(-7 / 12)) / 2, rel=1e-12)
    assert got == pytest.approx(MismatchSums.of([a, b, empty], corrected=False).as_record())
    assert "mismatch_ppl_ratio" not in MismatchSums.of([empty], corrected=False).as_record()


def test_correction_metrics_and_the_merge_over_ranks():
    a = _row([0.0, 0.0], [0.0, 0.0], token_weights=torch.tensor([2.0, 0.5]), loss_mask=torch.tensor([T, F]))
    b = _row([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], loss_mask=torch.tensor([T, T, F]))  # a masking mode: weight 1
    one = MismatchSums.of([a, b], corrected=True).as_record()
    merged = mismatch_record([MismatchSums.of([a], corrected=True), None, MismatchSums.of([b], corrected=True)])
    assert one == pytest.approx(merged)
    assert one["mismatch_masked_frac"] == pytest.approx(2 / 5)
    assert one["mismatch_weight_mean"] == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    assert one["mismatch_logp_abs_max"] == 0.0 and one["mismatch_kl_k3"] == 0.0


def test_icepops_weight_0_tokens_count_as_left_out_in_the_metrics():
    # icepop leaves the mask whole and weighs its off-band tokens 0: they are what it left out
    row = _row([0.0] * 3, [0.0] * 3, token_weights=torch.tensor([2.0, 0.0, 1.0]), loss_mask=torch.tensor([T, T, T]))
    got = MismatchSums.of([row], corrected=True).as_record()
    assert got["mismatch_masked_frac"] == pytest.approx(1 / 3)
    assert got["mismatch_weight_mean"] == pytest.approx((2.0 + 1.0) / 2)


def test_no_measurement_leaves_the_keys_out():
    assert mismatch_record([None, None]) == {}  # the bypass: no trainer old log-probs
    rows = [UpdateRow([1], [2], 0.0, old_logprobs=torch.zeros(1))]  # an engine without log-probs
    assert mismatch_record([MismatchSums.of(rows, corrected=False)]) == {}


def test_the_console_table_shows_the_gap_and_a_dash_without_it():
    from trainer.run.run_log import TABLE_HEADER, table_row

    assert "dlogp" in TABLE_HEADER.split()
    column = TABLE_HEADER.split().index("dlogp")
    assert table_row({"mismatch_logp_abs_max": 0.01234}).split()[column] == "0.0123"
    assert table_row({}).split()[column] == "-"  # the bypass measures no gap


def test_a_step_whose_every_token_was_masked_records_no_ratio_extremes():
    # seq_mis's tight default band can mask a whole mini-batch on a bf16 engine: the kernel then has no
    # ratio to report (+-inf), which must not reach metrics.jsonl as Infinity (not JSON).
    all_masked = UpdateTotals()
    all_masked.add({"loss": 0.0, "tokens": 12.0, "valid": 0.0, "ratio_max": -math.inf, "ratio_min": math.inf}, 0.0)
    record = all_masked.means(lr=1e-3)
    assert "ratio_max" not in record and "ratio_min" not in record
    json.dumps(record, allow_nan=False)
    kept = UpdateTotals()
    kept.add({"loss": 0.1, "tokens": 12.0, "valid": 3.0, "ratio_max": 1.5, "ratio_min": 0.75}, 0.2)
    assert kept.means(lr=1e-3)["ratio_max"] == 1.5 and kept.means(lr=1e-3)["ratio_min"] == 0.75


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["algorithm.old_logprobs=sampler"], "algorithm.old_logprobs=sampler", "algorithm.old_logprobs=recompute"),
        (["algorithm.rollout_correction.mode=icepop"], "algorithm.rollout_correction 'icepop'", "mode=none"),
    ],
)
def test_a_batch_without_the_engines_log_probs_is_refused_naming_the_key_and_the_fix(overrides, key, fix):
    from trainer.config import load_config
    from trainer.fsutil import UserError
    from trainer.train import require_sampler_logprobs

    cfg = load_config("toy-cpu", overrides)
    whole = [UpdateRow([1], [2, 3], 0.5, sampler_logprobs=torch.tensor([-0.1, -0.2]))]
    require_sampler_logprobs(whole, cfg)  # every token has its log-prob: nothing to refuse
    with pytest.raises(UserError, match=f"{key} needs the engine's log-prob.*response 1 of this rank.*{fix}"):
        require_sampler_logprobs(whole + [UpdateRow([1], [2], 0.5)], cfg)


def test_under_seq_mean_token_mean_a_masked_token_raises_its_responses_kept_tokens_weight():
    """The documented exception to 'numerator only': response 0 has 9 of its 10 tokens masked, so its kept
    token weighs 10x a token of the unmasked response 1 (each response's mean is over its kept tokens)."""
    valid = torch.tensor([True] + [False] * 9 + [True] * 10)
    seq_ids = torch.tensor([0] * 10 + [1] * 10)
    weights = ref.aggregation_weights(valid, "seq-mean-token-mean", seq_ids, 2.0, None)
    assert float(weights[0]) == pytest.approx(0.5) and float(weights[10]) == pytest.approx(0.05)


@pytest.mark.parametrize("loss_agg", ref.LOSS_AGGS)
def test_icepop_divides_each_response_by_all_its_tokens_under_every_aggregation(loss_agg):
    """One response of 4 tokens with ratios 1, 1, 1, 10 (the last off IcePop's [0.5, 5]), advantage 1 and the
    policy unchanged (PPO ratio 1): each token's loss is -1 and the off-band one weighs 0, so IcePop's
    1 / |y_i| gives -3/4. A mask would have made seq-mean-token-mean's inner mean over the 3 kept tokens: -1."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 13, generator=gen)
    targets = torch.randint(0, 13, (4,), generator=gen)
    old = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    sampler = old - torch.tensor([1.0, 1.0, 1.0, 10.0]).log()
    (fix,) = correct_rows(RolloutCorrectionConfig("icepop"), [old], [sampler])
    row = UpdateRow([1], list(range(4)), 1.0, old_logprobs=old, token_weights=fix.weights, loss_mask=fix.mask)
    mask, weights = correction_inputs([row], torch.device("cpu"))
    normalizer = 4.0 if loss_agg == "token-mean" else 1.0  # accumulate_gradients': tokens, or responses
    got = dk.policy_loss(logits, targets, old, torch.ones(4), mask, token_weights=weights, seq_ids=torch.zeros(4,
                         dtype=torch.long), loss_agg=loss_agg, normalizer=normalizer, norm_length=4.0)  # fmt: skip
    want = -3.0 if loss_agg == "seq-mean-token-sum" else -0.75
    # float32, PPO ratio 1 up to the kernel's and torch's log-softmax rounding (~1e-7)
    assert float(got.loss) == pytest.approx(want, abs=1e-6)
