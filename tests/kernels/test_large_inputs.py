"""Beyond 32-bit indexing: N >= 65,536 rows (a (B, L) launch grid crashes Liger at L >= 65,536) and N x V > 2**31
elements, on the C++ backend in bf16 (the 4.3 GB logits fit this machine's memory; ``inplace_grad`` adds no
second buffer), for the fused PPO-clip kernel and a sequence-level two-pass objective (GSPO).

What is checked: the log-probs and per-token losses of the first and the last 2,048 rows (whole sequences) against
the reference on float32 copies of those rows, every row's loss finite, and the gradient of the first and of the last
two sequences (the last one lies wholly past element 2**31) against the reference on those sequences alone (a global
``normalizer`` makes a row's gradient independent of the other sequences). The Triton kernels' 64-bit row offsets
are checked by the AOT compile (``tests/kernels/test_aot_check.py``), which needs no GPU.

Tolerances: the log-probs and per-token losses to 2e-5 absolute (float32 accumulation on both sides over 32,768
columns in different orders: a few roundings of an O(10) log-sum-exp, ~1e-6 each; the loss's terms are O(1)); the
gradient, stored in bf16, to one bf16 rounding of its
row's largest entry (``STORE_ROUNDING``) plus 1e-7 absolute.
"""

from __future__ import annotations

import pytest
import torch
from oracle_checks import BACKENDS, STORE_ROUNDING

from dler_kernels import policy_loss
from dler_kernels.reference import policy_loss_ref

SEQ = 512
N = 129 * SEQ  # 66,048 rows: past 65,536
V = 32_768  # N x V = 2,164,260,864 > 2**31: every row from 65,536 on, the whole last sequence, lies past it
CHUNK = 4 * SEQ  # the last 4 sequences: the one wholly past element 2**31, the one across it, two before
PERIOD = 8191  # rows; prime (see ``batch``)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension (dler_kernels._C)"),
]


@pytest.fixture
def batch():
    """Fresh logits for each test (``inplace_grad`` overwrites them): one 4.3 GB tensor at a time.

    Its rows repeat with a period of PERIOD random rows: drawing 2.2e9 normal values took most of the test's
    time. The period is prime, so a read displaced by any power of two of rows, as a 32-bit offset that wrapped
    at 2**31 or 2**32 elements displaces it (65,536 or 131,072 rows), lands on a row of other values."""
    assert N * V > 2**31 and N >= 65_536 and (N - SEQ) * V >= 2**31
    assert all((2**b // V) % PERIOD for b in (31, 32))
    g = torch.Generator().manual_seed(0)
    block = torch.empty(PERIOD, V, dtype=torch.bfloat16).normal_(0.0, 2.0, generator=g)
    logits = torch.empty(N, V, dtype=torch.bfloat16)
    for start in range(0, N, PERIOD):
        logits[start : start + PERIOD] = block[: N - start]
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[-SEQ // 2 :: 7] = False  # masked rows in the last sequence too
    period, values = torch.arange(N) % PERIOD, block.float()
    current = values[period, targets] - torch.logsumexp(values, -1)[period]  # each row's log-prob of its target
    del values
    old = current + 0.05 * torch.randn(N, generator=g)
    advantages = torch.randn(N // SEQ, generator=g).repeat_interleave(SEQ)
    seq_ids = torch.arange(N) // SEQ
    return logits, dict(targets=targets, old_logprobs=old, advantages=advantages, mask=mask, seq_ids=seq_ids)


def reference(logits, data, rows, options, grad=False):
    """The reference on ``rows`` (whole sequences) of the float32 logits: (per_token, logp, d(loss)/d(logits))."""
    x = logits[rows].float().requires_grad_(grad)
    loss, per_token, logp, _, _ = policy_loss_ref(x, **{k: t[rows] for k, t in data.items()}, **options)
    if grad:
        loss.backward()
    return per_token.detach(), logp.detach(), x.grad


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
def test_beyond_32_bit_indexing_matches_the_reference(batch, objective):
    logits, data = batch
    options = dict(objective=objective, loss_agg="token-mean", normalizer=float(N))
    if objective == "gspo":
        options.update(eps_low=0.002, eps_high=0.003)  # about half of the sequences clipped
    # The reference first (inplace_grad overwrites the logits): the outputs of the first and the last CHUNK rows
    # (the last 512 lie wholly past element 2**31), the gradient of the first and of the last two sequences.
    first, last = slice(0, CHUNK), slice(N - CHUNK, N)
    want = {(r.start, r.stop): reference(logits, data, r, options)[:2] for r in (first, last)}
    head, tail = slice(0, SEQ), slice(N - 2 * SEQ, N)
    wanted_grad = {(r.start, r.stop): reference(logits, data, r, options, grad=True)[2] for r in (head, tail)}
    x = logits.requires_grad_()
    out = policy_loss(x, **data, backend="cpu", inplace_grad=True, **options)
    # autograd.grad, not backward: accumulating into a leaf's .grad would copy the gradient out of the logits
    (grad,) = torch.autograd.grad(out.loss, x)
    assert grad.data_ptr() == x.data_ptr()  # in place: no second N x V buffer
    for (r0, r1), (per_token, logp) in want.items():
        torch.testing.assert_close(out.logprobs[r0:r1], logp, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.per_token_loss[r0:r1], per_token, rtol=0, atol=2e-5)
    assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(out.loss)
    for (r0, r1), want in wanted_grad.items():
        got = grad[r0:r1].float()
        bound = STORE_ROUNDING[torch.bfloat16] * want.abs().amax(1, keepdim=True) + 1e-7
        assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
        assert want.abs().amax() > 0
