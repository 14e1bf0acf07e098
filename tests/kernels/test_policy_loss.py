"""The logits path (fused Triton kernel through the interpreter, and the reference backend) against
float64 autograd of the reference.

Tolerances (issue 3): log-prob abs <= 1e-5, loss rel <= 1e-5, gradient rel <= 1e-4 in float32
arithmetic. A bf16/fp16 gradient is additionally rounded once to its storage dtype (autograd
requires the dtype of the logits), so for those the bound per element is that rounding
(2^-8 relative for bf16, 2^-11 for fp16, i.e. one ulp) plus 1e-4 of the gradient's scale; the
float32 accumulation itself is checked at 1e-4 with a float32 gradient buffer.
"""

import itertools

import pytest
import torch
from oracle_checks import (
    BACKENDS,
    OPTION_SETS,
    assert_bad_input_named,
    check_loss_terms,
    logits_inputs,
    masked_vocab_logits_inputs,
    rel,
    store_rounding,
    zero_probability_refused,
    zero_probability_rows,
)

import dler_kernels
from dler_kernels import policy_loss, reference, token_logprobs
from dler_kernels.dispatch import backend_named
from dler_kernels.loss_inputs import LossOptions, check_token_data
from dler_kernels.reference import KL_TYPES, LOSS_AGGS


def oracle(tensors, extra, **opts):
    """float64 reference on the same (already rounded) inputs, with its autograd gradient."""
    x = tensors["logits"].double().requires_grad_(True)
    ref_lp = extra["ref_logprobs"].double()
    loss, per_token, logp, ent, metrics = reference.policy_loss_ref(
        x, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
        ref_logprobs=ref_lp, seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), per_token, logp, ent, metrics, x.grad


def run(tensors, extra, **opts):
    x = tensors["logits"].clone().requires_grad_(True)
    out = policy_loss(**{**tensors, "logits": x}, **extra, **opts)
    out.loss.backward()
    return out, x.grad


def check_against_oracle(out, grad, tensors, extra, opts, backend_used):
    loss64, pt64, lp64, ent64, m64, grad64 = oracle(tensors, extra, **opts)
    check_loss_terms(out, loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    dtype = tensors["logits"].dtype
    if dtype == torch.float32:
        assert rel(grad, grad64) <= 1e-4
    else:
        rounding = store_rounding(dtype, backend_used, tensors["logits"].is_cuda)
        bound = rounding * grad64.abs() + 1e-4 * grad64.abs().max()
        assert bool(((grad.double() - grad64).abs() <= bound).all()), rel(grad, grad64)


# Each shape gets a different option set, so that together they cover every choice.
SHAPES = [(1, 1), (3, 7), (17, 1000), (5, 4097), (2, 49152), (6, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_matches_float64(backend, shape, dtype):
    n, v = shape
    opts = OPTION_SETS[(SHAPES.index(shape) + [torch.float32, torch.bfloat16, torch.float16].index(dtype)) % 4]
    tensors, extra = logits_inputs(n, v, dtype, seed=n * 1000 + v)
    out, grad = run(tensors, extra, **opts)
    check_against_oracle(out, grad, tensors, extra, opts, backend)


@pytest.mark.parametrize(
    "loss_agg,kl_type,clip_c,entropy_coef", list(itertools.product(LOSS_AGGS, KL_TYPES, [10.0, None], [0.0, 0.01]))
)
def test_every_option_combination(backend, loss_agg, kl_type, clip_c, entropy_coef):
    tensors, extra = logits_inputs(10, 37, seed=7)
    opts = dict(loss_agg=loss_agg, kl_type=kl_type, clip_c=clip_c, entropy_coef=entropy_coef, beta=0.1,
                temperature=0.8, norm_length=40.0)  # fmt: skip
    out, grad = run(tensors, extra, **opts)
    check_against_oracle(out, grad, tensors, extra, opts, backend)


@pytest.mark.skipif(not dler_kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_accumulates_in_float32_for_half_inputs(dtype):
    from dler_kernels.reference import aggregation_weights
    from dler_kernels.triton_policy_loss import launch_rows

    tensors, extra = logits_inputs(9, 1000, dtype, seed=3)
    valid = tensors["mask"]
    weights = aggregation_weights(valid, "token-mean", None, None, None)
    grad = torch.empty(tensors["logits"].shape, dtype=torch.float32)
    launch_rows(tensors["logits"], torch.where(valid, tensors["targets"], 0), valid, old=tensors["old_logprobs"],
            adv=tensors["advantages"], weights=weights, grad=grad, compute_loss=True, clip_c=10.0)  # fmt: skip
    *_, grad64 = oracle(tensors, extra, loss_agg="token-mean")
    assert rel(grad, grad64) <= 1e-4


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_all_rows_masked(backend, loss_agg):
    tensors, extra = logits_inputs(6, 50, seed=1)
    tensors["mask"] = torch.zeros(6, dtype=torch.bool)
    out, grad = run(tensors, extra, loss_agg=loss_agg, beta=0.1, entropy_coef=0.01, norm_length=10.0)
    assert out.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.isfinite(out.per_token_loss).all() and out.metrics["num_tokens"].item() == 0


def test_masked_rows_are_never_read(backend):
    tensors, extra = logits_inputs(8, 64, seed=2)
    mask = tensors["mask"]
    poisoned = {**tensors, "logits": tensors["logits"].clone(), "targets": tensors["targets"].clone()}
    poisoned["logits"][~mask] = float("nan")
    poisoned["targets"][~mask] = -100
    out, grad = run(poisoned, extra, loss_agg="seq-mean-token-mean", entropy_coef=0.01)
    clean, clean_grad = run(tensors, extra, loss_agg="seq-mean-token-mean", entropy_coef=0.01)
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-6)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], clean_grad[mask])
    assert torch.equal(out.logprobs[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_gradient_equals_out_of_place(backend, dtype):
    tensors, extra = logits_inputs(7, 300, dtype, seed=4)
    opts = dict(beta=0.1, entropy_coef=0.01, temperature=0.7)
    out, grad = run(tensors, extra, **opts)
    buffer = tensors["logits"].clone()
    out_ip = policy_loss(**{**tensors, "logits": buffer}, **extra, inplace_grad=True, **opts)
    assert out_ip.loss.item() == out.loss.item()
    assert torch.equal(buffer, grad)  # the logits buffer now holds the gradient, on every backend


def test_backward_scales_the_stored_gradient(backend):
    tensors, extra = logits_inputs(5, 20, seed=5)
    out, grad = run(tensors, extra)
    x = tensors["logits"].clone().requires_grad_(True)
    (3.0 * policy_loss(**{**tensors, "logits": x}, **extra).loss).backward()
    torch.testing.assert_close(x.grad, 3.0 * grad)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_weights_scale_each_token_loss(backend, loss_agg):
    """Truncated importance-sampling weights: each token's whole loss times its weight, before the
    aggregation (the float64 oracle applies them to the reference's per-token loss)."""
    tensors, extra = logits_inputs(11, 45, seed=12)
    weights = torch.rand(11, generator=torch.Generator().manual_seed(3)) * 2.0
    opts = dict(loss_agg=loss_agg, kl_type="k3_ratio", beta=0.1, entropy_coef=0.01, norm_length=30.0,
                token_weights=weights)  # fmt: skip
    out, grad = run(tensors, extra, **opts)
    check_against_oracle(out, grad, tensors, extra, opts, backend)
    plain, _ = run(tensors, extra, **{**opts, "token_weights": None})
    torch.testing.assert_close(out.per_token_loss, plain.per_token_loss)  # returned without the weights
    ones, ones_grad = run(tensors, extra, **{**opts, "token_weights": torch.ones(11)})
    assert ones.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
def test_opsm_drops_the_policy_term_of_drifted_sequences_with_negative_advantages(backend, objective):
    """OPSM (opsm_threshold = delta): a sequence with A < 0 whose mean log(pi_old / pi) exceeds delta loses its
    policy-gradient term, its KL term stays; so the loss and gradient are those of the same batch with that
    sequence's advantages set to 0. Sequences (3 tokens each): A > 0 drifted (kept), A < 0 drifted (dropped),
    A < 0 close (kept), A < 0 drifted with one token masked (dropped: its mean is over its valid tokens)."""
    tensors, extra = logits_inputs(12, 40, seed=21, masked_frac=0.0)
    tensors["mask"][10] = False
    exact = reference.token_logprobs_ref(tensors["logits"].double(), tensors["targets"]).float()
    drift = torch.tensor([0.8, 0.8, 0.1, 0.8]).repeat_interleave(3)
    tensors["old_logprobs"] = exact + drift + 0.05 * torch.randn(12, generator=torch.Generator().manual_seed(4))
    tensors["advantages"] = torch.tensor([1.0, -1.0, -0.5, -0.7]).repeat_interleave(3)
    opts = dict(objective=objective, loss_agg="seq-mean-token-mean", beta=0.1, kl_type="k3_ratio")
    out, grad = run(tensors, extra, **opts, opsm_threshold=0.5)
    check_against_oracle(out, grad, tensors, extra, {**opts, "opsm_threshold": 0.5}, backend)
    loss64, *_, grad64 = oracle(tensors, extra, **opts, opsm_threshold=0.5)
    dropped = dict(tensors, advantages=torch.where(torch.arange(12) // 3 % 2 == 1, 0.0, tensors["advantages"]))
    expected64, *_, expected_grad64 = oracle(dropped, extra, **opts)
    assert loss64.item() == pytest.approx(expected64.item(), rel=1e-12)
    torch.testing.assert_close(grad64, expected_grad64, rtol=1e-12, atol=1e-15)
    plain64, *_ = oracle(tensors, extra, **opts)
    assert plain64.item() != pytest.approx(loss64.item(), rel=1e-3)  # the mask acts


def test_global_normalizer_makes_accumulation_equal_one_batch(backend):
    tensors, extra = logits_inputs(12, 40, seed=6)
    full, full_grad = run(tensors, extra, loss_agg="token-mean")
    total = int(tensors["mask"].sum())
    halves, grads = [], []
    for rows in (slice(0, 5), slice(5, 12)):
        part = {k: t[rows] for k, t in tensors.items()}
        part_extra = {k: t[rows] for k, t in extra.items()}
        out, grad = run(part, part_extra, loss_agg="token-mean", normalizer=total)
        halves.append(out.loss)
        grads.append(grad)
    assert sum(halves).item() == pytest.approx(full.loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_grad)


def test_seq_normalizer_counts_sequences(backend):
    tensors, extra = logits_inputs(9, 30, seed=8, masked_frac=0.0)
    out, _ = run(tensors, extra, loss_agg="seq-mean-token-sum", normalizer=6)
    local, _ = run(tensors, extra, loss_agg="seq-mean-token-sum")  # 3 sequences here
    assert out.loss.item() == pytest.approx(local.loss.item() * 3 / 6, rel=1e-6)


def test_nonfinite_logits_give_nonfinite_loss_and_a_metric(backend):
    tensors, extra = logits_inputs(4, 16, seed=9, masked_frac=0.0)
    tensors["logits"][2, 5] = float("inf")
    out = policy_loss(**tensors, **extra)
    assert not torch.isfinite(out.loss)
    assert out.metrics["num_nonfinite"].item() >= 1


def test_clip_metrics_on_a_known_case(backend):
    logits = torch.zeros(4, 8)  # uniform: log-prob = -log 8 for every target
    lp = -torch.log(torch.tensor(8.0))
    old = torch.stack([lp - 0.7, lp + 0.7, lp, lp + 3.0])  # ratios 2.01, 0.50, 1, 20.1
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = policy_loss(logits, torch.zeros(4, dtype=torch.long), old, adv, torch.ones(4, dtype=torch.bool), clip_c=3.0)
    m = out.metrics
    assert m["clip_frac_high"].item() == 0.25  # row 0: ratio 2 > 1.28 with A > 0
    assert m["clip_frac_low"].item() == 0.5  # rows 1 and 3: ratio < 0.8 with A < 0
    assert m["clip_frac_dual"].item() == 0.0  # row 1: loss 0.8 < 3; row 3's ratio is low, loss 0.8 too
    assert m["ratio_max"].item() == pytest.approx(2.0138, rel=1e-4)
    assert m["num_tokens"].item() == 4
    out = policy_loss(logits, torch.zeros(4, dtype=torch.long), lp - torch.tensor([0, 0, 0, 2.0]), adv,
                      torch.ones(4, dtype=torch.bool), clip_c=3.0)  # fmt: skip
    assert out.metrics["clip_frac_dual"].item() == 0.25  # row 3: ratio 7.4, A=-1, loss 7.4 > 3
    assert out.per_token_loss[3].item() == pytest.approx(3.0)


def test_reference_gradient_passes_gradcheck():
    tensors, extra = logits_inputs(4, 6, torch.float64, seed=11)

    def f(x):
        return reference.policy_loss_ref(
            x, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
            ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], beta=0.1, entropy_coef=0.02,
            temperature=0.7, loss_agg="seq-mean-token-mean",
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (tensors["logits"].clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- -inf logits (a masked vocabulary)
# The spec (reference module docstring): probability 0, p log p = 0 (nothing added to the entropy), gradient
# exactly 0; a valid row whose target has probability 0 is a ValueError naming logits and the row. Before:
# NaN loss and gradient on cpu and triton, NaN entropy on every backend. Same tolerances as above.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 7), (9, 1000), (5, 4097), (3, 49152)], ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_minus_inf_logits_match_float64_and_get_zero_gradient(backend, shape, dtype):
    n, v = shape
    opts = dict(OPTION_SETS[(n + v) % 4], entropy_coef=0.01)  # an entropy term, whose gradient meets p log p
    tensors, extra, cut = masked_vocab_logits_inputs(n, v, dtype, seed=n + v)
    out, grad = run(tensors, extra, **opts)
    check_against_oracle(out, grad, tensors, extra, opts, backend)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[cut], torch.zeros_like(grad[cut]))
    assert out.entropy[0].item() == 0.0  # row 0 keeps its target alone: probability 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_logits_inplace_gradient_equals_out_of_place(backend, dtype):
    tensors, extra, cut = masked_vocab_logits_inputs(7, 300, dtype, seed=4)
    opts = dict(beta=0.1, entropy_coef=0.01, temperature=0.7)
    out, grad = run(tensors, extra, **opts)
    buffer = tensors["logits"].clone()
    out_ip = policy_loss(**{**tensors, "logits": buffer}, **extra, inplace_grad=True, **opts)
    assert out_ip.loss.item() == out.loss.item() and torch.isfinite(out_ip.loss)
    assert torch.equal(buffer, grad) and torch.equal(buffer[cut], torch.zeros_like(buffer[cut]))


@pytest.mark.parametrize("shape", [(4, 7), (6, 4097)], ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_token_logprobs_with_minus_inf_logits_match_float64(backend, shape):
    n, v = shape
    tensors, _, _ = masked_vocab_logits_inputs(n, v, seed=v)
    targets = torch.where(tensors["mask"], tensors["targets"], -100)  # the masked rows (all -inf) are padding
    lp, ent = token_logprobs(tensors["logits"], targets, temperature=0.8, return_entropy=True)
    lp64, ent64 = reference.token_logprobs_ref(tensors["logits"].double(), targets, temperature=0.8,
                                               return_entropy=True)  # fmt: skip
    assert torch.isfinite(lp64).all() and torch.isfinite(ent64).all()
    assert (lp.double() - lp64).abs().max() <= 1e-5
    assert (ent.double() - ent64).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())


def test_reference_gradient_with_minus_inf_logits_passes_gradcheck():
    """The spec's own autograd, p log p = 0 included, against finite differences (the -inf entries held fixed:
    their gradient is checked to be exactly 0)."""
    tensors, extra, cut = masked_vocab_logits_inputs(4, 6, torch.float64, seed=11)
    base = tensors["logits"]

    def f(finite):
        x = base.masked_scatter(~cut, finite)
        return reference.policy_loss_ref(
            x, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
            ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], beta=0.1, entropy_coef=0.02,
            temperature=0.7, loss_agg="seq-mean-token-mean",
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (base[~cut].clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    x = base.clone().requires_grad_(True)
    reference.policy_loss_ref(x, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(),
                              tensors["mask"], entropy_coef=0.02)[0].backward()  # fmt: skip
    assert torch.equal(x.grad[cut], torch.zeros_like(x.grad[cut]))


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_a_valid_row_whose_target_has_probability_0_is_refused(backend, inplace_grad):
    """On every entry point, naming the first such row; a masked (or padding) row of only -inf is not one."""
    tensors, extra = logits_inputs(6, 40, seed=13)
    assert not tensors["mask"].all()
    for _case, logits, row in zero_probability_rows(tensors["logits"], tensors["targets"], tensors["mask"]):
        args = {**tensors, "logits": logits.clone().requires_grad_(not inplace_grad)}
        with zero_probability_refused(row):
            policy_loss(**args, **extra, inplace_grad=inplace_grad)
        with torch.no_grad(), zero_probability_refused(row):
            policy_loss(**{**args, "logits": logits}, **extra)
        padded = torch.where(tensors["mask"], tensors["targets"], -100)
        with zero_probability_refused(row):
            token_logprobs(logits, padded, return_entropy=True)
        with zero_probability_refused(row):
            token_logprobs(logits, padded)
    # Rows of only -inf are fine where masked (policy_loss) or padding (token_logprobs): never read.
    poisoned = tensors["logits"].clone()
    poisoned[~tensors["mask"]] = float("-inf")
    clean, clean_grad = run(tensors, extra, entropy_coef=0.01)
    out, grad = run({**tensors, "logits": poisoned}, extra, entropy_coef=0.01)
    assert out.loss.item() == clean.loss.item() and torch.equal(grad, clean_grad)
    padded = torch.where(tensors["mask"], tensors["targets"], -100)
    lp, ent = token_logprobs(poisoned, padded, return_entropy=True)
    assert torch.equal(lp[~tensors["mask"]], torch.zeros_like(lp[~tensors["mask"]]))
    assert torch.equal(ent[~tensors["mask"]], torch.zeros_like(ent[~tensors["mask"]]))


def test_the_reference_refuses_a_target_of_probability_0_too():
    tensors, extra = logits_inputs(6, 40, seed=13)
    for _case, logits, row in zero_probability_rows(tensors["logits"], tensors["targets"], tensors["mask"]):
        with zero_probability_refused(row):
            reference.policy_loss_ref(**{**tensors, "logits": logits})
        with zero_probability_refused(row):
            reference.token_logprobs_ref(logits, torch.where(tensors["mask"], tensors["targets"], -100))


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_kernels_give_minus_inf_exactly_to_a_target_of_probability_0_and_nan_to_nan_logits(name):
    """What the public check reads: each backend's row pass returns log-prob -inf exactly for a probability-0
    target (entropy 0 when the whole row is -inf), and NaN, never -inf, for a row holding a NaN or +inf logit
    (the non-finite loss that the num_nonfinite metric counts, not the error). -inf logits get gradient 0
    (those of a row of only -inf too, but for the reference's autograd, which gives that refused row NaN)."""
    if name not in BACKENDS:
        pytest.skip(f"{name} cannot run on CPU tensors here")
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, 1.0, -inf, 2.0], [-inf] * 4, [0.0, inf, 1.0, 2.0], [0.0, nan, 1.0, 2.0],
                           [-inf, -inf, 3.0, -inf], [0.5, 0.0, 1.0, 2.0]])  # fmt: skip
    targets = torch.tensor([2, 1, 0, 0, 2, 1])
    n = len(targets)
    chosen = backend_named(name)
    lp, ent = chosen.token_logprobs(logits, targets, 1.0, True)
    assert lp[0].item() == -inf and lp[1].item() == -inf and ent[1].item() == 0.0 and bool(torch.isfinite(ent[0]))
    assert lp[2].isnan() and lp[3].isnan()
    assert lp[4].item() == 0.0 and ent[4].item() == 0.0  # probability 1
    options = LossOptions(entropy_coef=0.01)
    data = check_token_data(n, 4, logits.device, targets, torch.full((n,), -1.0), torch.ones(n),
                            torch.ones(n, dtype=torch.bool), options)  # fmt: skip
    x = logits.clone().requires_grad_(True)
    with torch.enable_grad():
        loss, per_token, logp, entropy, _ = chosen.policy_loss(x, data, options, False)
        loss.backward()
    assert logp[0].item() == -inf and logp[1].item() == -inf and logp[2].isnan() and logp[3].isnan()
    cut = torch.isneginf(logits)
    if name == "reference":
        cut[1] = False
    assert torch.equal(x.grad[cut], torch.zeros_like(x.grad[cut]))
    assert torch.isfinite(x.grad[4:]).all()


# ---------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (13, 4097), (2, 49152)], ids=lambda s: f"N{s[0]}-V{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_matches_float64(backend, shape, dtype):
    n, v = shape
    logits = (torch.randn(n, v) * 4).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[0] = -100  # a padding row
    lp, ent = token_logprobs(logits, targets, temperature=0.8, return_entropy=True)
    lp64, ent64 = reference.token_logprobs_ref(logits.double(), targets, temperature=0.8, return_entropy=True)
    assert lp.dtype == torch.float32 and (lp.double() - lp64).abs().max() <= 1e-5
    assert (ent.double() - ent64).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())
    assert lp[0].item() == 0.0 and ent[0].item() == 0.0
    assert torch.equal(token_logprobs(logits, targets, temperature=0.8), lp)


# ---------------------------------------------------------------- bad input


def _good():
    tensors, extra = logits_inputs(4, 10, seed=0)
    return {**tensors, **extra}


BAD_INPUTS = [
    ("logits", lambda a: a.update(logits=a["logits"][0]), "logits must be 2-D"),
    ("logits", lambda a: a.update(logits=a["logits"].long()), "logits must be float"),
    ("logits", lambda a: a.update(logits=a["logits"].t().contiguous().t()), "contiguous"),
    ("targets", lambda a: a.update(targets=a["targets"].float()), "targets must be an integer"),
    ("targets", lambda a: a.update(targets=a["targets"][:3]), "targets must have 4 entries"),
    ("targets", lambda a: a.update(targets=torch.tensor([0, 1, 2, 10]), mask=torch.ones(4, dtype=torch.bool)),
     "targets must lie in [0, 10)"),
    ("old_logprobs", lambda a: a.update(old_logprobs=a["old_logprobs"][:, None]), "old_logprobs must be 1-D"),
    ("advantages", lambda a: a.update(advantages=a["advantages"].long()), "advantages must be float"),
    ("mask", lambda a: a.update(mask=a["mask"][:2]), "mask must have 4 entries"),
    ("loss_agg", lambda a: a.update(loss_agg="mean"), "loss_agg must be one of"),
    ("kl_type", lambda a: a.update(kl_type="k4"), "kl_type must be one of"),
    ("eps_low", lambda a: a.update(eps_low=1.5), "eps_low must be < 1"),
    ("eps_high", lambda a: a.update(eps_high=-0.1), "eps_high must be >= 0"),
    ("clip_c", lambda a: a.update(clip_c=0.5), "clip_c must be > 1"),
    ("temperature", lambda a: a.update(temperature=0.0), "temperature must be > 0"),
    ("beta", lambda a: a.update(beta=0.1, ref_logprobs=None), "ref_logprobs is required"),
    ("seq_ids", lambda a: a.update(loss_agg="seq-mean-token-mean", seq_ids=None), "seq_ids is required"),
    ("norm_length", lambda a: a.update(loss_agg="seq-mean-token-sum-norm"), "norm_length is required"),
    ("normalizer", lambda a: a.update(normalizer=0), "normalizer must be > 0"),
    ("token_weights", lambda a: a.update(token_weights=torch.ones(3)), "token_weights must have 4 entries"),
    ("token_weights", lambda a: a.update(token_weights=torch.ones(4, dtype=torch.long)), "token_weights must be float"),
]  # fmt: skip


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, mutate, message):
    assert_bad_input_named(policy_loss, _good(), mutate, name, message)


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 4, 1]), temperature=-1.0)


@pytest.mark.gpu
def test_no_recompilation_for_a_new_number_of_tokens():
    from dler_kernels._launch import compiled_variants
    from dler_kernels.triton_policy_loss import _policy_loss_kernel

    for n in (17, 1000, 4099):
        tensors, extra = logits_inputs(n, 4097, torch.bfloat16, seed=n)
        tensors = {k: t.cuda() for k, t in tensors.items()}
        policy_loss(**tensors, ref_logprobs=extra["ref_logprobs"].cuda(), seq_ids=extra["seq_ids"].cuda())
        if n == 17:
            compiled = compiled_variants(_policy_loss_kernel)
    assert compiled >= 1 and compiled_variants(_policy_loss_kernel) == compiled


# Compiled for sm_90 without a GPU (the kernel's own warmup under dler_kernels.aot_check's stand-in driver fills
# the same JITFunction cache a launch does), in a subprocess: this suite's TRITON_INTERPRET=1 would interpret.


def compiled_variant_counts(script: str, cache_dir) -> str:
    """The last line ``script`` prints (its list of compiled-variant counts), run without TRITON_INTERPRET and with
    a fresh Triton cache in ``cache_dir``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("\n")[-2]


RECOMPILATION_SCRIPT = """
import torch
from dler_kernels import aot_check
from dler_kernels._launch import compiled_variants
from dler_kernels.triton_policy_loss import row_launch

def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")

counts = []
for n, dtype in ((17, torch.bfloat16), (1000, torch.bfloat16), (4099, torch.bfloat16), (17, torch.float16)):
    f32 = meta(n, torch.float32)
    launch, _ = row_launch(meta((n, 4097), dtype), meta(n, torch.int64), meta(n, torch.bool), old=f32, adv=f32,
                           weights=f32, grad=meta((n, 4097), dtype), compute_loss=True, clip_c=10.0,
                           device=torch.device("cuda"))
    with aot_check.compiling_for(90):
        aot_check.warm_up(launch)
    counts.append(compiled_variants(launch.kernel))
print(counts)
"""


@pytest.mark.skipif(not dler_kernels.HAS_TRITON, reason="triton is not installed")
def test_no_recompilation_for_a_new_number_of_tokens_compiled_for_sm90_without_a_gpu(tmp_path):
    # One variant for every number of tokens; a new dtype is a second (the counter counts compiled kernels).
    assert compiled_variant_counts(RECOMPILATION_SCRIPT, tmp_path) == "[1, 1, 1, 2]"


FLOAT_OPTIONS_SCRIPT = """
import torch
from dler_kernels import aot_check
from dler_kernels._launch import compiled_variants
from dler_kernels.triton_policy_loss import row_launch

def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")

counts = []
for objective_code in (0, 2, 3):  # PPO-clip, SAPO (tau_pos, tau_neg), DPPO-TV (ratio_cap)
    for eps_low, eps_high, clip_c, beta, entropy_coef, temperature, ratio_cap, tau_pos, tau_neg in (
        (0.2, 0.28, 10.0, 0.1, 0.0, 1.0, 20.0, 1.0, 1.05), (3e-4, 4e-4, 3.0, 0.04, 0.01, 0.6, 5.0, 0.5, 2.0),
        (0.1, 5.0, 1.5, 1e-3, -0.02, 1.3, 1.5, 3.0, 0.25),
    ):
        f32 = meta(64, torch.float32)
        launch, _ = row_launch(meta((64, 4097), torch.bfloat16), meta(64, torch.int64), meta(64, torch.bool),
                               old=f32, adv=f32, ref_lp=f32, weights=f32, grad=meta((64, 4097), torch.bfloat16),
                               compute_loss=True, objective_code=objective_code, eps_low=eps_low, eps_high=eps_high,
                               clip_c=clip_c if objective_code == 0 else None, ratio_cap=ratio_cap, tau_pos=tau_pos,
                               tau_neg=tau_neg, beta=beta, kl_type="k3", entropy_coef=entropy_coef,
                               temperature=temperature, device=torch.device("cuda"))
        with aot_check.compiling_for(90):
            aot_check.warm_up(launch)
        counts.append(compiled_variants(launch.kernel))
print(counts)
"""


@pytest.mark.skipif(not dler_kernels.HAS_TRITON, reason="triton is not installed")
def test_no_recompilation_for_new_float_options_compiled_for_sm90_without_a_gpu(tmp_path):
    """eps_low, eps_high, clip_c, beta, entropy_coef, temperature and the objectives' ratio_cap, tau_pos, tau_neg
    are runtime arguments of the fused kernel, not constexprs (Liger's GRPO kernel recompiles for each new value):
    one compiled variant per objective (its OBJECTIVE constexpr) for three sets of them. The sequence-level
    objectives' parameters never reach a kernel (they run on [N] vectors in torch)."""
    assert compiled_variant_counts(FLOAT_OPTIONS_SCRIPT, tmp_path) == "[1, 1, 1, 2, 2, 2, 3, 3, 3]"


def test_compiled_variants_reads_the_cache_layouts_of_triton_3_and_older():
    from dler_kernels._launch import compiled_variants

    class Triton3:  # JITFunction.device_caches[device] = (kernel_cache, kernel_key_cache, target, backend, binder)
        device_caches = {0: ({"a": 1, "b": 2}, {}, "target", "backend", "binder"), 1: ({"c": 3}, {}, "t", "b", "b")}

    class Older:  # JITFunction.cache[device] = {key: compiled kernel}
        cache = {0: {"a": 1}, 1: {"b": 2, "c": 3}}

    assert compiled_variants(Triton3()) == 3 and compiled_variants(Older()) == 3
    with pytest.raises(TypeError, match="no cache of compiled variants"):
        compiled_variants(object())


def test_tensor_on_another_device_is_named():
    args = _good()
    args["advantages"] = args["advantages"].to("meta")
    with pytest.raises(ValueError, match="advantages must be on cpu like logits"):
        policy_loss(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_allocates_nothing_of_size_n_by_v_but_the_gradient(inplace):
    n, v = 4096, 32000
    tensors, extra = logits_inputs(n, v, torch.bfloat16, seed=0)
    tensors = {k: t.cuda() for k, t in tensors.items()}
    extra = {k: t.cuda() for k, t in extra.items()}
    logits_bytes = tensors["logits"].numel() * tensors["logits"].element_size()
    if not inplace:
        tensors["logits"].requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = policy_loss(**tensors, **extra, inplace_grad=inplace)
    if not inplace:
        out.loss.backward()
    torch.cuda.synchronize()
    extra_bytes = torch.cuda.max_memory_allocated() - base
    allowed = (0 if inplace else logits_bytes) + 0.01 * logits_bytes  # [N] vectors are ~1e-4 of N x V
    assert extra_bytes <= allowed, (extra_bytes, logits_bytes)
