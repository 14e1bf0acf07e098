"""Edge-case inputs of the kernel ops get the same answer from every backend (issue 23, item 9): the same
clear ValueError naming the argument, raised before any kernel runs, or the same result.

Rules (docstrings of ``dler_kernels.policy_loss`` and ``dler_kernels.validate``):

* Only ``logits`` / ``hidden`` / ``weight`` / ``bias`` are differentiated; any other tensor argument
  that requires grad (with grad mode on) is refused, by the reference too.
* ``mask``: bool, or numbers that are exactly 0 or 1.
* ``targets``: an integer tensor of any integer dtype but uint64 (converted to int64 before anything reads
  it), in [0, V) on valid rows; the raw ``torch.ops.dler.*`` ops refuse float targets as well.
* A vocab of 0 columns is refused; no tokens (N = 0) give empty outputs and a zero loss.
* ``old_logprobs``, ``advantages``, ``ref_logprobs`` and ``token_weights`` are finite on valid rows
  (masked rows may hold anything).
"""

import pytest
import torch
from oracle_checks import BACKENDS

from dler_kernels import _ext, linear_policy_loss, linear_token_logprobs, policy_loss, reference, token_logprobs
from dler_kernels.reference import LOSS_AGGS

needs_ext = pytest.mark.skipif(not _ext.has_cpu(), reason=f"dler_kernels._C is {_ext.why_not()}")
N, V, H = 6, 11, 4


def loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        lp = reference.token_logprobs_ref(logits, targets)
    return dict(
        logits=logits, targets=targets, old_logprobs=lp + 0.3 * torch.randn(N, generator=g),
        advantages=torch.randn(N, generator=g), mask=torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        ref_logprobs=lp + 0.2 * torch.randn(N, generator=g), token_weights=torch.rand(N, generator=g) + 0.5,
        seq_ids=torch.arange(N) // 2, beta=0.1,
    )  # fmt: skip


def linear_inputs(seed=0):
    args = loss_inputs(seed)
    g = torch.Generator().manual_seed(seed + 1)
    args.pop("logits")
    return dict(hidden=torch.randn(N, H, generator=g), weight=torch.randn(V, H, generator=g), **args)


def run_loss(args, backend, linear=False):
    """The loss and the gradients of logits (or hidden and weight)."""
    args = dict(args)
    leaves = ("hidden", "weight") if linear else ("logits",)
    for k in leaves:
        args[k] = args[k].clone().requires_grad_(True)
    out = (linear_policy_loss if linear else policy_loss)(**args, backend=backend)
    out.loss.backward()
    return out, [args[k].grad for k in leaves]


# ---------------------------------------------------------------- a. data that require grad


DATA = ("old_logprobs", "advantages", "ref_logprobs", "token_weights", "mask")


def _requiring_grad(args, name):
    value = args[name].float() if name == "mask" else args[name]
    args[name] = value.clone().requires_grad_(True)


@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
@pytest.mark.parametrize("name", DATA)
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_arguments_that_require_grad_are_refused_by_every_backend(backend, name, linear):
    args = linear_inputs() if linear else loss_inputs()
    _requiring_grad(args, name)
    with pytest.raises(ValueError, match=f"^{name} requires grad") as info:
        run_loss(args, backend, linear)
    assert f"{name}.detach()" in str(info.value)


@pytest.mark.parametrize("name", DATA)
def test_the_reference_refuses_data_arguments_that_require_grad_too(name):
    args = loss_inputs()
    _requiring_grad(args, name)
    args["logits"].requires_grad_(True)
    with pytest.raises(ValueError, match=f"^{name} requires grad"):
        reference.policy_loss_ref(**args)
    lin = linear_inputs()
    _requiring_grad(lin, name)
    with pytest.raises(ValueError, match=f"^{name} requires grad"):
        reference.linear_policy_loss_ref(**lin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_that_require_grad_are_fine_without_grad_mode_and_detached(backend):
    args = loss_inputs()
    with torch.no_grad():
        plain = policy_loss(**args, backend=backend).loss
    _requiring_grad(args, "advantages")
    with torch.no_grad():
        assert policy_loss(**args, backend=backend).loss.item() == plain.item()
    args["advantages"] = args["advantages"].detach()
    out, _ = run_loss(args, backend)
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-6)


# ---------------------------------------------------------------- b. masks that are not 0/1


@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mask_value_other_than_0_or_1_is_refused_by_every_backend(backend, value, linear):
    args = linear_inputs() if linear else loss_inputs()
    mask = args["mask"].float()
    mask[3] = value
    args["mask"] = mask
    with pytest.raises(ValueError, match="^mask must be bool or hold only 0 and 1") as info:
        run_loss(args, backend, linear)
    assert f"found {value} at token 3" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_integer_mask_of_2_is_refused_too(backend):
    args = loss_inputs()
    args["mask"] = args["mask"].long() * 2
    with pytest.raises(ValueError, match="^mask must be bool or hold only 0 and 1, found 2 at token 0"):
        policy_loss(**args, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_0_1_mask_of_any_dtype_equals_the_bool_mask(backend, dtype):
    args = loss_inputs()
    want, want_grad = run_loss(args, backend)
    got, got_grad = run_loss({**args, "mask": args["mask"].to(dtype)}, backend)
    assert got.loss.item() == want.loss.item()
    assert torch.equal(got_grad[0], want_grad[0])


def test_the_reference_refuses_a_mask_that_is_not_0_or_1():
    args = loss_inputs()
    args["mask"] = args["mask"].float() * 0.5
    with pytest.raises(ValueError, match="^mask must be bool or hold only 0 and 1"):
        reference.policy_loss_ref(**args)


# ---------------------------------------------------------------- c. float targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_targets_are_refused_by_every_entry_point(backend):
    args, lin = loss_inputs(), linear_inputs()
    bad = args["targets"].float() + 0.7
    with pytest.raises(ValueError, match="^targets must be an integer tensor"):
        policy_loss(**{**args, "targets": bad}, backend=backend)
    with pytest.raises(ValueError, match="^targets must be an integer tensor"):
        token_logprobs(args["logits"], bad, backend=backend)
    with pytest.raises(ValueError, match="^targets must be an integer tensor"):
        linear_policy_loss(**{**lin, "targets": bad}, backend=backend)
    with pytest.raises(ValueError, match="^targets must be an integer tensor"):
        linear_token_logprobs(lin["hidden"], lin["weight"], bad, backend=backend)


INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32]  # int32 and int64 always worked


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_of_every_integer_dtype_give_the_int64_result_on_every_backend(backend, dtype):
    """One rule: any integer dtype, its values unchanged (int64 underneath). Before: uint8, int8, int16 crashed
    the reference's fused-linear path and linear_token_logprobs with a gradient on every backend (gather needs
    int64); uint16/uint32 crashed every entry point."""
    args, lin = loss_inputs(), linear_inputs()
    small = {"targets": args["targets"].to(dtype)}
    lin_bf16 = {**lin, "hidden": lin["hidden"].bfloat16(), "weight": lin["weight"].bfloat16()}  # the vocab pass
    for linear, a in ((False, args), (True, lin), (True, lin_bf16)):
        opts = dict(chunk_size=2) if linear else {}
        want, want_grads = run_loss({**a, **opts}, backend, linear)
        got, got_grads = run_loss({**a, **small, **opts}, backend, linear)
        assert got.loss.item() == want.loss.item() and torch.equal(got.logprobs, want.logprobs)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    padded = torch.where(args["mask"], args["targets"], 0 if dtype in (torch.uint8, torch.uint16, torch.uint32) else -7)
    want = token_logprobs(args["logits"], padded, return_entropy=True, backend=backend)
    got = token_logprobs(args["logits"], padded.to(dtype), return_entropy=True, backend=backend)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    hidden = lin["hidden"].clone().requires_grad_(True)
    want = linear_token_logprobs(hidden, lin["weight"], padded, return_entropy=True, chunk_size=4, backend=backend)
    got = linear_token_logprobs(hidden, lin["weight"], padded.to(dtype), return_entropy=True, chunk_size=4,
                                backend=backend)  # fmt: skip
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    (want_dx,) = torch.autograd.grad(want[0].sum() + want[1].sum(), hidden)
    (got_dx,) = torch.autograd.grad(got[0].sum() + got[1].sum(), hidden)
    assert torch.equal(got_dx, want_dx)


def test_uint64_targets_are_refused_by_every_entry_point():
    """int64 does not hold every uint64: a value above 2**63 would wrap to a negative id, i.e. a padding row."""
    args, lin = loss_inputs(), linear_inputs()
    bad = args["targets"].to(torch.uint64)
    msg = r"^targets must be an integer tensor that int64 holds \(token ids\), got torch.uint64$"
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=msg):
            policy_loss(**{**args, "targets": bad}, backend=backend)
        with pytest.raises(ValueError, match=msg):
            token_logprobs(args["logits"], bad, backend=backend)
        with pytest.raises(ValueError, match=msg):
            linear_policy_loss(**{**lin, "targets": bad}, backend=backend)
        with pytest.raises(ValueError, match=msg):
            linear_token_logprobs(lin["hidden"], lin["weight"], bad, backend=backend)


@needs_ext
def test_the_raw_ops_refuse_float_targets_and_a_non_bool_valid():
    logits = torch.randn(3, 5)
    f32 = torch.zeros(3)
    valid = torch.ones(3, dtype=torch.bool)
    scalars = (1.0, 0.2, 0.28, 10.0, 0.0, 0, 0.0)
    float_targets = torch.tensor([2.7, 1.0, 0.0])
    int_targets = torch.tensor([2, 1, 0])
    msg = r"^targets must be an integer tensor \(token ids\), got Float"
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.dler.token_logprobs(logits, float_targets, 1.0)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.dler.policy_loss(logits, float_targets, valid, f32, f32, None, f32, *scalars, False)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.dler.policy_loss_rows_(torch.empty_like(logits), logits, float_targets, valid, f32, f32, None, f32,
                                         *scalars)  # fmt: skip
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.dler.slab_grad_(logits.clone(), float_targets, valid, f32, f32, f32, f32, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"^valid must be a bool tensor, got Float"):
        torch.ops.dler.policy_loss(logits, int_targets, torch.full((3,), 0.5), f32, f32, None, f32, *scalars, False)
    with pytest.raises(RuntimeError, match=r"^valid must be a bool tensor, got Float"):
        torch.ops.dler.slab_grad_(logits.clone(), int_targets, valid.float(), f32, f32, f32, f32, 0, 1.0)


# ---------------------------------------------------------------- d. empty shapes


@pytest.mark.parametrize("n", [3, 0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocab_of_zero_columns_is_refused_by_every_backend(backend, n):
    logits = torch.zeros(n, 0)
    padding = torch.full((n,), -100)
    msg = rf"^logits must have at least one column \(the vocab size V\), got shape \({n}, 0\)"
    with pytest.raises(ValueError, match=msg):
        token_logprobs(logits, padding, backend=backend)
    zeros = torch.zeros(n)
    with pytest.raises(ValueError, match=msg):
        policy_loss(logits, padding, zeros, zeros, torch.zeros(n, dtype=torch.bool), backend=backend)


@needs_ext
def test_the_raw_ops_refuse_a_vocab_of_zero_columns():
    with pytest.raises(RuntimeError, match=r"^logits must have at least one column \(the vocab size V\)"):
        torch.ops.dler.token_logprobs(torch.zeros(2, 0), torch.tensor([-1, -1]), 1.0)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_give_empty_outputs_and_a_zero_loss_on_every_backend(backend, loss_agg):
    empty_i, empty_f = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    opts = dict(loss_agg=loss_agg, seq_ids=empty_i, norm_length=8.0, beta=0.1, ref_logprobs=empty_f,
                token_weights=empty_f)  # fmt: skip
    args = dict(targets=empty_i, old_logprobs=empty_f, advantages=empty_f, mask=torch.zeros(0, dtype=torch.bool))
    out, (grad,) = run_loss({"logits": torch.zeros(0, V), **args, **opts}, backend)
    assert out.loss.item() == 0.0 and grad.shape == (0, V)
    assert out.per_token_loss.shape == out.logprobs.shape == out.entropy.shape == (0,)
    assert out.metrics["num_tokens"].item() == 0 and out.metrics["entropy"].item() == 0.0
    lin, (dx, dw) = run_loss({"hidden": torch.zeros(0, H), "weight": torch.randn(V, H), **args, **opts}, backend, True)
    assert lin.loss.item() == 0.0 and dx.shape == (0, H) and torch.equal(dw, torch.zeros(V, H))
    lp, ent = token_logprobs(torch.zeros(0, V), empty_i, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32
    lp, ent = linear_token_logprobs(torch.zeros(0, H), torch.randn(V, H), empty_i, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32


# ---------------------------------------------------------------- siblings: non-finite data on valid rows


FINITE_DATA = ("old_logprobs", "advantages", "ref_logprobs", "token_weights")


@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("name", FINITE_DATA)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_data_value_on_a_valid_row_is_refused_by_every_backend(backend, name, value, linear):
    """Before: a NaN old log-prob gave a finite loss on Triton and NaN on the others; a NaN advantage a NaN
    gradient row on the reference and a finite one on the kernels."""
    args = linear_inputs() if linear else loss_inputs()
    args[name] = args[name].clone()
    args[name][4] = value
    with pytest.raises(ValueError, match=f"^{name} must be finite on valid rows, found {value} at token 4"):
        run_loss(args, backend, linear)


@pytest.mark.parametrize("name", FINITE_DATA)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_data_on_masked_rows_change_nothing(backend, name):
    args = loss_inputs()
    clean, (clean_grad,) = run_loss(args, backend)
    args[name] = args[name].clone()
    args[name][2] = float("nan")  # row 2 is masked
    out, (grad,) = run_loss(args, backend)
    assert out.loss.item() == clean.loss.item() and torch.equal(grad, clean_grad)


# ---------------------------------------------------------------- siblings: inplace_grad on the reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_overwrites_the_logits_and_backward_scales_them_on_every_backend(backend):
    """Before: the reference backend (the CPU default where the extension is not built) left the logits as
    they were under inplace_grad=True, so a caller reading the gradient from the buffer read the logits."""
    args = loss_inputs()
    want, (want_grad,) = run_loss(args, backend)
    buffer = args["logits"].clone()
    out = policy_loss(**{**args, "logits": buffer}, inplace_grad=True, backend=backend)
    assert out.loss.item() == want.loss.item() and out.loss.grad_fn is None
    assert torch.equal(buffer, want_grad)
    leaf = args["logits"].clone().requires_grad_(True)
    (2.0 * policy_loss(**{**args, "logits": leaf}, inplace_grad=True, backend=backend).loss).backward()
    torch.testing.assert_close(leaf.grad, 2.0 * want_grad)


# ---------------------------------------------------------------- siblings: compute_advantages


ADV_BACKENDS = [b for b in BACKENDS if b in ("triton", "reference")]


def advantage_inputs():
    return dict(
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.5]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        correctness=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        token_counts=torch.tensor([3.0, 4.0, 5.0, 6.0]),
    )


@pytest.mark.parametrize("name", ["rewards", "correctness", "token_counts"])
@pytest.mark.parametrize("backend", ADV_BACKENDS)
def test_advantage_inputs_that_require_grad_are_refused_by_every_backend(backend, name, monkeypatch):
    """Before: the reference differentiated the advantages w.r.t. rewards, the Triton kernel did not."""
    from dler_kernels import compute_advantages

    monkeypatch.setenv("DLER_BACKEND", backend)
    args = advantage_inputs()
    args[name] = args[name].clone().requires_grad_(True)
    with pytest.raises(ValueError, match=f"^{name} requires grad"):
        compute_advantages(**args)


@pytest.mark.parametrize("name", ["correctness", "token_counts"])
@pytest.mark.parametrize("backend", ADV_BACKENDS)
def test_non_finite_correctness_or_token_counts_are_refused_by_every_backend(backend, name, monkeypatch):
    """Before: a NaN token count gave NaN advantages, a NaN correctness silently dropped its group."""
    from dler_kernels import compute_advantages

    monkeypatch.setenv("DLER_BACKEND", backend)
    args = advantage_inputs()
    args[name][1] = float("nan")
    with pytest.raises(ValueError, match=f"^{name} must be finite"):
        compute_advantages(**args)
