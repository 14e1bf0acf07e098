r"""Fused-linear path: the policy loss (and log-probs) from hidden states and the LM head weight,
without ever holding the [N, V] logits.

Semantics: exactly ``policy_loss(hidden @ weight.T + bias, ...)`` (``reference.linear_policy_loss_ref``).

How (one design for every backend; only the per-slab arithmetic differs):

* **Row pass.** The tokens are cut into chunks of ``chunk_size`` rows. For each chunk the logits
  ``Z_c = X_c W^T (+ b)`` are one tensor-core matmul (cuBLAS through ``torch.mm``) into a reusable
  buffer; the fused row kernel of the logits path reads each row, computes the log-prob, entropy,
  KL and the per-token loss, and overwrites ``Z_c`` with ``dZ_c = d(loss)/d(Z_c)``. Then
  ``dX_c = dZ_c W`` is one matmul over the whole vocabulary (float32 accumulation inside the matmul,
  one rounding to the output dtype), and ``db += colsum(dZ_c)`` in float32.
* **Weight gradient.** ``dW = dZ^T X`` sums over all N tokens. For float32/float64 weights it is
  accumulated chunk by chunk straight into the float32 output (``addmm_``): no extra memory.
  For bf16/fp16 weights accumulating chunk by chunk would round the running sum to 16 bits once per
  chunk, and a float32 accumulator would cost ``4 V H`` bytes (0.9 GB at V=151936, H=1536, more
  than the logits budget). So the row pass also stores three floats per row (log-sum-exp,
  d(loss)/d(log-prob), d(loss)/d(entropy)) and a **vocab pass** recomputes the logits of ``Vs``
  vocab columns for all N rows, turns them into their gradient from that row state
  (``slab_grad_``), and writes ``dW[v0:v1] = dZ_s^T X`` with one matmul over all N tokens: float32
  accumulation, one rounding, the same as autograd through ``F.linear``. This costs one more
  matmul (4 instead of 3); a frozen weight (``requires_grad=False``) skips it.

Memory bound: besides inputs, outputs, gradients and O(N) float32 vectors, one buffer of
``chunk_size * V`` elements in the hidden dtype, reused by both passes (the vocab pass uses
``Vs = chunk_size * V // N`` columns, rounded down to a multiple of 8 so that every slice is 16-byte
aligned: ``slab_columns``). The default ``chunk_size`` keeps it at
``DEFAULT_SLAB_ELEMENTS = 2**26`` (128 MiB in bf16; 2.7% of the bf16 logits at N=16384, V=151936).
The plain-torch backend holds about four float32 copies of a chunk: its default is
``TORCH_SLAB_ELEMENTS = 2**20`` elements per chunk.
No [N, V] tensor exists at any point.

The whole gradient is computed in the forward call when autograd will need it (as in the logits
path); backward only scales the stored gradients by the incoming one.

Backends (``dler_kernels._backend``): ``triton`` runs the row and slab arithmetic in the Triton
kernels, ``cpu`` / ``cuda`` in the kernels of the extension ``dler_kernels._C`` (the same
row sweep as the logits path, and ``slab_grad_``), ``reference`` in plain torch (the reference's
per-token formulas, differentiated by autograd on one chunk at a time); all with the same chunking
and the same memory bound.
"""

from __future__ import annotations

import torch

from . import _ext
from . import reference as ref
from ._backend import backend_for
from ._validate import check_number, check_targets, check_tensor
from .policy_loss import PolicyLossOutput, _check_loss_options, _token_logprobs, scale_stored_grads

DEFAULT_SLAB_ELEMENTS = 1 << 26
# The plain-torch backend holds about four float32 copies of a chunk (the buffer, log-probs,
# probabilities, one temporary) and runs faster on chunks that stay in a CPU's cache: 2**20
# (bench/bench_linear_policy_loss.py on the CPU, 2026-11-21: 16 rows beat 128 at V=32000).
TORCH_SLAB_ELEMENTS = 1 << 20


def _check_linear(hidden, weight, bias, chunk_size) -> tuple[int, int]:
    check_tensor("hidden", hidden, ndim=2, kind="float")
    check_tensor("weight", weight, ndim=2, kind="float")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on {hidden.device} like hidden, got {weight.device}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[1]} (the last dimension of hidden), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (the vocab size V), got shape (0, H)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, kind="float")
        if bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise ValueError(
                f"bias must be {hidden.dtype} on {hidden.device} like hidden, got {bias.dtype} on {bias.device}"
            )
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have {weight.shape[0]} entries (one per vocab row of weight), got {bias.shape[0]}"
            )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return hidden.shape[0], weight.shape[0]


def rows_per_chunk(n: int, vocab: int, chunk_size: int | None, backend: str) -> int:
    if chunk_size is None:
        # On a CPU a chunk that stays in cache is faster (the C++ kernels too: see TORCH_SLAB_ELEMENTS).
        budget = TORCH_SLAB_ELEMENTS if backend in ("reference", "cpu") else DEFAULT_SLAB_ELEMENTS
        chunk_size = max(16, budget // vocab // 16 * 16)
    return max(1, min(chunk_size, n))


# Vocab slices start and are as wide as a multiple of this many columns: 16 bytes of bf16/fp16 (32 of
# fp32), so every slice's rows start 16-byte aligned and the slab kernel reads and writes them 128 bits
# at a time (4006 columns, as N=16384, V=151936 gave unrounded, are read one element at a time).
SLAB_ALIGN_COLUMNS = 8


def slab_columns(n: int, vocab: int, rows: int) -> int:
    """Columns per vocab slice of the vocab pass: as many as fit the ``rows * vocab`` chunk buffer over
    all ``n`` rows, rounded down to a multiple of SLAB_ALIGN_COLUMNS (unless fewer than that fit: then
    the unrounded count, which keeps the memory bound)."""
    cols = rows * vocab // max(n, 1)
    if cols >= SLAB_ALIGN_COLUMNS:
        cols -= cols % SLAB_ALIGN_COLUMNS
    return max(1, min(vocab, cols))


class _Slabs:
    """One flat buffer, viewed as the logits of a row chunk [rows, V] or of a vocab slice [N, cols]."""

    def __init__(self, hidden, weight, bias, rows):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.rows = rows
        self.cols = slab_columns(self.n, self.vocab, rows)
        numel = max(rows * self.vocab, self.n * self.cols)
        self.buffer = torch.empty(numel, dtype=hidden.dtype, device=hidden.device)

    def row_chunks(self):
        for r0 in range(0, self.n, self.rows):
            r1 = min(r0 + self.rows, self.n)
            z = self.buffer[: (r1 - r0) * self.vocab].view(r1 - r0, self.vocab)
            x = self.hidden[r0:r1]
            if self.bias is None:
                torch.mm(x, self.weight.t(), out=z)
            else:
                torch.addmm(self.bias, x, self.weight.t(), out=z)
            yield r0, r1, z

    def vocab_slices(self):
        for v0 in range(0, self.vocab, self.cols):
            v1 = min(v0 + self.cols, self.vocab)
            z = self.buffer[: self.n * (v1 - v0)].view(self.n, v1 - v0)
            w = self.weight[v0:v1]
            if self.bias is None:
                torch.mm(self.hidden, w.t(), out=z)
            else:
                torch.addmm(self.bias[v0:v1], self.hidden, w.t(), out=z)
            yield v0, v1, z


# ---------------------------------------------------------------- per-slab arithmetic, two backends


def _torch_rows(z, targets, valid, old, adv, ref_lp, weights, opts, want_grad, want_state):
    """Plain torch on one row chunk, the arithmetic of the Triton row kernel: log-softmax statistics,
    then the reference's per-token loss on the [rows] vectors (log-prob, entropy), differentiated by
    autograd there, then the gradient formula of ``_grad_tile`` over the chunk. Returns
    (per_token, logp, entropy, kl, row_state or None); overwrites z with dZ when want_grad.
    Working memory: two float32 copies of the chunk and one temporary."""
    opts = dict(opts)
    temperature = opts.pop("temperature")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    logp_all = z.to(dtype, copy=True).masked_fill_(~valid.unsqueeze(-1), 0.0).mul_(1.0 / temperature)
    lse = torch.logsumexp(logp_all, dim=-1)
    logp_all.sub_(lse.unsqueeze(-1))
    p = torch.exp(logp_all)
    tgt = torch.where(valid, targets, 0).unsqueeze(-1)
    logp = torch.where(valid, logp_all.gather(1, tgt).squeeze(1), 0.0)
    entropy = torch.where(valid, -(p * logp_all).sum(-1), 0.0)
    with torch.enable_grad():
        lp, ent = logp.requires_grad_(want_grad), entropy.requires_grad_(want_grad)
        per_token, kl = ref.per_token_loss_from_logprobs(lp, ent, old, adv, valid, ref_logprobs=ref_lp, **opts)
        if want_grad:
            loss = (per_token * weights.to(dtype)).sum()
            dlogp, dent = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    if not want_grad:
        return detach(per_token), detach(logp), detach(entropy), detach(kl), None
    _write_grad_(z, logp_all, p, targets, valid, entropy.detach(), dlogp, dent, 0, temperature)
    state = (lse, dlogp, dent) if want_state else None
    return detach(per_token), detach(logp), detach(entropy), detach(kl), state


def _write_grad_(z, logp_all, p, targets, valid, entropy, dlogp, dent, col0, temperature):
    """z <- d(loss)/d(z) for the vocab columns col0 .. col0 + width of each row, the formula of the
    Triton ``_grad_tile``: [dlogp (onehot - p) - dent p (log p + H)] / T. ``logp_all`` (log p) and
    ``p`` (float32 [rows, width]) are used up as the buffers it is built in; masked rows get 0."""
    logp_all.add_(entropy.unsqueeze(-1)).mul_(p).mul_(dent.unsqueeze(-1))
    p.mul_(dlogp.unsqueeze(-1)).add_(logp_all).neg_()
    local = targets - col0
    hit = valid & (local >= 0) & (local < z.shape[1])
    p[hit, local[hit]] += dlogp[hit]
    p.mul_(1.0 / temperature).masked_fill_(~valid.unsqueeze(-1), 0.0)
    z.copy_(p)


def _torch_slab_grad_(z, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
    """Plain torch version of ``triton_policy_loss.slab_grad_``: z (logits of the vocab columns
    col0 ..) becomes their gradient, from the row state of the row pass."""
    logp_all = z.to(lse.dtype, copy=True).mul_(1.0 / temperature).sub_(lse.unsqueeze(-1))
    _write_grad_(z, logp_all, torch.exp(logp_all), targets, valid, entropy, dlogp, dent, col0, temperature)


def _ext_rows(z, targets, valid, old, adv, ref_lp, weights, opts, want_grad, want_state):
    args = _ext.loss_args(targets, valid, old, adv, ref_lp, weights, **opts)
    per_token, logp, entropy, kl, state = _ext.rows_(z, args, want_grad)
    return per_token, logp, entropy, kl, state if want_state else None


def _triton_rows(z, targets, valid, old, adv, ref_lp, weights, opts, want_grad, want_state):
    from .triton_policy_loss import launch_rows

    n = z.shape[0]
    state = tuple(torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3)) if want_state else None
    logp, entropy, per_token, kl = launch_rows(
        z, torch.where(valid, targets, 0), valid, old=old, adv=adv, ref_lp=ref_lp, weights=weights,
        grad=z if want_grad else None, compute_loss=True, row_state=state, **opts,
    )  # fmt: skip
    return per_token, logp, entropy, kl, state


# ---------------------------------------------------------------- the two passes


def fused_linear(hidden, weight, bias, targets, valid, old, adv, ref_lp, weights, opts, *, rows, backend,
                  need_dx, need_dw, need_db):  # fmt: skip
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    per_token = torch.zeros(n, dtype=f32, device=dev)
    logp = torch.zeros(n, dtype=f32, device=dev)
    entropy = torch.zeros(n, dtype=f32, device=dev)
    kl = torch.zeros(n, dtype=f32, device=dev) if opts["beta"] != 0.0 else None
    want_grad = need_dx or need_dw or need_db
    direct_dw = need_dw and weight.dtype in (torch.float32, torch.float64)
    vocab_pass = need_dw and not direct_dw
    dx = torch.empty_like(hidden) if need_dx else None
    dw = torch.zeros_like(weight) if direct_dw else (torch.empty_like(weight) if need_dw else None)
    db = torch.zeros(vocab, dtype=f32, device=dev) if need_db else None
    state = tuple(torch.zeros(n, dtype=f32, device=dev) for _ in range(3)) if vocab_pass else None
    row_op = {"triton": _triton_rows, "cpu": _ext_rows, "cuda": _ext_rows}.get(backend, _torch_rows)
    slabs = _Slabs(hidden, weight, bias, rows)

    for r0, r1, z in slabs.row_chunks():
        sl = slice(r0, r1)
        pt, lp, ent, k, st = row_op(
            z, targets[sl], valid[sl], old[sl], adv[sl], None if ref_lp is None else ref_lp[sl], weights[sl],
            opts, want_grad, vocab_pass,
        )  # fmt: skip
        per_token[sl], logp[sl], entropy[sl] = pt, lp, ent
        if kl is not None:
            kl[sl] = k
        if st is not None:
            for full, part in zip(state, st):
                full[sl] = part
        if not want_grad:
            continue
        _chunk_grads_(z, sl, hidden, weight, dx, dw if direct_dw else None, db)  # z now holds dZ for these rows

    if vocab_pass:
        _weight_grad_by_vocab_slices(slabs, dw, targets, valid, *state, entropy, opts["temperature"], backend)
    return per_token, logp, entropy, kl, dx, dw, (db.to(weight.dtype) if db is not None else None)


def _chunk_grads_(dz, rows, hidden, weight, dx, dw_direct, db):
    """From dZ of one row chunk: dX[rows] = dZ W, dW += dZ^T X[rows] (float32/float64 weights, accumulated
    in place; bf16/fp16 ones go through the vocab pass), db += colsum(dZ) in float32 (None: not needed)."""
    if dx is not None:
        torch.mm(dz, weight, out=dx[rows])
    if dw_direct is not None:
        dw_direct.addmm_(dz.t(), hidden[rows])
    if db is not None:
        db += dz.sum(0, dtype=db.dtype)


def _slab_grad_(backend, z, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
    """z (logits of vocab columns col0 .. of some rows) <- their gradient, from those rows' state."""
    if backend == "triton":
        from .triton_policy_loss import slab_grad_

        slab_grad_(z, targets, valid.to(torch.int8), lse, entropy, dlogp, dent, col0, temperature)
    elif backend in ("cpu", "cuda"):
        _ext.slab_grad_(z, targets, valid, lse, entropy, dlogp, dent, col0, temperature)
    else:
        _torch_slab_grad_(z, targets, valid, lse, entropy, dlogp, dent, col0, temperature)


def _weight_grad_by_vocab_slices(slabs, dw, targets, valid, lse, dlogp, dent, entropy, temperature, backend):
    """The vocab pass: dW[v0:v1] = dZ[:, v0:v1]^T X, one matmul over all N rows per slice (float32
    accumulation and one rounding, for bf16/fp16 weights)."""
    for v0, v1, z in slabs.vocab_slices():
        _slab_grad_(backend, z, targets, valid, lse, entropy, dlogp, dent, v0, temperature)
        torch.mm(z.t(), slabs.hidden, out=dw[v0:v1])


class _LinearPolicyLoss(torch.autograd.Function):
    """Forward runs both passes (gradients included when autograd needs them); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, old, adv, ref_lp, weights, opts, rows, backend, needs):
        per_token, logp, entropy, kl, dx, dw, db = fused_linear(
            hidden, weight, bias, targets, valid, old, adv, ref_lp, weights, opts, rows=rows, backend=backend,
            need_dx=needs[0], need_dw=needs[1], need_db=needs[2],
        )  # fmt: skip
        loss = (per_token * weights.to(per_token.dtype)).sum()
        ctx.save_for_backward(dx, dw, db)
        ctx.mark_non_differentiable(per_token, logp, entropy, *([kl] if kl is not None else []))
        return loss, per_token, logp, entropy, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return (*scale_stored_grads(grad_loss, *ctx.saved_tensors), *([None] * 10))


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = 10.0,
    beta: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    normalizer: float | None = None,
    norm_length: float | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> PolicyLossOutput:
    """``policy_loss(hidden @ weight.T + bias, targets, ...)`` without the [N, V] logits.

    ``hidden`` [N, H]; ``weight`` [V, H] (``lm_head.weight``, tied embeddings included) and ``bias``
    [V] in the dtype of ``hidden``; every other argument as in ``policy_loss``, under the same input
    rules (its docstring: data arguments that require grad, a mask other than 0/1, non-finite data on
    valid rows are ValueErrors on every backend). ``loss`` is
    differentiable w.r.t. hidden, weight and bias only (gradients accumulated in float32, returned in
    their dtype). ``chunk_size``: rows per chunk; the only working buffer holds ``chunk_size * V``
    elements (default: ``2**26 // V`` rows on the Triton backend, ``2**20 // V``, at least 16, on
    plain torch). Rows whose mask is false need finite hidden states
    (as with ``F.linear``, their zero gradient still meets their hidden state in dW). ``backend``:
    ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see ``dler_kernels._backend``).
    """
    n, vocab = _check_linear(hidden, weight, bias, chunk_size)
    dev = hidden.device
    valid = _check_loss_options(
        n, vocab, dev, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, seq_ids=seq_ids,
        eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, beta=beta, kl_type=kl_type, entropy_coef=entropy_coef,
        temperature=temperature, loss_agg=loss_agg, normalizer=normalizer, norm_length=norm_length,
        token_weights=token_weights, what="hidden",
    )  # fmt: skip
    backend = backend_for(hidden, backend)
    weights = ref.aggregation_weights(
        valid, loss_agg, seq_ids, normalizer, norm_length, ref._compute_dtype(hidden), token_weights
    )
    opts = dict(eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, beta=beta, kl_type=kl_type,
                entropy_coef=entropy_coef, temperature=temperature)  # fmt: skip
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, per_token, logp, entropy, kl = _LinearPolicyLoss.apply(
        hidden, weight, bias, targets.contiguous(), valid.contiguous(), old_logprobs.contiguous(),
        advantages.contiguous(), ref_logprobs.contiguous() if beta != 0.0 else None, weights, opts,
        rows_per_chunk(n, vocab, chunk_size, backend), backend, needs,
    )  # fmt: skip
    with torch.no_grad():
        metrics = ref.policy_metrics_ref(
            logp, old_logprobs, advantages, entropy, valid, eps_low, eps_high, clip_c, kl, per_token
        )
    if hidden.dtype == torch.float64:
        return PolicyLossOutput(loss, per_token, logp, entropy, metrics)
    return PolicyLossOutput(loss.float(), per_token.float(), logp.float(), entropy.float(), metrics)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Log-probs and entropies from hidden states; backward recomputes the logits chunk by chunk (the
    incoming d/d(log-prob) and d/d(entropy) of each row are exactly the row state of the slab kernels)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, backend):
        f32 = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        valid = targets >= 0
        safe = torch.where(valid, targets, 0)
        logp = torch.zeros(n, dtype=f32, device=hidden.device)
        entropy = torch.zeros(n, dtype=f32, device=hidden.device)
        lse = torch.zeros(n, dtype=f32, device=hidden.device)
        for r0, r1, z in _Slabs(hidden, weight, bias, rows).row_chunks():
            lp, ent = _token_logprobs(z, targets[r0:r1], temperature, True, backend)
            logp[r0:r1], entropy[r0:r1] = lp, ent
            # log-sum-exp of z / T from the kernel's own log-prob: lse = z[target] / T - logp (exact up to one
            # float32 rounding of |lse|, ~1e-7 relative in the probabilities of the backward).
            z_target = z.gather(1, safe[r0:r1, None])[:, 0].to(f32) * (1.0 / temperature)
            lse[r0:r1] = torch.where(valid[r0:r1], z_target - lp.to(f32), 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.opts = (temperature, rows, backend)
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        temperature, rows, backend = ctx.opts
        f32 = lse.dtype
        dlogp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(f32).contiguous()
        dent = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.to(f32).contiguous()
        dx, dw, db = logprobs_grads(
            hidden, weight, bias, targets, valid, lse, entropy, dlogp, dent, temperature, rows, backend,
            ctx.needs_input_grad[:3],
        )  # fmt: skip
        return dx, dw, db, None, None, None, None


def logprobs_grads(hidden, weight, bias, targets, valid, lse, entropy, dlogp, dent, temperature, rows, backend, needs):
    """(dX, dW, db) of the log-probs and entropies (incoming gradients ``dlogp``, ``dent``), each None
    unless ``needs`` (three bools) asks for it: the logits recomputed chunk by chunk, turned into their
    gradient by the slab kernel from the saved row statistics."""
    need_dx, need_dw, need_db = needs
    direct_dw = need_dw and weight.dtype in (torch.float32, torch.float64)
    dx = torch.empty_like(hidden) if need_dx else None
    dw = torch.zeros_like(weight) if direct_dw else (torch.empty_like(weight) if need_dw else None)
    db = torch.zeros(weight.shape[0], dtype=lse.dtype, device=hidden.device) if need_db else None
    slabs = _Slabs(hidden, weight, bias, rows)
    if need_dx or direct_dw or need_db:
        for r0, r1, z in slabs.row_chunks():
            sl = slice(r0, r1)
            _slab_grad_(backend, z, targets[sl], valid[sl], lse[sl], entropy[sl], dlogp[sl], dent[sl], 0,
                        temperature)  # fmt: skip
            _chunk_grads_(z, sl, hidden, weight, dx, dw if direct_dw else None, db)
    if need_dw and not direct_dw:
        _weight_grad_by_vocab_slices(slabs, dw, targets, valid, lse, dlogp, dent, entropy, temperature, backend)
    return dx, dw, (db.to(weight.dtype) if db is not None else None)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without the [N, V] logits.

    A negative target marks a padding row (log-prob and entropy 0). Returns float32 ``logprobs``
    [N], or ``(logprobs, entropy)`` with ``return_entropy``. Memory: one ``chunk_size * V`` buffer.
    Differentiable w.r.t. hidden, weight and bias when autograd needs it (both outputs): the backward
    recomputes the logits chunk by chunk from O(N) saved row statistics (verl's and Liger's fused
    log-prob + entropy op); without gradient nothing is saved.
    """
    n, vocab = _check_linear(hidden, weight, bias, chunk_size)
    check_tensor("targets", targets, ndim=1, kind="int", device=hidden.device, length=n, like="hidden")
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_targets(targets, targets >= 0, vocab, what="weight")
    backend = backend_for(hidden, backend)
    rows = rows_per_chunk(n, vocab, chunk_size, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        logp, entropy = _LinearTokenLogprobs.apply(hidden, weight, bias, targets, temperature, rows, backend)
        if hidden.dtype != torch.float64:
            logp, entropy = logp.float(), entropy.float()
        return (logp, entropy) if return_entropy else logp
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device) if return_entropy else None
    with torch.no_grad():
        for r0, r1, z in _Slabs(hidden, weight, bias, rows).row_chunks():
            lp, ent = _token_logprobs(z, targets[r0:r1], temperature, return_entropy, backend)
            logp[r0:r1] = lp
            if return_entropy:
                entropy[r0:r1] = ent
    return (logp, entropy) if return_entropy else logp
