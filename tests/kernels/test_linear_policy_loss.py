"""The fused-linear path (Triton kernels through the interpreter, and the plain-torch backend) against
float64 autograd of the reference on the same logits, and against the logits path.

The spec is ``policy_loss(F.linear(hidden, weight, bias), ...)`` with the logits in the inputs'
dtype. The oracle therefore takes those logits (rounded to the input dtype, as any LM head makes
them), continues in float64, and differentiates through the linear map in float64:
dX64 = dZ64 W, dW64 = dZ64^T X, db64 = colsum(dZ64).

Tolerances:
* float32: loss rel <= 1e-5 of sum |per-token loss|, log-prob abs <= 1e-5 (as the logits path);
  gradients rel (Frobenius) <= 1e-4: float32 arithmetic everywhere, sums over up to V terms.
* bf16/fp16: the fused path, like autograd through the logits path, rounds dZ once to the input
  dtype before the matmuls (relative rho: 2^-8 bf16, 2^-11 fp16; 2^-7 for bf16 stores in Triton's
  interpreter, which truncates) and each gradient once more to its output dtype (r = 2^-8 / 2^-11).
  Per element: |dX - dX64| <= rho (|dZ64| |W|) + r |dX64| + 1e-4 max|dX64|, likewise for dW
  (|dZ64|^T |X|) and db (sum |dZ64|): the rounding of every term, bounded by the absolute sum.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle_checks import (
    OPTION_SETS,
    STORE_ROUNDING,
    assert_bad_input_named,
    check_loss_terms,
    linear_inputs,
    masked_vocab_linear_inputs,
    rel,
    store_rounding,
    zero_probability_refused,
)

from dler_kernels import linear_policy_loss, linear_token_logprobs, policy_loss, reference
from dler_kernels.dispatch import backend_named
from dler_kernels.linear_policy_loss import LINEAR_LOGITS
from dler_kernels.reference import KL_TYPES, LOSS_AGGS


def oracle(tensors, extra, **opts):
    """float64 from the input-dtype logits on: (loss, per_token, logp, entropy, metrics, dZ64, dX64, dW64, db64)."""
    x, w, b = tensors["hidden"], tensors["weight"], extra["bias"]
    logits64 = F.linear(x, w, b).double().requires_grad_(True)
    loss, per_token, logp, ent, metrics = reference.policy_loss_ref(
        logits64, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(),
        tensors["mask"], ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss.backward()
    dz = logits64.grad
    return loss.detach(), per_token, logp, ent, metrics, dz, dz @ w.double(), dz.t() @ x.double(), dz.sum(0)


def run(tensors, extra, **opts):
    leaves = {k: tensors[k].clone().requires_grad_(True) for k in ("hidden", "weight")}
    bias = extra["bias"].clone().requires_grad_(True) if extra["bias"] is not None else None
    out = linear_policy_loss(**{**tensors, **leaves}, **{**extra, "bias": bias}, **opts)
    out.loss.backward()
    return out, leaves["hidden"].grad, leaves["weight"].grad, (bias.grad if bias is not None else None)


def check_grad(name, got, want, abs_terms, dtype, backend_used):
    assert got.dtype == dtype, f"{name} dtype {got.dtype}"
    if dtype in (torch.float32, torch.float64):
        assert rel(got, want) <= 1e-4, (name, rel(got, want))
        return
    rho = store_rounding(dtype, backend_used, got.is_cuda)  # dZ rounded to the input dtype
    bound = rho * abs_terms + STORE_ROUNDING[dtype] * want.abs() + 1e-4 * want.abs().max()
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), (name, (err - bound).max().item(), rel(got, want))


def check_against_oracle(out, grads, tensors, extra, opts, backend_used):
    loss64, pt64, lp64, ent64, m64, dz, dx64, dw64, db64 = oracle(tensors, extra, **opts)
    check_loss_terms(out, loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    x, w = tensors["hidden"].double(), tensors["weight"].double()
    dtype = tensors["hidden"].dtype
    dx, dw, db = grads
    check_grad("dhidden", dx, dx64, dz.abs() @ w.abs(), dtype, backend_used)
    check_grad("dweight", dw, dw64, dz.abs().t() @ x.abs(), dtype, backend_used)
    if extra["bias"] is not None:
        check_grad("dbias", db, db64, dz.abs().sum(0), dtype, backend_used)


# (N, H, V, chunk_size): odd sizes, one chunk, many chunks, a chunk of one row, vocab slices narrower than a row.
SHAPES = [(1, 8, 1, None), (7, 16, 33, 3), (17, 24, 1000, 5), (5, 32, 4097, 2), (12, 8, 50, 1), (9, 40, 257, 4)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-chunk{s[3]}")
def test_matches_float64(backend, shape, dtype):
    n, h, v, chunk = shape
    i = SHAPES.index(shape) + DTYPES.index(dtype)
    opts = OPTION_SETS[i % 4]
    tensors, extra = linear_inputs(n, h, v, dtype, seed=n * 1000 + v, with_bias=i % 2 == 0)
    out, *grads = run(tensors, extra, chunk_size=chunk, **opts)
    check_against_oracle(out, grads, tensors, extra, opts, backend)


@pytest.mark.parametrize("clip_c", [10.0, None])
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_every_option_combination(backend, loss_agg, kl_type, clip_c):
    tensors, extra = linear_inputs(10, 12, 37, seed=7)
    opts = dict(loss_agg=loss_agg, kl_type=kl_type, clip_c=clip_c, entropy_coef=0.01, beta=0.1, temperature=0.8,
                norm_length=40.0)  # fmt: skip
    out, *grads = run(tensors, extra, chunk_size=4, **opts)
    check_against_oracle(out, grads, tensors, extra, opts, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equals_the_logits_path_on_the_same_inputs(backend, dtype):
    """Same backend, same inputs: the fused path and policy_loss(F.linear(...)) + autograd agree."""
    tensors, extra = linear_inputs(13, 20, 301, dtype, seed=21)
    opts = dict(beta=0.1, entropy_coef=0.01, temperature=0.7, loss_agg="seq-mean-token-mean")
    out, dx, dw, db = run(tensors, extra, chunk_size=4, **opts)
    leaves = [t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    logits = F.linear(*leaves)
    rest = {k: v for k, v in tensors.items() if k not in ("hidden", "weight")}
    plain = policy_loss(logits, **rest, ref_logprobs=extra["ref_logprobs"], seq_ids=extra["seq_ids"], **opts)
    plain.loss.backward()
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6, abs=1e-7)
    # float32 log-softmax by another summation order: a few ulps of values up to ~20
    torch.testing.assert_close(out.logprobs, plain.logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy, plain.entropy, rtol=1e-6, atol=1e-6)
    for key in plain.metrics:
        torch.testing.assert_close(out.metrics[key].float(), plain.metrics[key].float(), rtol=1e-6, atol=1e-7)
    # The same dZ (bit for bit up to float32 summation order) meets the same matmuls; one output rounding apart.
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-4)
    for ours, theirs in ((dx, leaves[0].grad), (dw, leaves[1].grad), (db, leaves[2].grad)):
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)


def test_chunk_size_does_not_change_the_result(backend):
    tensors, extra = linear_inputs(11, 16, 45, seed=3)
    results = [run(tensors, extra, chunk_size=c, entropy_coef=0.01) for c in (1, 4, 11, 1000)]
    base_out, *base_grads = results[0]
    for out, *grads in results[1:]:
        assert out.loss.item() == pytest.approx(base_out.loss.item(), rel=1e-6)
        torch.testing.assert_close(out.logprobs, base_out.logprobs)
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_all_rows_masked(backend, loss_agg):
    tensors, extra = linear_inputs(6, 8, 50, seed=1)
    tensors["mask"] = torch.zeros(6, dtype=torch.bool)
    out, dx, dw, db = run(tensors, extra, loss_agg=loss_agg, beta=0.1, entropy_coef=0.01, norm_length=10.0,
                          chunk_size=4)  # fmt: skip
    assert out.loss.item() == 0.0 and out.metrics["num_tokens"].item() == 0
    for g in (dx, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_rows_take_any_target_and_get_zero_gradient(backend, dtype):
    tensors, extra = linear_inputs(9, 16, 64, dtype, seed=2)
    mask = tensors["mask"]
    poisoned = {**tensors, "targets": tensors["targets"].masked_fill(~mask, -100)}
    opts = dict(loss_agg="seq-mean-token-mean", entropy_coef=0.01, chunk_size=2)
    out, dx, dw, db = run(poisoned, extra, **opts)
    clean, cdx, cdw, cdb = run(tensors, extra, **opts)
    assert out.loss.item() == clean.loss.item()
    assert torch.equal(dx[~mask], torch.zeros_like(dx[~mask]))
    assert torch.equal(dx, cdx) and torch.equal(dw, cdw) and torch.equal(db, cdb)
    assert torch.equal(out.logprobs[~mask], torch.zeros(int((~mask).sum())))


def test_backward_scales_the_stored_gradients(backend):
    tensors, extra = linear_inputs(5, 8, 20, seed=5)
    out, dx, dw, db = run(tensors, extra)
    x, w, b = (t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"]))
    (3.0 * linear_policy_loss(**{**tensors, "hidden": x, "weight": w}, **{**extra, "bias": b}).loss).backward()
    for scaled, plain in ((x.grad, dx), (w.grad, dw), (b.grad, db)):
        torch.testing.assert_close(scaled, 3.0 * plain)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_weights_scale_each_token_loss(backend, loss_agg):
    """As in the logits path: each token's loss times its weight before the aggregation."""
    tensors, extra = linear_inputs(13, 8, 70, seed=21)
    weights = torch.rand(13, generator=torch.Generator().manual_seed(4)) * 2.0
    opts = dict(loss_agg=loss_agg, kl_type="k3_ratio", beta=0.1, entropy_coef=0.01, norm_length=30.0,
                token_weights=weights)  # fmt: skip
    out, *grads = run(tensors, extra, chunk_size=4, **opts)
    check_against_oracle(out, grads, tensors, extra, opts, backend)


def test_global_normalizer_makes_accumulation_equal_one_batch(backend):
    tensors, extra = linear_inputs(12, 8, 40, seed=6)
    full, fdx, fdw, fdb = run(tensors, extra)
    total = int(tensors["mask"].sum())
    w = tensors["weight"].clone().requires_grad_(True)
    losses, dxs = [], []
    for rows in (slice(0, 5), slice(5, 12)):
        part = {k: (t[rows] if k != "weight" else w) for k, t in tensors.items()}
        x = part["hidden"].clone().requires_grad_(True)
        out = linear_policy_loss(**{**part, "hidden": x}, bias=extra["bias"], normalizer=total)
        out.loss.backward()
        losses.append(out.loss)
        dxs.append(x.grad)
    assert sum(losses).item() == pytest.approx(full.loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(dxs), fdx)
    torch.testing.assert_close(w.grad, fdw, rtol=1e-5, atol=1e-7)


def test_only_the_needed_gradients_are_computed(backend, monkeypatch):
    import sys

    module = sys.modules["dler_kernels.linear_policy_loss"]
    calls = []
    real = module.fused_linear
    monkeypatch.setattr(module, "fused_linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    tensors, extra = linear_inputs(6, 8, 30, torch.bfloat16, seed=4)
    frozen_head = {**tensors, "hidden": tensors["hidden"].clone().requires_grad_(True)}
    out = linear_policy_loss(**frozen_head, bias=extra["bias"])  # weight and bias do not require grad
    out.loss.backward()
    assert frozen_head["hidden"].grad is not None
    with torch.no_grad():
        linear_policy_loss(**{**tensors, "weight": tensors["weight"].clone().requires_grad_(True)})
    assert [(c["need_dx"], c["need_dw"], c["need_db"]) for c in calls] == [(True, False, False), (False, False, False)]


def test_tied_embedding_gets_both_gradients(backend):
    """lm_head.weight is the input embedding: autograd adds the loss's dW to the embedding's gradient."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 12)
    ids = torch.randint(0, 30, (9,))
    tensors, extra = linear_inputs(9, 12, 30, seed=8, with_bias=False)
    rest = {k: v for k, v in tensors.items() if k not in ("hidden", "weight")}

    def grad_of(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))
        fn(hidden, emb.weight).backward()
        return emb.weight.grad.clone()

    fused = grad_of(lambda h, w: linear_policy_loss(h, w, **rest, chunk_size=4).loss)
    plain = grad_of(lambda h, w: policy_loss(F.linear(h, w), **rest).loss)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)


def test_reference_backend_passes_gradcheck(monkeypatch):
    monkeypatch.setenv("DLER_BACKEND", "reference")
    tensors, extra = linear_inputs(5, 4, 6, torch.float64, seed=11)
    rest = {k: v for k, v in tensors.items() if k not in ("hidden", "weight")}

    def f(x, w, b):
        return linear_policy_loss(x, w, **rest, bias=b, ref_logprobs=extra["ref_logprobs"].double(),
                                  seq_ids=extra["seq_ids"], beta=0.1, entropy_coef=0.02, temperature=0.7,
                                  loss_agg="seq-mean-token-mean", chunk_size=2).loss  # fmt: skip

    inputs = tuple(t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"]))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- -inf in the bias (a masked vocabulary)
# The logits path's rule (reference module docstring): a -inf logit has probability 0, adds nothing to the
# entropy and gets gradient exactly 0, so its bias entry and its row of weight get 0; a valid row whose target
# it masks is a ValueError. Before: NaN loss and gradients on cpu and triton. Tolerances as above.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 16, 33, 3), (17, 24, 1000, 5), (5, 32, 4097, 2)],
                         ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-chunk{s[3]}")  # fmt: skip
def test_minus_inf_bias_matches_float64_and_gets_zero_gradient(backend, shape, dtype):
    """bf16 weights go through the vocab pass (the slab kernel meets the -inf columns again)."""
    n, h, v, chunk = shape
    opts = dict(OPTION_SETS[n % 4], entropy_coef=0.01)
    tensors, extra, cut = masked_vocab_linear_inputs(n, h, v, dtype, seed=n + v)
    out, dx, dw, db = run(tensors, extra, chunk_size=chunk, **opts)
    check_against_oracle(out, (dx, dw, db), tensors, extra, opts, backend)
    assert torch.isfinite(out.entropy).all() and all(torch.isfinite(g).all() for g in (dx, dw, db))
    assert torch.equal(db[cut], torch.zeros_like(db[cut])) and torch.equal(dw[cut], torch.zeros_like(dw[cut]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_logprobs_with_minus_inf_bias_match_float64(backend, dtype):
    tensors, extra, cut = masked_vocab_linear_inputs(9, 8, 300, dtype, seed=8)
    targets = torch.where(tensors["mask"], tensors["targets"], -100)
    leaves = [t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=0.8,
                                    return_entropy=True, chunk_size=4)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(9, generator=g), torch.randn(9, generator=g)
    ((a * lp).sum() + (b * ent).sum()).backward()
    logits64 = F.linear(tensors["hidden"], tensors["weight"], extra["bias"]).double().requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_ref(logits64, targets, temperature=0.8, return_entropy=True)
    ((a.double() * lp64).sum() + (b.double() * ent64).sum()).backward()
    assert (lp.detach().double() - lp64.detach()).abs().max() <= 1e-5
    assert (ent.detach().double() - ent64.detach()).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())
    dz = logits64.grad
    x, w = tensors["hidden"].double(), tensors["weight"].double()
    check_grad("dhidden", leaves[0].grad, dz @ w, dz.abs() @ w.abs(), dtype, backend)
    check_grad("dweight", leaves[1].grad, dz.t() @ x, dz.abs().t() @ x.abs(), dtype, backend)
    check_grad("dbias", leaves[2].grad, dz.sum(0), dz.abs().sum(0), dtype, backend)
    assert torch.equal(leaves[2].grad[cut], torch.zeros_like(leaves[2].grad[cut]))
    with torch.no_grad():
        lp_plain, ent_plain = linear_token_logprobs(*(t.detach() for t in leaves[:2]), targets, bias=extra["bias"],
                                                    temperature=0.8, return_entropy=True, chunk_size=4)  # fmt: skip
    assert torch.equal(lp_plain, lp.detach()) and torch.equal(ent_plain, ent.detach())


def test_a_valid_row_whose_target_the_bias_masks_is_refused(backend):
    tensors, extra = linear_inputs(8, 8, 40, seed=9)
    rows = [int(i) for i in tensors["mask"].nonzero()[:, 0]]
    first = rows[1]
    targets = tensors["targets"].clone()
    targets[rows[-1]] = targets[first]  # a later row with the same masked target: the first one is named
    bias = extra["bias"].clone()
    bias[targets[first]] = float("-inf")
    tensors = {**tensors, "targets": targets}
    extra = {**extra, "bias": bias}
    with zero_probability_refused(first, LINEAR_LOGITS):
        run(tensors, extra, chunk_size=3)
    with torch.no_grad(), zero_probability_refused(first, LINEAR_LOGITS):
        linear_policy_loss(**tensors, **extra)
    padded = torch.where(tensors["mask"], targets, -100)
    args = (tensors["hidden"], tensors["weight"], padded)
    with zero_probability_refused(first, LINEAR_LOGITS):
        linear_token_logprobs(*args, bias=bias, chunk_size=3)
    with zero_probability_refused(first, LINEAR_LOGITS):
        linear_token_logprobs(*args, bias=bias.clone().requires_grad_(True), return_entropy=True)
    # A +inf or NaN bias is not this error (the reference's torch logsumexp gives +inf there, not NaN): a
    # non-finite loss, which the num_nonfinite metric counts.
    for value in (float("inf"), float("nan")):
        poisoned = bias.clone()
        poisoned[targets[first]] = 0.0
        poisoned[(targets[first] + 1) % len(bias)] = value
        out = linear_policy_loss(**tensors, **{**extra, "bias": poisoned})
        assert not torch.isfinite(out.loss) and out.metrics["num_nonfinite"].item() >= 1


# ---------------------------------------------------------------- linear_token_logprobs


@pytest.mark.parametrize("shape", [(1, 4, 1), (5, 8, 7), (13, 16, 4097), (3, 24, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_logprobs_matches_float64(backend, shape, dtype):
    n, h, v = shape
    tensors, extra = linear_inputs(n, h, v, dtype, seed=v)
    targets = tensors["targets"].clone()
    targets[0] = -100  # a padding row
    args = (tensors["hidden"], tensors["weight"], targets)
    lp, ent = linear_token_logprobs(*args, bias=extra["bias"], temperature=0.8, return_entropy=True, chunk_size=2)
    logits64 = F.linear(tensors["hidden"], tensors["weight"], extra["bias"]).double()
    lp64, ent64 = reference.token_logprobs_ref(logits64, targets, temperature=0.8, return_entropy=True)
    assert lp.dtype == torch.float32 and (lp.double() - lp64).abs().max() <= 1e-5
    assert (ent.double() - ent64).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())
    assert lp[0].item() == 0.0 and ent[0].item() == 0.0
    assert torch.equal(linear_token_logprobs(*args, bias=extra["bias"], temperature=0.8, chunk_size=2), lp)


@pytest.mark.parametrize("shape,chunk", [((1, 4, 1), 1), ((9, 8, 7), 4), ((13, 16, 4097), 2), ((6, 24, 1000), 64)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_entropy", [True, False], ids=["logp+entropy", "logp"])
def test_linear_token_logprobs_gradient_matches_float64(backend, shape, chunk, dtype, with_entropy):
    """The differentiable path (verl's fused log-prob + entropy op): any incoming gradient of the
    log-probs and entropies, against float64 autograd through F.linear and log_softmax."""
    n, h, v = shape
    tensors, extra = linear_inputs(n, h, v, dtype, seed=v + n)
    targets = tensors["targets"].clone()
    targets[0] = -100  # a padding row: zero outputs, zero gradient
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    out = linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=0.8,
                                return_entropy=True, chunk_size=chunk)  # fmt: skip
    ((a * out[0]).sum() + ((b * out[1]).sum() if with_entropy else 0.0)).backward()

    # float64 from the input-dtype logits on (the kernels' logits are rounded to that dtype too).
    logits64 = F.linear(tensors["hidden"], tensors["weight"], extra["bias"]).double().requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_ref(logits64, targets, temperature=0.8, return_entropy=True)
    ((a.double() * lp64).sum() + ((b.double() * ent64).sum() if with_entropy else 0.0)).backward()
    assert (out[0].detach().double() - lp64.detach()).abs().max() <= 1e-5
    dz = logits64.grad
    x, w = tensors["hidden"].double(), tensors["weight"].double()
    check_grad("dhidden", leaves[0].grad, dz @ w, dz.abs() @ w.abs(), dtype, backend)
    check_grad("dweight", leaves[1].grad, dz.t() @ x, dz.abs().t() @ x.abs(), dtype, backend)
    check_grad("dbias", leaves[2].grad, dz.sum(0), dz.abs().sum(0), dtype, backend)
    assert leaves[0].grad[0].abs().max() == 0.0


# ---------------------------------------------------------------- fp32 LM head
#
# With fp32_head the logits of bf16/fp16 inputs are computed in float32 from the inputs' own values
# (bf16 -> float32 is exact), so the oracle is float64 from those values on: F.linear of the upcast
# inputs in float64, no rounding of the logits anywhere. The forward outputs then meet the float32
# inputs' bounds (check_loss_terms: loss rel <= 1e-5 of sum |per-token loss|, log-prob abs <= 1e-5).
# Gradients: float32 arithmetic (relative ~1e-7 per term of |dZ| |W|, bounded here by 1e-5 of the
# absolute sum), then one rounding to the parameter's dtype (u = STORE_ROUNDING, round to nearest;
# below fp16's smallest normal the spacing is fixed, u * smallest_normal absolute):
# |g - g64| <= u (|g64| + smallest_normal) + 1e-5 * abs_terms. Without fp32_head the logits are rounded to bf16 first
# (relative 2^-8 of values up to ~10: ~0.04 absolute), far outside these bounds.


def upcast_to_float64(tensors, extra):
    """The same inputs as float64 values (exact), for the oracle of an fp32 head."""
    wide = {**tensors, "hidden": tensors["hidden"].double(), "weight": tensors["weight"].double()}
    return wide, {**extra, "bias": extra["bias"].double() if extra["bias"] is not None else None}


def check_fp32_head_grad(name, got, want, abs_terms, dtype):
    assert got.dtype == dtype, f"{name} dtype {got.dtype}"
    bound = STORE_ROUNDING[dtype] * (want.abs() + torch.finfo(dtype).smallest_normal) + 1e-5 * abs_terms
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), (name, (err - bound).max().item(), rel(got, want))


FP32_HEAD_SHAPES = [(7, 16, 33, 3), (17, 24, 1000, 5), (5, 32, 4097, 2), (9, 40, 257, None)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", FP32_HEAD_SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-chunk{s[3]}")
def test_fp32_head_matches_float64_of_the_input_values_to_float32_rounding(backend, shape, dtype):
    n, h, v, chunk = shape
    i = FP32_HEAD_SHAPES.index(shape)
    opts = OPTION_SETS[i % 4]
    tensors, extra = linear_inputs(n, h, v, dtype, seed=n * 100 + v, with_bias=i % 2 == 0)
    out, dx, dw, db = run(tensors, extra, chunk_size=chunk, fp32_head=True, **opts)
    wide, wide_extra = upcast_to_float64(tensors, extra)
    loss64, pt64, lp64, ent64, m64, dz, dx64, dw64, db64 = oracle(wide, wide_extra, **opts)
    check_loss_terms(out, loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    x, w = wide["hidden"], wide["weight"]
    check_fp32_head_grad("dhidden", dx, dx64, dz.abs() @ w.abs(), dtype)
    check_fp32_head_grad("dweight", dw, dw64, dz.abs().t() @ x.abs(), dtype)
    if extra["bias"] is not None:
        check_fp32_head_grad("dbias", db, db64, dz.abs().sum(0), dtype)


def test_fp32_head_error_is_float32_rounding_where_the_bf16_head_is_not(backend):
    """The same bf16 inputs against float64 of their values, with and without fp32_head: the fp32 head
    within the float32 bounds, the bf16 head far outside them (the errors of logits rounded to bf16)."""
    tensors, extra = linear_inputs(64, 64, 2000, torch.bfloat16, seed=11)
    opts = dict(entropy_coef=0.01, temperature=0.8)
    loss64, pt64, lp64, *_ = oracle(*upcast_to_float64(tensors, extra), **opts)
    errors = {}
    for fp32_head in (True, False):
        out = run(tensors, extra, chunk_size=16, fp32_head=fp32_head, **opts)[0]
        valid = tensors["mask"]
        errors[fp32_head] = (
            abs(out.loss.item() - loss64.item()) / pt64[valid].abs().mean().item(),
            (out.logprobs.double() - lp64)[valid].abs().max().item(),
        )
    assert errors[True][0] <= 1e-5 and errors[True][1] <= 1e-5, errors
    # Measured (cpu and reference backends): fp32 head 5.1e-8 (loss) and 1.0e-6 (log-prob); bf16 head 1.2e-3, 1.6e-2.
    assert errors[False][0] >= 1e-4 and errors[False][1] >= 1e-2, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_head_linear_token_logprobs_and_gradient_match_float64(backend, dtype):
    n, h, v = 13, 16, 4097
    tensors, extra = linear_inputs(n, h, v, dtype, seed=9)
    targets = tensors["targets"].clone()
    targets[0] = -100  # a padding row
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=0.8,
                                    return_entropy=True, chunk_size=2, fp32_head=True)  # fmt: skip
    ((a * lp).sum() + (b * ent).sum()).backward()
    no_grad = linear_token_logprobs(tensors["hidden"], tensors["weight"], targets, bias=extra["bias"],
                                    temperature=0.8, chunk_size=2, fp32_head=True)  # fmt: skip

    wide = [t.double().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    logits64 = F.linear(*wide).detach().requires_grad_(True)
    lp64, ent64 = reference.token_logprobs_ref(logits64, targets, temperature=0.8, return_entropy=True)
    ((a.double() * lp64).sum() + (b.double() * ent64).sum()).backward()
    assert (lp.detach().double() - lp64.detach()).abs().max() <= 1e-5
    assert (ent.detach().double() - ent64.detach()).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())
    assert (no_grad.double() - lp64.detach()).abs().max() <= 1e-5
    dz = logits64.grad
    x, w = wide[0].detach(), wide[1].detach()
    check_fp32_head_grad("dhidden", leaves[0].grad, dz @ w, dz.abs() @ w.abs(), dtype)
    check_fp32_head_grad("dweight", leaves[1].grad, dz.t() @ x, dz.abs().t() @ x.abs(), dtype)
    check_fp32_head_grad("dbias", leaves[2].grad, dz.sum(0), dz.abs().sum(0), dtype)


def test_fp32_head_equals_the_reference_spec(backend):
    """reference.linear_policy_loss_ref(..., fp32_head=True) is the spec: float32 logits of the upcast
    inputs; same float32 arithmetic, another summation order (a few ulps)."""
    tensors, extra = linear_inputs(10, 24, 300, torch.bfloat16, seed=2)
    out = run(tensors, extra, chunk_size=3, fp32_head=True)[0]
    spec = reference.linear_policy_loss_ref(**tensors, **extra, fp32_head=True)
    assert out.loss.item() == pytest.approx(spec[0].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out.logprobs, spec[2], rtol=1e-6, atol=2e-6)
    assert reference.linear_logits_ref(tensors["hidden"], tensors["weight"], fp32_head=True).dtype == torch.float32


def test_fp32_head_changes_nothing_for_float32_inputs(backend):
    tensors, extra = linear_inputs(9, 16, 100, torch.float32, seed=6)
    (off, *off_grads), (on, *on_grads) = (run(tensors, extra, chunk_size=4, fp32_head=f) for f in (False, True))
    assert torch.equal(on.loss, off.loss) and torch.equal(on.logprobs, off.logprobs)
    assert torch.equal(on.entropy, off.entropy) and torch.equal(on.per_token_loss, off.per_token_loss)
    for a, b in zip(on_grads, off_grads):
        assert torch.equal(a, b)


def test_fp32_head_default_chunk_is_tall_enough_to_amortise_the_upcast():
    import sys

    module = sys.modules["dler_kernels.linear_policy_loss"]
    cpu = backend_named("reference")
    assert module.rows_per_chunk(4096, 32000, None, cpu) == 32  # 2**20 // 32000, in multiples of 16
    assert module.rows_per_chunk(4096, 32000, None, cpu, upcast=True) == module.UPCAST_MIN_ROWS == 256
    assert module.rows_per_chunk(100, 32000, None, cpu, upcast=True) == 100  # never more rows than there are
    assert module.rows_per_chunk(4096, 32000, 8, cpu, upcast=True) == 8  # an explicit chunk_size stands


def test_fp32_head_never_holds_a_float32_copy_of_the_weight(backend):
    """Upcast tile by tile: no op's allocation reaches 4 V H bytes (a float32 copy of the weight, as
    ``weight.float()`` makes). The largest (measured 2.34 MB) is the autograd function's own outputs:
    the bf16 weight gradient (2 V H = 2.05 MB) and dX."""
    from torch.profiler import ProfilerActivity, profile

    n, h, v = 64, 256, 4000  # the float32 row buffer (16 rows) and the hidden copy are far below 2 V H
    tensors, extra = linear_inputs(n, h, v, torch.bfloat16, seed=8, with_bias=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, dx, dw, _ = run(tensors, extra, chunk_size=16, fp32_head=True)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 2 * v * h <= largest < 4 * v * h, largest
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tensors["weight"].float()
    assert max(e.cpu_memory_usage for e in prof.events()) == 4 * v * h  # what the check would see


# ---------------------------------------------------------------- bad input


def _good():
    tensors, extra = linear_inputs(4, 6, 10, seed=0)
    return {**tensors, **extra}


BAD_INPUTS = [
    ("hidden", lambda a: a.update(hidden=a["hidden"][0]), "hidden must be 2-D"),
    ("hidden", lambda a: a.update(hidden=a["hidden"].long()), "hidden must be float"),
    ("weight", lambda a: a.update(weight=a["weight"][:, :5]), "weight must be [V, H] with H = 6"),
    ("weight", lambda a: a.update(weight=a["weight"].double()), "weight must have the dtype of hidden"),
    ("weight", lambda a: a.update(weight=a["weight"].to("meta")), "weight must be on cpu like hidden"),
    ("weight", lambda a: a.update(weight=a["weight"][:0]), "at least one row"),
    ("bias", lambda a: a.update(bias=a["bias"][:9]), "bias must have 10 entries"),
    ("bias", lambda a: a.update(bias=a["bias"].half()), "bias must be torch.float32"),
    ("token_weights", lambda a: a.update(token_weights=torch.ones(5)), "token_weights must have 4 entries"),
    ("targets", lambda a: a.update(targets=a["targets"][:3]), "targets must have 4 entries"),
    ("targets", lambda a: a.update(targets=torch.tensor([0, 1, 2, 10]), mask=torch.ones(4, dtype=torch.bool)),
     "(the vocab size of weight)"),
    ("advantages", lambda a: a.update(advantages=a["advantages"].to("meta")), "advantages must be on cpu like hidden"),
    ("loss_agg", lambda a: a.update(loss_agg="mean"), "loss_agg must be one of"),
    ("beta", lambda a: a.update(beta=0.1, ref_logprobs=None), "ref_logprobs is required"),
    ("chunk_size", lambda a: a.update(chunk_size=0), "chunk_size must be a positive int"),
    ("fp32_head", lambda a: a.update(fp32_head=1), "fp32_head must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, mutate, message):
    assert_bad_input_named(linear_policy_loss, _good(), mutate, name, message)


def test_linear_token_logprobs_bad_input():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        linear_token_logprobs(x, w, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="weight must be \\[V, H\\] with H = 4"):
        linear_token_logprobs(x, torch.randn(5, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(x, w, torch.tensor([0, 4, 1]), temperature=0.0)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_memory_stays_within_one_chunk(dtype):
    """Peak extra memory <= the chunk buffer + O(N) vectors + 1% of N x V: no [N, V] tensor."""
    n, h, v, chunk = 4096, 1024, 32000, 128
    tensors, extra = linear_inputs(n, h, v, dtype, seed=0)
    tensors = {k: t.cuda() for k, t in tensors.items()}
    bias = extra["bias"].cuda().requires_grad_(True)
    x, w = tensors.pop("hidden").requires_grad_(True), tensors.pop("weight").requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = linear_policy_loss(x, w, **tensors, bias=bias, chunk_size=chunk)
    out.loss.backward()
    torch.cuda.synchronize()
    esz = x.element_size()
    grads = (x.numel() + w.numel() + v) * esz + v * 4  # the gradients themselves (+ the float32 bias sum)
    extra_bytes = torch.cuda.max_memory_allocated() - base - grads
    logits_bytes = n * v * esz
    assert extra_bytes <= chunk * v * esz + 0.01 * logits_bytes, (extra_bytes, logits_bytes)


@pytest.mark.gpu
def test_cuda_matches_the_logits_path():
    tensors, extra = linear_inputs(1000, 512, 32003, torch.bfloat16, seed=1)
    tensors = {k: t.cuda() for k, t in tensors.items()}
    extra = {k: (t.cuda() if t is not None else None) for k, t in extra.items()}
    opts = dict(beta=0.05, entropy_coef=0.01, temperature=0.9)
    out, dx, dw, db = run(tensors, extra, chunk_size=96, **opts)
    leaves = [t.clone().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"])]
    rest = {k: v for k, v in tensors.items() if k not in ("hidden", "weight")}
    plain = policy_loss(F.linear(*leaves), **rest, ref_logprobs=extra["ref_logprobs"], **opts)
    plain.loss.backward()
    # cuBLAS may round a chunk's logits differently from the full matmul's (another kernel): one bf16 ulp.
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-2)
    for ours, theirs in ((dx, leaves[0].grad), (dw, leaves[1].grad), (db, leaves[2].grad)):
        assert rel(ours, theirs) <= 2e-2


# (N, V, backend): the Qwen vocab at the default Triton chunk (4006 columns unrounded), an odd V, the
# Llama-3 and SmolLM2 vocabs, the CPU budget, a vocab narrower than the alignment.
SLAB_SHAPES = [(16384, 151936, "triton"), (16384, 151935, "triton"), (8192, 128256, "triton"),
               (4096, 49152, "cpu"), (16384, 151936, "reference"), (100, 5, "triton")]  # fmt: skip


@pytest.mark.parametrize("n,vocab,backend", SLAB_SHAPES)
def test_vocab_slices_start_16_byte_aligned_within_the_chunk_buffer(n, vocab, backend):
    import sys

    module = sys.modules["dler_kernels.linear_policy_loss"]
    rows = module.rows_per_chunk(n, vocab, None, backend_named(backend))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        hidden = torch.empty(n, 64, dtype=dtype, device="meta")  # meta: the real buffer and views, no data
        slabs = module._Slabs(hidden, torch.empty(vocab, 64, dtype=dtype, device="meta"), None, rows)
        assert slabs.buffer.numel() == rows * vocab  # the vocab pass fits the row chunk's buffer
        bounds = []
        for v0, v1, z in slabs.vocab_slices():
            bounds.append((v0, v1))
            if vocab >= 8 * n // rows:  # at least 8 columns fit: every slice starts 16-byte aligned
                assert (v0 * dtype.itemsize) % 16 == 0 and z.data_ptr() % 16 == 0, (v0, dtype)
                if v1 < vocab or vocab % 8 == 0:  # a slice's rows too (an odd V's last slice cannot)
                    assert (z.stride(0) * dtype.itemsize) % 16 == 0, (v0, v1, dtype)
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
