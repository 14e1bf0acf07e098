r"""Fused-linear path: the policy loss (and log-probs) from hidden states and the LM head weight,
without ever holding the [N, V] logits.

Semantics: exactly ``policy_loss(hidden @ weight.T + bias, ...)`` (``reference.linear_policy_loss_ref``),
-inf logits included: a -inf in ``bias`` masks that vocabulary entry (probability 0, gradient 0 to its
row of ``weight`` and its ``bias``), and a valid row whose target it masks is a ValueError.

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
aligned: ``slab_columns``). The default ``chunk_size`` keeps it at the backend's ``chunk_elements``
(``backend.DEFAULT_SLAB_ELEMENTS = 2**26`` on a GPU: 128 MiB in bf16, 2.7% of the bf16 logits at
N=16384, V=151936; ``TORCH_SLAB_ELEMENTS = 2**20`` on a CPU and for the plain-torch backend, which
holds about four float32 copies of a chunk).
No [N, V] tensor exists at any point.

**fp32 LM head** (``fp32_head=True``, for bf16/fp16 inputs): the logits, and so dZ, are float32,
computed from float32 copies of the inputs (``reference.linear_logits_ref(..., fp32_head=True)``): the
hidden states of one row chunk at a time (all N once, for the vocab pass), the weight (and bias) one
tile of ``weight_rows`` vocab rows at a time, never the whole [V, H] weight. The buffer is float32
(twice the bytes at the same ``chunk_size``; the default chunk is at least ``UPCAST_MIN_ROWS`` = 256
rows, which amortise the weight's upcast); the extra memory is one float32 weight tile (a quarter
of the buffer's elements, at least 8 vocab rows), a float32 [rows, H] accumulator of dX and, with a weight gradient,
a float32 copy of hidden [N, H]. Every backend's row and slab kernels take float32 logits, so every
backend supports it. dX, dW, db are float32 sums rounded once to the parameters' own dtypes. The
weight is upcast twice per row chunk (logits, dX) and once per vocab slice: bandwidth, small next to
the float32 matmuls themselves (no tensor cores on a GPU unless TF32 is allowed).

The whole gradient is computed in the forward call when autograd will need it (as in the logits
path); backward only scales the stored gradients by the incoming one.

The per-slab arithmetic is the chosen backend's (``backend.Backend.rows`` and ``slab_grad_``;
``dler_kernels.dispatch``): ``triton`` runs it in the Triton kernels, ``cpu`` / ``cuda`` in the kernels
of the extension ``dler_kernels._C`` (the same row sweep as the logits path, and ``slab_grad_``),
``reference`` in plain torch (the reference's per-token formulas, differentiated by autograd on one
chunk at a time); all with the same chunking and the same memory bound; this module holds the chunking,
the matmuls and the autograd functions.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .backend import Backend
from .dispatch import select_backend
from .loss_inputs import LossOptions, TokenData, check_token_data, loss_options, with_loss_options
from .objective_path import objective_loss, objective_terms, row_statistics
from .policy_loss import PolicyLossOutput, loss_metrics
from .stored_grad import StoredGradFunction, tracing
from .validate import check_number, check_target_probability, check_targets, check_tensor, token_ids


def _check_linear(hidden, weight, bias, chunk_size, fp32_head) -> tuple[int, int]:
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
    if not isinstance(fp32_head, bool):
        raise ValueError(f"fp32_head must be a bool (compute the logits in float32), got {fp32_head!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return hidden.shape[0], weight.shape[0]


# How the errors of this path name the logits it never holds (a -inf there comes from the bias).
LINEAR_LOGITS = "logits (hidden @ weight.T + bias)"


# The least default chunk of an upcast (fp32 head on bf16/fp16): each chunk upcasts the whole weight twice
# (tile by tile), which short chunks do not amortise. CPU, N=1024, H=512, V=32000, bf16, fwd+bwd: 62 s at
# 32 rows (the CPU default), 10.3 s at 128, 3.5 s at 256, 2.6 s at 1024 (bf16 head, default chunk: 2.5 s).
UPCAST_MIN_ROWS = 256


def rows_per_chunk(n: int, vocab: int, chunk_size: int | None, backend: Backend, upcast: bool = False) -> int:
    if chunk_size is None:
        chunk_size = max(16, backend.chunk_elements // vocab // 16 * 16)
        if upcast:
            chunk_size = max(chunk_size, UPCAST_MIN_ROWS)
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


def logits_dtype(hidden: torch.Tensor, fp32_head: bool) -> torch.dtype:
    """The dtype the logits are computed and kept in: the inputs', or with ``fp32_head`` at least float32."""
    return torch.promote_types(hidden.dtype, torch.float32) if fp32_head else hidden.dtype


class _Slabs:
    """One flat buffer, viewed as the logits of a row chunk [rows, V] or of a vocab slice [N, cols], and
    the matmuls of both passes.

    With logits in a wider dtype than the inputs (``fp32_head`` on bf16/fp16) the buffer is float32 and
    every matmul runs in float32 on upcast copies: the hidden states of one row chunk (or, for the vocab
    pass, all N once), and the weight ``weight_rows`` vocab rows at a time, never the whole [V, H] weight
    (4 V H bytes: 0.9 GB at V=151936, H=1536). Otherwise each matmul is one ``torch.mm`` on the inputs."""

    def __init__(self, hidden, weight, bias, rows, dtype=None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.rows = rows
        self.cols = slab_columns(self.n, self.vocab, rows)
        self.dtype = dtype = hidden.dtype if dtype is None else dtype
        self.upcast = dtype != hidden.dtype
        numel = max(rows * self.vocab, self.n * self.cols)
        self.buffer = torch.empty(numel, dtype=dtype, device=hidden.device)
        # An upcast weight tile holds a quarter of the buffer's elements (at least 8 vocab rows).
        self.weight_rows = max(SLAB_ALIGN_COLUMNS, numel // (4 * hidden.shape[1]))
        self._wide_hidden = None

    def _weight_tiles(self, v0, v1):
        """(t0, t1, weight[t0:t1], bias[t0:t1] or None) in the logits dtype: [v0, v1) in one piece, or in
        upcast tiles of ``weight_rows`` rows."""
        step = self.weight_rows if self.upcast else v1 - v0
        for t0 in range(v0, v1, step):
            t1 = min(t0 + step, v1)
            w = self.weight[t0:t1].to(self.dtype)
            b = self.bias[t0:t1].to(self.dtype) if self.bias is not None else None
            yield t0, t1, w, b

    def _logits_(self, x, v0, z):
        """z <- x @ weight[v0 : v0 + z.shape[1]]^T (+ bias), x in the logits dtype."""
        for t0, t1, w, b in self._weight_tiles(v0, v0 + z.shape[1]):
            out = z[:, t0 - v0 : t1 - v0]
            if b is None:
                torch.mm(x, w.t(), out=out)
            else:
                torch.addmm(b, x, w.t(), out=out)

    def _all_hidden(self):
        """All N hidden states in the logits dtype (one upcast copy, made once, when needed)."""
        if not self.upcast:
            return self.hidden
        if self._wide_hidden is None:
            self._wide_hidden = self.hidden.to(self.dtype)
        return self._wide_hidden

    def row_chunks(self):
        for r0 in range(0, self.n, self.rows):
            r1 = min(r0 + self.rows, self.n)
            z = self.buffer[: (r1 - r0) * self.vocab].view(r1 - r0, self.vocab)
            self._logits_(self.hidden[r0:r1].to(self.dtype), 0, z)
            yield r0, r1, z

    def vocab_slices(self):
        x = self._all_hidden()
        for v0 in range(0, self.vocab, self.cols):
            v1 = min(v0 + self.cols, self.vocab)
            z = self.buffer[: self.n * (v1 - v0)].view(self.n, v1 - v0)
            self._logits_(x, v0, z)
            yield v0, v1, z

    def hidden_grad_(self, dz, rows, dx):
        """dx[rows] = dZ W for the row chunk ``rows`` (float32 accumulation inside the matmul or across the
        upcast tiles, one rounding to dx's dtype)."""
        if not self.upcast:
            torch.mm(dz, self.weight, out=dx[rows])
            return
        acc = torch.zeros(dz.shape[0], self.weight.shape[1], dtype=self.dtype, device=dz.device)
        for t0, t1, w, _ in self._weight_tiles(0, self.vocab):
            acc.addmm_(dz[:, t0:t1], w)
        dx[rows] = acc

    def weight_grad_(self, dz, v0, dw):
        """dw[v0 : v0 + width] = dZ^T X over all N rows for the vocab slice ``dz`` [N, width] (float32
        accumulation, one rounding to dw's dtype; upcast: one weight tile's rows at a time)."""
        if not self.upcast:
            torch.mm(dz.t(), self.hidden, out=dw[v0 : v0 + dz.shape[1]])
            return
        x = self._all_hidden()
        for t0 in range(0, dz.shape[1], self.weight_rows):
            t1 = min(t0 + self.weight_rows, dz.shape[1])
            dw[v0 + t0 : v0 + t1] = torch.mm(dz[:, t0:t1].t(), x)


# ---------------------------------------------------------------- the two passes


def fused_linear(hidden, weight, bias, data: TokenData, weights, options: LossOptions, *, rows, backend: Backend,
                 need_dx, need_dw, need_db, fp32_head=False):  # fmt: skip
    """Both passes over checked inputs: (per_token, logp, entropy, kl or None, dX, dW, db), each gradient
    None unless asked for. ``weights``: the aggregation weights of the tokens."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = ref.accumulation_dtype(hidden)
    per_token = torch.zeros(n, dtype=f32, device=dev)
    logp = torch.zeros(n, dtype=f32, device=dev)
    entropy = torch.zeros(n, dtype=f32, device=dev)
    kl = torch.zeros(n, dtype=f32, device=dev) if options.beta != 0.0 else None
    want_grad = need_dx or need_dw or need_db
    direct_dw = need_dw and weight.dtype in (torch.float32, torch.float64)
    vocab_pass = need_dw and not direct_dw
    dx = torch.empty_like(hidden) if need_dx else None
    dw = torch.zeros_like(weight) if direct_dw else (torch.empty_like(weight) if need_dw else None)
    db = torch.zeros(vocab, dtype=f32, device=dev) if need_db else None
    state = tuple(torch.zeros(n, dtype=f32, device=dev) for _ in range(3)) if vocab_pass else None
    slabs = _Slabs(hidden, weight, bias, rows, logits_dtype(hidden, fp32_head))

    for r0, r1, z in slabs.row_chunks():
        sl = slice(r0, r1)
        pt, lp, ent, k, st = backend.rows(z, data.rows(sl), weights[sl], options, want_grad, vocab_pass)
        per_token[sl], logp[sl], entropy[sl] = pt, lp, ent
        if kl is not None:
            kl[sl] = k
        if st is not None:
            for full, part in zip(state, st):
                full[sl] = part
        if not want_grad:
            continue
        _chunk_grads_(z, sl, slabs, dx, dw if direct_dw else None, db)  # z now holds dZ for these rows

    if vocab_pass:
        _weight_grad_by_vocab_slices(slabs, dw, data.targets, data.valid, *state, entropy, options.temperature,
                                     backend)  # fmt: skip
    return per_token, logp, entropy, kl, dx, dw, (db.to(weight.dtype) if db is not None else None)


def _chunk_grads_(dz, rows, slabs, dx, dw_direct, db):
    """From dZ of one row chunk: dX[rows] = dZ W, dW += dZ^T X[rows] (float32/float64 weights, accumulated
    in place; bf16/fp16 ones go through the vocab pass), db += colsum(dZ) in float32 (None: not needed)."""
    if dx is not None:
        slabs.hidden_grad_(dz, rows, dx)
    if dw_direct is not None:
        dw_direct.addmm_(dz.t(), slabs.hidden[rows])
    if db is not None:
        db += dz.sum(0, dtype=db.dtype)


def _weight_grad_by_vocab_slices(slabs, dw, targets, valid, lse, dlogp, dent, entropy, temperature, backend):
    """The vocab pass: dW[v0:v1] = dZ[:, v0:v1]^T X, one matmul over all N rows per slice (float32
    accumulation and one rounding, for bf16/fp16 weights)."""
    for v0, _, z in slabs.vocab_slices():
        backend.slab_grad_(z, targets, valid, lse, entropy, dlogp, dent, v0, temperature)
        slabs.weight_grad_(z, v0, dw)


def objective_linear(hidden, weight, bias, data: TokenData, weights, options: LossOptions, *, rows, backend: Backend,
                     need_dx, need_dw, need_db, fp32_head=False):  # fmt: skip
    """``fused_linear``'s outputs for an objective without a fused kernel (``objective_path``): a row pass for the
    log-probs, entropies and log-sum-exps, the objective on those [N] vectors, then the gradients of the log-probs
    (``logprobs_grads``: the logits recomputed once more, one extra LM-head matmul)."""
    n = hidden.shape[0]
    f32 = ref.accumulation_dtype(hidden)
    logp, entropy, lse = (torch.zeros(n, dtype=f32, device=hidden.device) for _ in range(3))
    with torch.no_grad():
        for r0, r1, z in _Slabs(hidden, weight, bias, rows, logits_dtype(hidden, fp32_head)).row_chunks():
            sl = slice(r0, r1)
            logp[sl], entropy[sl], lse[sl] = row_statistics(
                backend, z, data.targets[sl], data.valid[sl], options.temperature, f32
            )
    want_grad = need_dx or need_dw or need_db
    per_token, kl, dlogp, dent = objective_terms(logp, entropy, data, options, weights, want_grad)
    dx = dw = db = None
    if want_grad:
        targets = torch.where(data.valid, data.targets, 0)
        dx, dw, db = logprobs_grads(
            hidden, weight, bias, targets, data.valid, lse, entropy, dlogp.contiguous(), dent.contiguous(),
            options.temperature, rows, backend, (need_dx, need_dw, need_db), fp32_head,
        )  # fmt: skip
    return per_token, logp, entropy, kl, dx, dw, db


class _LinearPolicyLoss(StoredGradFunction):
    """Forward runs both passes (gradients included when autograd needs them); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, data, weights, options, rows, backend, needs, fp32_head):
        run = fused_linear if options.fused else objective_linear
        per_token, logp, entropy, kl, dx, dw, db = run(
            hidden, weight, bias, data, weights, options, rows=rows, backend=backend,
            need_dx=needs[0], need_dw=needs[1], need_db=needs[2], fp32_head=fp32_head,
        )  # fmt: skip
        loss = (per_token * weights.to(per_token.dtype)).sum()
        ctx.save_for_backward(dx, dw, db)
        ctx.mark_non_differentiable(per_token, logp, entropy, *([kl] if kl is not None else []))
        return loss, per_token, logp, entropy, kl


@with_loss_options
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
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    fp32_head: bool = False,
    **options,
) -> PolicyLossOutput:
    """``policy_loss(hidden @ weight.T + bias, targets, ...)`` without the [N, V] logits.

    ``hidden`` [N, H]; ``weight`` [V, H] (``lm_head.weight``, tied embeddings included) and ``bias``
    [V] in the dtype of ``hidden``; every other argument and the loss ``options`` as in ``policy_loss``
    (an objective without a fused kernel recomputes the logits once more, ``objective_linear``), under the same input
    rules (its docstring: data arguments that require grad, a mask other than 0/1, non-finite data on
    valid rows, a valid row whose target has probability 0 (a -inf logit, from ``bias``) are ValueErrors on
    every backend). ``loss`` is
    differentiable w.r.t. hidden, weight and bias only (gradients accumulated in float32, returned in
    their dtype). ``chunk_size``: rows per chunk; the only working buffer holds ``chunk_size * V``
    elements (default: ``2**26 // V`` rows on the Triton backend, ``2**20 // V``, at least 16, on
    plain torch). Rows whose mask is false need finite hidden states
    (as with ``F.linear``, their zero gradient still meets their hidden state in dW). ``backend``:
    ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see ``dler_kernels.dispatch``).
    ``fp32_head``: an fp32 LM head for bf16/fp16 inputs: the logits (and dZ) in float32 from upcast tiles
    of hidden, weight and bias (``reference.linear_logits_ref(..., fp32_head=True)``), on every backend;
    the buffer is then float32 (twice the bytes; default chunk at least 256 rows), plus one float32 weight
    tile of a quarter of its elements and, with a weight gradient, a float32 copy of hidden. Gradients
    keep their dtypes.
    No effect on float32/float64 inputs.
    """
    n, vocab = _check_linear(hidden, weight, bias, chunk_size, fp32_head)
    options = loss_options(options)
    data = check_token_data(
        n, vocab, hidden.device, targets, old_logprobs, advantages, mask, options, ref_logprobs=ref_logprobs,
        seq_ids=seq_ids, token_weights=token_weights, what="hidden",
    )  # fmt: skip
    chosen = select_backend(hidden, backend)
    weights = data.aggregation_weights(options, ref.accumulation_dtype(hidden))
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    rows = rows_per_chunk(n, vocab, chunk_size, chosen, logits_dtype(hidden, fp32_head) != hidden.dtype)
    if any(needs) and tracing(hidden) and not (options.fused and chosen.name != "reference"):
        # torch.compile: the differentiable log-probs and the objective under autograd (objective_path.objective_loss)
        logp, entropy = _LinearTokenLogprobs.apply(hidden, weight, bias, torch.where(data.valid, data.targets, -1),
                                                   options.temperature, rows, chosen, fp32_head)  # fmt: skip
        loss, per_token, logp, entropy, kl = objective_loss(logp, entropy, data, options, weights)
    else:
        loss, per_token, logp, entropy, kl = _LinearPolicyLoss.apply(
            hidden, weight, bias, data.contiguous(), weights, options, rows, chosen, needs, fp32_head
        )
    check_target_probability(logp, data.valid, data.targets, LINEAR_LOGITS)
    metrics = loss_metrics(logp, entropy, data, options, kl, per_token)
    if hidden.dtype == torch.float64:
        return PolicyLossOutput(loss, per_token, logp, entropy, metrics)
    return PolicyLossOutput(loss.float(), per_token.float(), logp.float(), entropy.float(), metrics)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Log-probs and entropies from hidden states; backward recomputes the logits chunk by chunk (the
    incoming d/d(log-prob) and d/d(entropy) of each row are exactly the row state of the slab kernels)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, backend, fp32_head):
        f32 = ref.accumulation_dtype(hidden)
        n = hidden.shape[0]
        valid = targets >= 0
        safe = torch.where(valid, targets, 0)
        logp = torch.zeros(n, dtype=f32, device=hidden.device)
        entropy = torch.zeros(n, dtype=f32, device=hidden.device)
        lse = torch.zeros(n, dtype=f32, device=hidden.device)
        for r0, r1, z in _Slabs(hidden, weight, bias, rows, logits_dtype(hidden, fp32_head)).row_chunks():
            lp, ent = backend.token_logprobs(z, targets[r0:r1], temperature, True)
            logp[r0:r1], entropy[r0:r1] = lp, ent
            # log-sum-exp of z / T from the kernel's own log-prob: lse = z[target] / T - logp (exact up to one
            # float32 rounding of |lse|, ~1e-7 relative in the probabilities of the backward).
            z_target = z.gather(1, safe[r0:r1, None])[:, 0].to(f32) * (1.0 / temperature)
            lse[r0:r1] = torch.where(valid[r0:r1], z_target - lp.to(f32), 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.opts = (temperature, rows, backend, fp32_head)
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        temperature, rows, backend, fp32_head = ctx.opts
        f32 = lse.dtype
        dlogp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(f32).contiguous()
        dent = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.to(f32).contiguous()
        dx, dw, db = logprobs_grads(
            hidden, weight, bias, targets, valid, lse, entropy, dlogp, dent, temperature, rows, backend,
            ctx.needs_input_grad[:3], fp32_head,
        )  # fmt: skip
        return dx, dw, db, None, None, None, None, None


def logprobs_grads(hidden, weight, bias, targets, valid, lse, entropy, dlogp, dent, temperature, rows, backend, needs,
                   fp32_head=False):  # fmt: skip
    """(dX, dW, db) of the log-probs and entropies (incoming gradients ``dlogp``, ``dent``), each None
    unless ``needs`` (three bools) asks for it: the logits recomputed chunk by chunk (in float32 with
    ``fp32_head``), turned into their gradient by the slab kernel from the saved row statistics."""
    need_dx, need_dw, need_db = needs
    direct_dw = need_dw and weight.dtype in (torch.float32, torch.float64)
    dx = torch.empty_like(hidden) if need_dx else None
    dw = torch.zeros_like(weight) if direct_dw else (torch.empty_like(weight) if need_dw else None)
    db = torch.zeros(weight.shape[0], dtype=lse.dtype, device=hidden.device) if need_db else None
    slabs = _Slabs(hidden, weight, bias, rows, logits_dtype(hidden, fp32_head))
    if need_dx or direct_dw or need_db:
        for r0, r1, z in slabs.row_chunks():
            sl = slice(r0, r1)
            backend.slab_grad_(z, targets[sl], valid[sl], lse[sl], entropy[sl], dlogp[sl], dent[sl], 0, temperature)
            _chunk_grads_(z, sl, slabs, dx, dw if direct_dw else None, db)
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
    fp32_head: bool = False,
):
    """``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without the [N, V] logits.

    A negative target marks a padding row (log-prob and entropy 0); a valid row whose target has probability 0
    (a -inf logit, from ``bias``) is a ValueError, as in ``token_logprobs``. Returns float32 ``logprobs``
    [N], or ``(logprobs, entropy)`` with ``return_entropy``. Memory: one ``chunk_size * V`` buffer.
    Differentiable w.r.t. hidden, weight and bias when autograd needs it (both outputs): the backward
    recomputes the logits chunk by chunk from O(N) saved row statistics (verl's and Liger's fused
    log-prob + entropy op); without gradient nothing is saved. ``fp32_head``: the logits in float32 from
    upcast tiles of bf16/fp16 inputs, as in ``linear_policy_loss``.
    """
    n, vocab = _check_linear(hidden, weight, bias, chunk_size, fp32_head)
    check_tensor("targets", targets, ndim=1, kind="int", device=hidden.device, length=n, like="hidden")
    targets = token_ids(targets)
    check_number("temperature", temperature, low=0.0, low_open=True)
    valid = targets >= 0
    check_targets(targets, valid, vocab, what="weight")
    chosen = select_backend(hidden, backend)
    rows = rows_per_chunk(n, vocab, chunk_size, chosen, logits_dtype(hidden, fp32_head) != hidden.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        logp, entropy = _LinearTokenLogprobs.apply(hidden, weight, bias, targets, temperature, rows, chosen, fp32_head)
        check_target_probability(logp, valid, targets, LINEAR_LOGITS)
        if hidden.dtype != torch.float64:
            logp, entropy = logp.float(), entropy.float()
        return (logp, entropy) if return_entropy else logp
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device) if return_entropy else None
    with torch.no_grad():
        for r0, r1, z in _Slabs(hidden, weight, bias, rows, logits_dtype(hidden, fp32_head)).row_chunks():
            lp, ent = chosen.token_logprobs(z, targets[r0:r1], temperature, return_entropy)
            logp[r0:r1] = lp
            if return_entropy:
                entropy[r0:r1] = ent
    check_target_probability(logp, valid, targets, LINEAR_LOGITS)
    return (logp, entropy) if return_entropy else logp
