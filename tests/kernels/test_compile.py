"""``torch.compile(fullgraph=True)`` over the public losses, every objective: one graph (no break), and the compiled
loss, log-probs and gradients equal to eager (Liger-Kernel #1364 corrupted gradients under compile).

Under tracing the two-pass objectives run ``objective_path.RowLogprobs`` (and ``linear_policy_loss``'s differentiable
log-probs), the same kernels and objective function as eager, autograd chaining them; the value checks are skipped
(``validate.values_readable``). On the CPU: the reference and the C++ backends (the Triton kernels cannot be traced
while the interpreter runs them; ``make gpu-check`` compiles them on a GPU). Every objective is traced by dynamo and
AOTAutograd (``aot_eager``: the graph and the joint forward/backward, where breaks and gradient mix-ups arise); the
objectives with their own autograd code paths are also lowered by inductor.

Tolerance: rel 1e-6 on float32. Compiled and eager run the same kernels; inductor may fuse and reorder the [N]
arithmetic around them (float32 rounding, about 1e-7 relative per operation), nothing else.
"""

from __future__ import annotations

import pytest
import torch
from oracle_checks import BACKENDS

from dler_kernels import linear_policy_loss, policy_loss
from dler_kernels.dispatch import usable_backends
from dler_kernels.objectives import OBJECTIVES

N, H, V = 24, 8, 17
COMPILE_BACKENDS = [b for b in ("reference", "cpu") if b in BACKENDS]
# Every term at once: KL (ratio-weighted k3), entropy bonus, a sequence aggregation and token weights.
COMPOSED = dict(beta=0.04, kl_type="k3_ratio", entropy_coef=0.01, loss_agg="seq-mean-token-mean")


def inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    logits = hidden @ weight.T
    targets = torch.randint(0, V, (N,), generator=g)
    current = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    old = current + 0.3 * torch.randn(N, generator=g)
    ref = current + 0.3 * torch.randn(N, generator=g)
    seq_ids = torch.arange(N) // 6
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8]).repeat_interleave(6)
    mask = torch.ones(N, dtype=torch.bool)
    mask[9:12] = False  # a padded sequence
    weights = torch.rand(N, generator=g) * 2
    data = dict(targets=targets, old_logprobs=old, advantages=advantages, mask=mask)
    extra = dict(ref_logprobs=ref, seq_ids=seq_ids, token_weights=weights)
    data, extra = ({k: t.to(device) for k, t in d.items()} for d in (data, extra))
    return hidden.to(device), weight.to(device), logits.to(device), data, extra


def run(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss, logp = fn(*leaves)
    loss.backward()
    return loss.detach(), logp.detach(), [t.grad for t in leaves]


def check_compiled(fn, tensors, compiler):
    torch._dynamo.reset()  # a fresh cache: each case compiles (and is checked) on its own
    eager = run(fn, *tensors)
    compiled = run(torch.compile(fn, fullgraph=True, backend=compiler), *tensors)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7)
    for got, want in zip(compiled[2], eager[2]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def logits_loss(backend, options, device="cpu"):
    _, _, logits, data, extra = inputs(device=device)

    def fn(x):
        out = policy_loss(x, **data, **extra, backend=backend, **options)
        return out.loss, out.logprobs

    return fn, (logits,)


def linear_loss(backend, options, device="cpu"):
    hidden, weight, _, data, extra = inputs(device=device)

    def fn(h, w):
        out = linear_policy_loss(h, w, **data, **extra, backend=backend, chunk_size=8, **options)
        return out.loss, out.logprobs

    return fn, (hidden, weight)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("path", [logits_loss, linear_loss], ids=["logits", "linear"])
def test_every_objective_traces_in_one_graph(path, objective, backend):
    check_compiled(*path(backend, dict(objective=objective, **COMPOSED)), "aot_eager")


@pytest.mark.parametrize(
    "path,options",
    [(logits_loss, dict(objective="ppo_clip")), (linear_loss, dict(objective="ppo_clip", opsm_threshold=0.1)),
     (logits_loss, dict(objective="gspo"))],
    ids=["logits-fused", "linear-two-pass", "logits-sequence-level"],
)  # fmt: skip
def test_inductor_matches_eager(path, options):
    """The fused PPO-clip path, PPO-clip through the two passes (OPSM) and a sequence-level objective, lowered by
    inductor (about 10 s each), on the C++ backend where it is built."""
    check_compiled(*path(COMPILE_BACKENDS[0] if "cpu" not in COMPILE_BACKENDS else "cpu", dict(options, **COMPOSED)),
                   "inductor")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("objective", ["ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("path", [logits_loss, linear_loss], ids=["logits", "linear"])
def test_gpu_backends_trace_in_one_graph(path, objective, backend):
    """The Triton kernels (user-defined Triton kernels in the graph) and the CUDA extension's ops, on a GPU (``make
    gpu-check``): the fused path, a sequence-level and a token-local two-pass objective."""
    if backend not in usable_backends("cuda"):
        pytest.skip(f"the {backend} backend is not usable here")
    check_compiled(*path(backend, dict(objective=objective, **COMPOSED), device="cuda"), "aot_eager")


@pytest.mark.skipif("cpu" not in COMPILE_BACKENDS, reason="needs the C++ extension (dler_kernels._C)")
def test_inplace_grad_of_a_two_pass_objective_under_compile_is_refused():
    """The eager two-pass path writes the gradient into the logits in its forward; a traced one computes it in the
    backward, where the logits are an input of the graph: refused by name rather than silently not in place."""
    _, _, logits, data, extra = inputs()

    def fn(x):
        return policy_loss(x, **data, **extra, backend="cpu", objective="gspo", inplace_grad=True).loss

    torch._dynamo.reset()
    x = logits.clone().requires_grad_()
    with pytest.raises(Exception, match="inplace_grad=True under torch.compile"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
