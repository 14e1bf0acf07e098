r"""Fused Triton kernel of the logits path: policy loss, log-probs, entropy, KL and d(loss)/d(logits).

One program per token row. Sweep 1 reads the row once in tiles of ``BLOCK_V`` and carries the
online softmax statistics (running max ``m``, :math:`s = \sum e^{z-m}`, :math:`t = \sum e^{z-m} z`),
from which :math:`\mathrm{lse} = m + \log s`, the target log-prob and the entropy
:math:`H = \mathrm{lse} - t / s` follow. The per-token loss and its derivatives w.r.t. the
log-prob (``g``) and the entropy (``-entropy_coef``) are scalars; sweep 2 writes the gradient

.. math::
    \frac{\partial L}{\partial \text{logits}_j} = \frac{w}{T}\Big[g\,(\delta_{j,y} - p_j)
        - \eta\, p_j (\log p_j + H)\Big]

(in place over the logits when asked), where ``w`` is the token's weight in the aggregation.
The backward pass only multiplies the stored gradient by the incoming scalar. All arithmetic is
float32 whatever the logits dtype. Masked rows are never read; their gradient row is zero.

The aggregation weights ``w`` (``loss_agg``, ``normalizer``) are computed by torch on [N]
vectors before the launch, so the kernel does not depend on N: no recompilation per batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._launch import KernelLaunch, is_compiled, launch_device, rows_aligned

KL_CODES = ref.KL_CODES


def block_v(rows: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels over the rows of ``rows`` [N, W], launched on ``device``.

    Compiled for a GPU: tiles of at most 4096 columns, 16 values per thread with 8 warps, read 16
    bytes at a time when every row starts 16-byte aligned. Rows that do not (an odd V) are read one
    element at a time, each with its own 64-bit address: tiles of 2048 columns keep those in
    registers (4096 spills on sm_100: dler_kernels.aot_check). In the interpreter larger tiles mean
    fewer Python iterations."""
    width = rows.shape[1]
    if is_compiled(device):
        cap = 4096 if rows_aligned(rows) else 2048
    else:
        cap = 16384
    block = min(triton.next_power_of_2(max(width, 16)), cap)
    return block, 8 if block >= 2048 else 4


@triton.jit
def _row_softmax_stats(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    """(max, sum exp(z - max), sum exp(z - max) * z) of z = row * inv_temp, in float32. A -inf logit adds 0 to
    both sums (p log p = 0 at p = 0); a row of only -inf gives (-inf, 0, 0)."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Shifted by 0 while every logit so far is -inf: -inf - -inf would be NaN (s = t = 0 then anyway)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.where(in_row, tl.exp(z - shift), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        # -inf logits and padded lanes: 0 * 0, not 0 * -inf (a NaN z is kept: e is NaN there)
        t = t * scale + tl.sum(e * tl.where(z > float("-inf"), z, 0.0), axis=0)
        m = m_new
    return m, s, t


@triton.jit
def _grad_tile(z_ptr, grad_ptr, cols, in_row, target, lse, entropy, dlogp, dent, inv_temp):
    r"""Writes d(loss)/d(logits) for the columns ``cols`` of one row:
    :math:`\frac{1}{T}[a(\delta_{j,y} - p_j) - c\,p_j(\log p_j + H)]` with ``a = dlogp`` (the
    derivative of the aggregated loss w.r.t. the row's log-prob) and ``c = dent`` (w.r.t. its entropy);
    exactly 0 for a -inf logit (p log p = 0 at p = 0), where the formula would meet 0 * -inf."""
    z = tl.load(z_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temp
    logp_j = z - lse
    p = tl.exp(logp_j)
    grad = -p * (dlogp + dent * (logp_j + entropy))
    grad = tl.where(cols == target, grad + dlogp, grad) * inv_temp
    grad = tl.where(z == float("-inf"), 0.0, grad)
    tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _policy_loss_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    targets_ptr,
    valid_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    weight_ptr,
    logp_out,
    entropy_out,
    loss_out,
    kl_out,
    lse_out,
    dlogp_out,
    dent_out,
    V,
    inv_temp,
    eps_low,
    eps_high,
    clip_c,
    beta,
    entropy_coef,
    ratio_cap,
    tau_pos,
    tau_neg,
    OBJECTIVE: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_TYPE: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    STORE_ROW_STATE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    offs = tl.arange(0, BLOCK_V)
    valid = tl.load(valid_ptr + row) != 0
    if valid:
        target = tl.load(targets_ptr + row).to(tl.int64)
        z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
        m, s, t = _row_softmax_stats(row_ptr, V, inv_temp, BLOCK_V)
        lse = m + tl.log(s)
        # s = 0 only when every logit is -inf: no distribution, the target's probability is 0 (log-prob -inf,
        # which the public ops refuse), entropy 0 and, from _grad_tile, gradient 0; as the C++/CUDA kernels
        no_mass = s == 0.0
        logp = tl.where(no_mass, float("-inf"), z_target - lse)
        entropy = tl.where(no_mass, 0.0, lse - t / s)
        tl.store(logp_out + row, logp)
        tl.store(entropy_out + row, entropy)
        if COMPUTE_LOSS:
            old = tl.load(old_ptr + row).to(tl.float32)
            adv = tl.load(adv_ptr + row).to(tl.float32)
            # Importance ratio with the log-ratio clamped to +-20 (no gradient outside).
            d = logp - old
            ratio = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
            dratio = tl.where((d >= -20.0) & (d <= 20.0), ratio, 0.0)
            # The objective (Objective.kernel_code; its formula: its file in dler_kernels/objectives/, as the C++
            # objective_terms in csrc/policy_loss_math.h): the per-token loss and its derivative g w.r.t. logp.
            if OBJECTIVE == 1:  # CISPO: -sg(clip(r)) A log pi
                w = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
                loss = -w * adv * logp
                g = -w * adv
            elif OBJECTIVE == 2:  # SAPO: -A (4 / tau) sigmoid(tau (r - 1))
                tau = tl.where(adv > 0.0, tau_pos, tau_neg)
                sig = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
                loss = -adv * (4.0 / tau) * sig
                g = -4.0 * adv * sig * (1.0 - sig) * dratio
            elif OBJECTIVE == 3 or OBJECTIVE == 4:  # DPPO: -A sg(min(r, C)) log pi on the kept tokens
                prob = tl.exp(logp)
                old_prob = tl.exp(old)
                if OBJECTIVE == 3:  # total variation
                    moved = prob - old_prob
                    keep = tl.where(adv > 0.0, moved <= eps_high, moved >= -eps_low)
                else:  # binary KL (objectives/dppo.py BINARY_KL_EPS = 1e-8)
                    bkl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log(
                        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
                    )
                    keep = tl.where(adv > 0.0, (bkl <= eps_high) | (prob <= old_prob),
                                    (bkl <= eps_low) | (prob >= old_prob))  # fmt: skip
                w = tl.where(ratio > ratio_cap, ratio_cap, ratio)  # NaN stays NaN, as torch.clamp
                m = tl.where(keep, 1.0, 0.0)  # a factor, as in the reference: NaN * 0 stays NaN
                loss = -adv * w * logp * m
                g = -adv * w * m
            else:  # PPO-clip
                pg_unclipped = -adv * ratio
                pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
                pg = tl.maximum(pg_unclipped, pg_clipped)
                # Inside the clip range both branches are equal and share the gradient -A; outside it the
                # clipped branch wins only when it is constant.
                dpg = tl.where(pg_unclipped >= pg_clipped, -adv, 0.0)
                if HAS_DUAL:
                    dual = (adv < 0.0) & (pg > -clip_c * adv)
                    pg = tl.where(dual, -clip_c * adv, pg)
                    dpg = tl.where(dual, 0.0, dpg)
                g = dpg * dratio
                loss = pg
            if KL_TYPE != 0:
                ref_lp = tl.load(ref_ptr + row).to(tl.float32)
                if KL_TYPE == 1:
                    kl = logp - ref_lp
                    dkl = 1.0
                elif KL_TYPE == 2:
                    kl = 0.5 * (logp - ref_lp) * (logp - ref_lp)
                    dkl = logp - ref_lp
                else:
                    dd = ref_lp - logp
                    ddc = tl.minimum(tl.maximum(dd, -20.0), 20.0)
                    e = tl.exp(ddc)
                    kl_raw = e - ddc - 1.0
                    kl = tl.minimum(tl.maximum(kl_raw, -10.0), 10.0)
                    inside = (dd >= -20.0) & (dd <= 20.0) & (kl_raw >= -10.0) & (kl_raw <= 10.0)
                    dkl = tl.where(inside, 1.0 - e, 0.0)
                    if KL_TYPE == 4:  # k3 times the importance ratio: d(kl r) = dkl r + kl dr
                        dkl = dkl * ratio + kl * dratio
                        kl = kl * ratio
                tl.store(kl_out + row, kl)
                loss += beta * kl
                g += beta * dkl
            loss -= entropy_coef * entropy
            tl.store(loss_out + row, loss)
            w = tl.load(weight_ptr + row).to(tl.float32)
            dlogp = g * w
            dent = -entropy_coef * w
            if STORE_ROW_STATE:  # what a later pass over other logits of this row needs (fused-linear path)
                tl.store(lse_out + row, lse)
                tl.store(dlogp_out + row, dlogp)
                tl.store(dent_out + row, dent)
            if WRITE_GRAD:
                grad_row = grad_ptr + row * grad_stride
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    _grad_tile(row_ptr, grad_row, cols, cols < V, target, lse, entropy, dlogp, dent, inv_temp)
    else:
        tl.store(logp_out + row, 0.0)
        tl.store(entropy_out + row, 0.0)
        if COMPUTE_LOSS:
            tl.store(loss_out + row, 0.0)
            if KL_TYPE != 0:
                tl.store(kl_out + row, 0.0)
            if STORE_ROW_STATE:
                tl.store(lse_out + row, 0.0)
                tl.store(dlogp_out + row, 0.0)
                tl.store(dent_out + row, 0.0)
            if WRITE_GRAD:
                grad_row = grad_ptr + row * grad_stride
                zero = tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    tl.store(grad_row + cols, zero, mask=cols < V)


def row_launch(
    logits,
    targets,
    valid,
    *,
    old=None,
    adv=None,
    ref_lp=None,
    weights=None,
    grad=None,
    temperature=1.0,
    objective_code=0,
    eps_low=0.2,
    eps_high=0.28,
    clip_c=None,
    ratio_cap=20.0,
    tau_pos=1.0,
    tau_neg=1.05,
    beta=0.0,
    kl_type=None,
    entropy_coef=0.0,
    compute_loss=False,
    row_state=None,
    device=None,
):
    """The launch of the row kernel over the rows of ``logits`` (None when there are no rows) and its
    outputs ``(logp, entropy, loss, kl or None)``, allocated here, configured for ``device`` (default:
    ``launch_device(logits)``). ``row_state`` (compute_loss only): three float32 [N] buffers that
    receive each row's log-sum-exp, d(loss)/d(log-prob) and d(loss)/d(entropy)."""
    n, vocab = logits.shape
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp, entropy = torch.empty(n, **f32), torch.empty(n, **f32)
    loss = torch.empty(n, **f32) if compute_loss else logp
    kl_code = KL_CODES[kl_type] if compute_loss and beta != 0.0 else 0
    kl = torch.empty(n, **f32) if kl_code else logp
    dummy = logp  # pointer arguments the constexpr flags make the kernel ignore
    outputs = logp, entropy, loss, (kl if kl_code else None)
    if n == 0:
        return None, outputs
    device = launch_device(logits) if device is None else torch.device(device)
    block, num_warps = block_v(logits, device)
    args = (
        logits, logits.stride(0),
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        targets, valid.to(torch.int8),
        old if old is not None else dummy, adv if adv is not None else dummy,
        ref_lp if ref_lp is not None else dummy, weights if weights is not None else dummy,
        logp, entropy, loss, kl, *(row_state if row_state is not None else (dummy, dummy, dummy)),
        vocab, 1.0 / temperature, eps_low, eps_high, clip_c if clip_c is not None else 0.0, beta, entropy_coef,
        ratio_cap, tau_pos, tau_neg,
    )  # fmt: skip
    constexprs = dict(
        OBJECTIVE=objective_code, HAS_DUAL=clip_c is not None, KL_TYPE=kl_code, COMPUTE_LOSS=compute_loss,
        WRITE_GRAD=grad is not None,
        STORE_ROW_STATE=row_state is not None, BLOCK_V=block,
    )  # fmt: skip
    launch = KernelLaunch(_policy_loss_kernel, (n,), args, constexprs, num_warps, device, "rows")
    return launch, outputs


def launch_rows(logits, targets, valid, **options):
    """Runs the row kernel (``row_launch``'s arguments); returns ``(logp, entropy, loss, kl or None)``."""
    launch, outputs = row_launch(logits, targets, valid, **options)
    if launch is not None:
        launch.run()
    return outputs


@triton.jit
def _slab_grad_kernel(
    z_ptr,
    z_stride,
    targets_ptr,
    valid_ptr,
    lse_ptr,
    entropy_ptr,
    dlogp_ptr,
    dent_ptr,
    col0,
    W,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    """Overwrites a [N, W] slab of logits (vocab columns col0 .. col0 + W) with their gradient, from
    the per-row state an earlier full-vocab pass stored. Masked rows are not read; they get 0."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * z_stride
    offs = tl.arange(0, BLOCK_V)
    if tl.load(valid_ptr + row) != 0:
        target = tl.load(targets_ptr + row).to(tl.int64) - col0
        lse = tl.load(lse_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        dlogp = tl.load(dlogp_ptr + row)
        dent = tl.load(dent_ptr + row)
        for start in range(0, W, BLOCK_V):
            cols = start + offs
            _grad_tile(row_ptr, row_ptr, cols, cols < W, target, lse, entropy, dlogp, dent, inv_temp)
    else:
        zero = tl.zeros((BLOCK_V,), tl.float32).to(z_ptr.dtype.element_ty)
        for start in range(0, W, BLOCK_V):
            cols = start + offs
            tl.store(row_ptr + cols, zero, mask=cols < W)


def slab_launch(slab, targets, valid_i8, lse, entropy, dlogp, dent, col0, temperature, device=None):
    """The launch of the slab kernel over ``slab`` [N, W] (None when it is empty), configured for
    ``device`` (default: ``launch_device(slab)``)."""
    n, width = slab.shape
    if n == 0 or width == 0:
        return None
    device = launch_device(slab) if device is None else torch.device(device)
    block, num_warps = block_v(slab, device)
    args = (slab, slab.stride(0), targets, valid_i8, lse, entropy, dlogp, dent, col0, width, 1.0 / temperature)
    return KernelLaunch(_slab_grad_kernel, (n,), args, dict(BLOCK_V=block), num_warps, device, "slab")


def slab_grad_(slab, targets, valid_i8, lse, entropy, dlogp, dent, col0, temperature):
    """In place: ``slab`` [N, W] (logits of vocab columns col0 ..) becomes d(loss)/d(those logits)."""
    launch = slab_launch(slab, targets, valid_i8, lse, entropy, dlogp, dent, col0, temperature)
    if launch is not None:
        launch.run()
    return slab


def triton_token_logprobs(logits, targets, temperature=1.0):
    """(logprobs, entropy) in float32; rows whose target is negative get 0 for both."""
    valid = targets >= 0
    logp, entropy, _, _ = launch_rows(logits, torch.where(valid, targets, 0), valid, temperature=temperature)
    return logp, entropy
