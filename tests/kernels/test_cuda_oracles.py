"""Every backend that runs on CUDA tensors against the float64 reference, on the GPU: the logits path
(``policy_loss``: loss, log-probs, entropy, clip metrics, gradient), ``token_logprobs`` (entropy, temperature),
the fused-linear path (``linear_policy_loss``: gradients w.r.t. hidden, weight and bias) and
``compute_advantages`` (every method, weighting and dynamic-sampling choice).

The backends: ``triton`` (the kernels compiled for the GPU, not interpreted), ``cuda`` (the extension's CUDA
kernels; a GPU machine must have built them, as ``make gpu-check``'s build stage does) and ``reference``
(plain torch on CUDA tensors). Every test is marked ``gpu``: without a CUDA device tests/conftest.py skips it
with the reason printed; ``make gpu-check`` runs them in its correctness stage (with TRITON_INTERPRET=0).

The oracle runs on the CPU in float64 from the same inputs (the same generator draws as the CPU suites), so
that nothing of the device under test enters it. Tolerances, as in test_policy_loss.py and
test_linear_policy_loss.py (oracle_checks.check_loss_terms):

* loss rel <= 1e-5 of the same aggregation of |per-token loss|, log-prob abs <= 1e-5, entropy <= 1e-5 of its
  scale, the clip metrics to 1e-6: float32 arithmetic, whatever the logits' dtype.
* float32 gradients: rel (Frobenius) <= 1e-4 (float32 sums over up to V terms).
* bf16 / fp16 gradients are rounded once to their storage dtype; compiled code rounds to nearest, so per
  element the bound is half a spacing (2^-8 relative for bf16, 2^-11 for fp16) plus 1e-4 of the gradient's
  scale. The fused-linear path rounds dZ once more before its matmuls: the bound adds that rounding of every
  term, 2^-8 / 2^-11 of the absolute sum (|dZ| |W| for dX, |dZ|^T |X| for dW, sum |dZ| for db).
* The fused-linear oracle starts from the logits of the kernel's own row chunks, computed with the same cuBLAS
  call (``torch.addmm`` / ``torch.mm`` on each chunk of ``chunk_size`` rows): the spec is the loss of the
  input-dtype logits an LM head makes, and cuBLAS may round another matmul's bf16 logits one spacing apart
  (0.016 at a logit of 4), which a log-prob bound of 1e-5 cannot absorb.
* Advantages: values rtol 1e-5 / atol 1e-5, statistics rel 1e-5 / abs 1e-6 (float32 sums of 3000 responses).
"""

import pytest
import torch
from oracle_checks import (
    OBJECTIVE_CASES,
    OPTION_SETS,
    STORE_ROUNDING,
    advantage_inputs,
    check_loss_terms,
    linear_inputs,
    logits_inputs,
    logits_oracle,
    masked_vocab_linear_inputs,
    masked_vocab_logits_inputs,
    objective_options,
    rel,
    zero_probability_refused,
    zero_probability_rows,
)

from dler_kernels import (
    PolicyLossOutput,
    available_backends,
    compute_advantages,
    linear_policy_loss,
    policy_loss,
    reference,
    token_logprobs,
)
from dler_kernels.dispatch import ADVANTAGES_BACKENDS, triton_interpret, usable_backends
from dler_kernels.linear_policy_loss import LINEAR_LOGITS
from dler_kernels.reference import KL_TYPES, LOSS_AGGS

pytestmark = pytest.mark.gpu

# Every backend that can take CUDA tensors: the two with CUDA kernels, and the plain-torch reference.
CUDA_BACKENDS = ("triton", "cuda", "reference")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute error of one rounding below the smallest normal number: half the subnormal spacing. fp16's is 2^-25
# (its normals end at 6.1e-5, and a dZ of a seq-mean-token-sum-norm loss over a 1000-word vocab is ~3e-6);
# bf16 has float32's range.
SUBNORMAL_ROUNDING = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def require_on_cuda(name: str) -> str:
    """``name`` if it runs on CUDA tensors here; a GPU machine without the extension's CUDA kernels, or with
    Triton interpreted, fails (the check would otherwise pass without testing them)."""
    if name == "triton" and triton_interpret():
        pytest.fail("TRITON_INTERPRET=1 interprets the Triton kernels instead of compiling them for the GPU; "
                    "run these tests with TRITON_INTERPRET=0")  # fmt: skip
    if name not in usable_backends("cuda"):
        state = available_backends()[name]
        if name == "cuda":
            pytest.fail(f"a GPU machine must build the CUDA kernels (make gpu-check's build stage); "
                        f"dler_kernels._C: {state}")  # fmt: skip
        pytest.skip(f"{name} cannot run on CUDA tensors here: {state}")
    return name


@pytest.fixture(params=CUDA_BACKENDS)
def backend(request):
    return require_on_cuda(request.param)


@pytest.fixture(params=ADVANTAGES_BACKENDS)
def advantages_backend(request, monkeypatch):
    """compute_advantages takes no backend argument: chosen through DLER_BACKEND, as a user would."""
    name = require_on_cuda(request.param)
    monkeypatch.setenv("DLER_BACKEND", name)
    return name


def cuda(values: dict) -> dict:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


def on_cpu(out: PolicyLossOutput) -> PolicyLossOutput:
    return PolicyLossOutput(*(t.detach().cpu() for t in out[:4]), {k: v.cpu() for k, v in out.metrics.items()})


def check_half_grad(name, got, want, dtype, abs_terms=0.0, term_counts=0.0):
    """A bf16/fp16 gradient: one rounding of each term (``abs_terms``: their absolute sum, ``term_counts``:
    their weighted count for the subnormal floor; both 0 for the logits path), one rounding of the result,
    and 1e-4 of its scale."""
    assert got.dtype == dtype, f"{name} dtype {got.dtype}"
    floor = SUBNORMAL_ROUNDING[dtype]
    bound = STORE_ROUNDING[dtype] * (abs_terms + want.abs()) + floor * (term_counts + 1.0) + 1e-4 * want.abs().max()
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), (name, (err - bound).max().item(), rel(got, want))


# ---------------------------------------------------------------- logits path


def check_logits_path(backend, tensors, extra, opts):
    """The outputs and d loss / d logits against the float64 oracle; returns that gradient (on the CPU)."""
    x = tensors["logits"].cuda().requires_grad_(True)
    out = policy_loss(**{**cuda(tensors), "logits": x}, **cuda(extra), **cuda(opts), backend=backend)
    out.loss.backward()
    loss64, pt64, lp64, ent64, m64, grad64 = logits_oracle(tensors, extra, opts)
    check_loss_terms(on_cpu(out), loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    grad = x.grad.cpu()
    if grad.dtype == torch.float32:
        assert rel(grad, grad64) <= 1e-4
    else:
        check_half_grad("dlogits", grad, grad64, grad.dtype)
    return grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_every_objective_on_the_logits_path(backend, case, dtype):
    """The objectives without a fused kernel run in two passes (log-prob kernel, objective, gradient kernel)."""
    index = sorted(OBJECTIVE_CASES).index(case)
    opts = objective_options(case, OPTION_SETS[index % len(OPTION_SETS)])
    tensors, extra = logits_inputs(24, 1000, dtype, seed=100 + index)
    extra["seq_ids"] = torch.arange(24) // 5
    check_logits_path(backend, tensors, extra, opts)


# V: one column, below one block, a block and a few columns past a power of two, Llama-2's odd 32003, Qwen's
# 151936; N: one row, and counts that fill no warp or tile evenly.
LOGITS_SHAPES = [(1, 1), (3, 7), (17, 1000), (5, 4097), (33, 32003), (4, 151936)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGITS_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_policy_loss_on_cuda_matches_float64(backend, shape, dtype):
    """Each shape and dtype gets one of the option sets (together: every loss_agg, four KL estimators, dual
    clip on and off, entropy bonus, temperature), clip-higher (eps_high > eps_low) always, token weights on
    every other one."""
    n, v = shape
    i = LOGITS_SHAPES.index(shape) + DTYPES.index(dtype)
    opts = dict(OPTION_SETS[i % len(OPTION_SETS)], eps_low=0.2, eps_high=0.28)
    if i % 2:
        opts["token_weights"] = torch.rand(n, generator=torch.Generator().manual_seed(i)) * 2.0
    tensors, extra = logits_inputs(n, v, dtype, seed=n * 1000 + v)
    check_logits_path(backend, tensors, extra, opts)


@pytest.mark.parametrize("clip_c", [10.0, None])
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_on_cuda_every_option_combination(backend, loss_agg, kl_type, clip_c):
    """beta > 0 with ref_logprobs, every KL estimator and aggregation, dual clip on and off, asymmetric clip."""
    tensors, extra = logits_inputs(37, 1031, torch.float32, seed=7)
    opts = dict(loss_agg=loss_agg, kl_type=kl_type, clip_c=clip_c, entropy_coef=0.01, beta=0.1, temperature=0.8,
                norm_length=40.0, eps_low=0.15, eps_high=0.35)  # fmt: skip
    check_logits_path(backend, tensors, extra, opts)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_on_cuda_with_token_weights_and_a_global_normalizer(backend, loss_agg):
    tensors, extra = logits_inputs(29, 4099, torch.bfloat16, seed=12)
    weights = torch.rand(29, generator=torch.Generator().manual_seed(3)) * 2.0
    opts = dict(loss_agg=loss_agg, kl_type="k3_ratio", beta=0.1, entropy_coef=0.01, norm_length=30.0,
                token_weights=weights, normalizer=50.0)  # fmt: skip
    check_logits_path(backend, tensors, extra, opts)


# -inf logits (a masked vocabulary; reference module docstring): probability 0, nothing added to the entropy,
# gradient exactly 0; a valid row whose target has probability 0 is a ValueError. Tolerances as above.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 7), (17, 1000), (5, 4097), (33, 32003), (3, 151936)],
                         ids=lambda s: f"N{s[0]}-V{s[1]}")  # fmt: skip
def test_policy_loss_on_cuda_with_minus_inf_logits_matches_float64(backend, shape, dtype):
    """Row 1 of a wide vocab is -inf over its whole first half: whole tiles (Triton) and thread vectors
    (CUDA) of -inf before the first finite logit."""
    n, v = shape
    opts = dict(OPTION_SETS[(n + DTYPES.index(dtype)) % len(OPTION_SETS)], entropy_coef=0.01)
    tensors, extra, cut = masked_vocab_logits_inputs(n, v, dtype, seed=n + v)
    grad = check_logits_path(backend, tensors, extra, opts)
    assert torch.equal(grad[cut], torch.zeros_like(grad[cut]))
    buffer = tensors["logits"].cuda()
    out = policy_loss(**{**cuda(tensors), "logits": buffer}, **cuda(extra), **cuda(opts), inplace_grad=True,
                      backend=backend)  # fmt: skip
    assert torch.isfinite(out.loss) and torch.equal(buffer.cpu()[cut], torch.zeros_like(grad[cut]))
    padded = torch.where(tensors["mask"], tensors["targets"], -100)  # the masked rows are -inf throughout
    lp, ent = token_logprobs(tensors["logits"].cuda(), padded.cuda(), temperature=opts["temperature"],
                             return_entropy=True, backend=backend)  # fmt: skip
    assert torch.isfinite(ent).all() and torch.equal(lp.cpu(), out.logprobs.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_policy_loss_on_cuda_with_a_minus_inf_bias_matches_float64(backend, dtype):
    """bf16: the vocab pass meets the -inf columns again in the slab kernel."""
    n, h, v, chunk = 17, 32, 4099, 5
    tensors, extra, cut = masked_vocab_linear_inputs(n, h, v, dtype, seed=3)
    on_gpu, extra_gpu = cuda(tensors), cuda(extra)
    leaves = {k: on_gpu[k].clone().requires_grad_(True) for k in ("hidden", "weight")}
    bias = extra_gpu["bias"].clone().requires_grad_(True)
    opts = dict(OPTION_SETS[1], entropy_coef=0.01)
    out = linear_policy_loss(**{**on_gpu, **leaves}, **{**extra_gpu, "bias": bias}, chunk_size=chunk, **opts,
                             backend=backend)  # fmt: skip
    out.loss.backward()
    with torch.no_grad():
        logits = chunk_logits_on_cuda(on_gpu["hidden"], on_gpu["weight"], extra_gpu["bias"], chunk).cpu()
    z64 = logits.double().requires_grad_(True)
    loss64, pt64, lp64, ent64, m64 = reference.policy_loss_ref(
        z64, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
        ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss64.backward()
    check_loss_terms(on_cpu(out), loss64.detach(), pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    dz, x, w = z64.grad, tensors["hidden"].double(), tensors["weight"].double()
    grads = [
        ("dhidden", leaves["hidden"].grad, dz @ w, dz.abs() @ w.abs(), w.abs().sum(0).expand(n, h)),
        ("dweight", leaves["weight"].grad, dz.t() @ x, dz.abs().t() @ x.abs(), x.abs().sum(0).expand(v, h)),
        ("dbias", bias.grad, dz.sum(0), dz.abs().sum(0), torch.full((v,), float(n))),
    ]
    for name, got, want, abs_terms, term_counts in grads:
        got = got.cpu()
        if dtype == torch.float32:
            assert rel(got, want) <= 1e-4, (name, rel(got, want))
        else:
            check_half_grad(name, got, want, dtype, abs_terms, term_counts)
    assert torch.equal(bias.grad.cpu()[cut], torch.zeros(int(cut.sum()), dtype=dtype))
    assert torch.equal(leaves["weight"].grad.cpu()[cut], torch.zeros(int(cut.sum()), h, dtype=dtype))


def test_a_target_of_probability_0_is_refused_on_cuda(backend):
    tensors, extra = logits_inputs(9, 1031, torch.float32, seed=13)
    for _case, logits, row in zero_probability_rows(tensors["logits"], tensors["targets"], tensors["mask"]):
        args = {**cuda(tensors), "logits": logits.cuda()}
        with zero_probability_refused(row):
            policy_loss(**args, **cuda(extra), backend=backend)
        with zero_probability_refused(row):
            token_logprobs(args["logits"], torch.where(args["mask"], args["targets"], -100), backend=backend)
        with zero_probability_refused(row):  # last: the gradient overwrites the logits before the check
            policy_loss(**args, inplace_grad=True, backend=backend)
    lin, lin_extra = linear_inputs(8, 16, 300, torch.bfloat16, seed=9)
    lin, lin_extra = cuda(lin), cuda(lin_extra)
    row = int(lin["mask"].nonzero()[0, 0])
    lin_extra["bias"][lin["targets"][row]] = float("-inf")
    first = int((lin["mask"] & (lin["targets"] == lin["targets"][row])).nonzero()[0, 0])
    with zero_probability_refused(first, LINEAR_LOGITS):
        linear_policy_loss(**lin, **lin_extra, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (13, 4097), (4, 151936)], ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_token_logprobs_on_cuda_matches_float64(backend, shape, dtype):
    n, v = shape
    g = torch.Generator().manual_seed(n + v)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = -100  # a padding row: log-prob and entropy 0
    lp, ent = token_logprobs(logits.cuda(), targets.cuda(), temperature=0.8, return_entropy=True, backend=backend)
    lp64, ent64 = reference.token_logprobs_ref(logits.double(), targets, temperature=0.8, return_entropy=True)
    assert lp.dtype == torch.float32 and lp.is_cuda
    assert (lp.double().cpu() - lp64).abs().max() <= 1e-5
    assert (ent.double().cpu() - ent64).abs().max() <= 1e-5 * max(1.0, ent64.abs().max().item())
    assert lp[0].item() == 0.0 and ent[0].item() == 0.0


# ---------------------------------------------------------------- fused-linear path


def chunk_logits_on_cuda(hidden, weight, bias, chunk_size):
    """The logits of the kernel's row chunks, by the same cuBLAS call on the same rows (see the docstring)."""
    chunks = []
    for r0 in range(0, hidden.shape[0], chunk_size):
        x = hidden[r0 : r0 + chunk_size]
        z = torch.empty(x.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        if bias is None:
            torch.mm(x, weight.t(), out=z)
        else:
            torch.addmm(bias, x, weight.t(), out=z)
        chunks.append(z)
    return torch.cat(chunks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(7, 16, 33, 3), (17, 24, 1000, 5), (5, 32, 4097, 2), (64, 128, 32003, 16), (9, 64, 151936, 4)],
    ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-chunk{s[3]}",
)  # fmt: skip
def test_linear_policy_loss_on_cuda_matches_float64(backend, shape, dtype):
    """Gradients w.r.t. hidden, weight and bias (every other case without a bias), through the row pass and,
    for bf16/fp16 weights, the vocab pass."""
    n, h, v, chunk = shape
    i = (n + DTYPES.index(dtype)) % len(OPTION_SETS)
    opts = dict(OPTION_SETS[i])
    tensors, extra = linear_inputs(n, h, v, dtype, seed=n * 1000 + v, with_bias=i % 2 == 0)
    on_gpu, extra_gpu = cuda(tensors), cuda(extra)
    leaves = {k: on_gpu[k].clone().requires_grad_(True) for k in ("hidden", "weight")}
    bias = extra_gpu["bias"].clone().requires_grad_(True) if extra["bias"] is not None else None
    out = linear_policy_loss(**{**on_gpu, **leaves}, **{**extra_gpu, "bias": bias}, chunk_size=chunk, **opts,
                             backend=backend)  # fmt: skip
    out.loss.backward()

    with torch.no_grad():
        logits = chunk_logits_on_cuda(on_gpu["hidden"], on_gpu["weight"], extra_gpu["bias"], chunk).cpu()
    z64 = logits.double().requires_grad_(True)
    loss64, pt64, lp64, ent64, m64 = reference.policy_loss_ref(
        z64, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
        ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss64.backward()
    check_loss_terms(on_cpu(out), loss64.detach(), pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    dz, x, w = z64.grad, tensors["hidden"].double(), tensors["weight"].double()
    # (name, gradient, float64 gradient, sum of |terms|, sum of |the factor each rounded dZ meets|)
    grads = [
        ("dhidden", leaves["hidden"].grad, dz @ w, dz.abs() @ w.abs(), w.abs().sum(0).expand(n, h)),
        ("dweight", leaves["weight"].grad, dz.t() @ x, dz.abs().t() @ x.abs(), x.abs().sum(0).expand(v, h)),
    ]
    if bias is not None:
        grads.append(("dbias", bias.grad, dz.sum(0), dz.abs().sum(0), torch.full((v,), float(n))))
    for name, got, want, abs_terms, term_counts in grads:
        got = got.cpu()
        if dtype == torch.float32:
            assert got.dtype == dtype and rel(got, want) <= 1e-4, (name, rel(got, want))
        else:
            check_half_grad(name, got, want, dtype, abs_terms, term_counts)


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("weighting", ["token", "sample"])
@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dler"])
def test_advantages_on_cuda_match_float64(advantages_backend, method, weighting, dynamic):
    rewards, groups, correct, counts = advantage_inputs()
    kw = dict(method=method, weighting=weighting, dynamic_sampling=dynamic)
    out = compute_advantages(rewards.cuda(), groups.cuda(), correctness=correct.cuda(), token_counts=counts.cuda(),
                             **kw)  # fmt: skip
    values64, keep64, stats64 = reference.compute_advantages_ref(
        rewards.double(), groups, correctness=correct, token_counts=counts, **kw
    )
    assert out.values.is_cuda and torch.equal(out.keep.cpu(), keep64)
    torch.testing.assert_close(out.values.double().cpu(), values64, rtol=1e-5, atol=1e-5)
    for key, value in stats64.items():
        assert out.stats[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
