"""What the logits path and the fused-linear path are both checked for against the float64 oracle:
the rounding bounds, the option sets that together cover every choice, the loss / log-prob / entropy /
metric comparison, the bad-input harness (the error names the argument), and the input draws the CPU suites
and the CUDA oracle tests share. Imported by the test
files beside it (pytest puts this folder on ``sys.path``: the test folders are not packages)."""

import re

import pytest
import torch
import torch.nn.functional as F

from dler_kernels import reference
from dler_kernels.dispatch import usable_backends

# TRITON_INTERPRET=1 (tests/conftest.py) makes "triton" usable here; "cpu" where dler_kernels._C is built.
BACKENDS = usable_backends("cpu")

# Relative error of one rounding to the storage dtype: half the spacing for round-to-nearest.
# Triton's interpreter (checked with triton 3.9) truncates float32 -> bfloat16 stores, even with
# fp_downcast_rounding="rtne", so there the bound is a full spacing; compiled Triton rounds to nearest.
STORE_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
INTERPRETER_STORE_ROUNDING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}

# Each test shape gets one of these, so that together the shapes cover every loss_agg and kl_type.
OPTION_SETS = [
    dict(loss_agg="token-mean", kl_type="k3", beta=0.05, clip_c=10.0, entropy_coef=0.0, temperature=1.0),
    dict(loss_agg="seq-mean-token-mean", kl_type="k1", beta=0.1, clip_c=None, entropy_coef=0.01, temperature=0.6),
    dict(loss_agg="seq-mean-token-sum", kl_type="k2", beta=0.2, clip_c=3.0, entropy_coef=-0.02, temperature=1.3),
    dict(loss_agg="seq-mean-token-sum-norm", kl_type="low_var_kl", beta=0.0, clip_c=2.0, entropy_coef=0.005,
         temperature=0.9, norm_length=64.0),
]  # fmt: skip

# Bounds that make both sides of each clip or mask act on the test draws (ratios e^(+-0.4 sigma); the default GSPO
# bounds of 3e-4 would clip every sequence, whose gradient is then 0).
OBJECTIVE_CASES = {
    "ppo_clip": {},
    "ppo_clip+opsm": dict(objective="ppo_clip", opsm_threshold=0.05),
    "gspo": dict(eps_low=0.05, eps_high=0.08),
    "gspo_token": dict(eps_low=0.05, eps_high=0.08),
    "cispo": {},
    "cispo-upper": dict(objective="cispo", cispo_clip="upper"),
    "sapo": {},
    "gmpo": dict(eps_low=0.2, eps_high=0.3),
    "dppo_tv": dict(eps_low=0.01, eps_high=0.02),
    "dppo_kl": dict(eps_low=0.002, eps_high=0.004),
    "vespo": {},
    "luspo": dict(eps_low=0.05, eps_high=0.08),
    "gspo+opsm": dict(objective="gspo", eps_low=0.05, eps_high=0.08, opsm_threshold=0.0),
}


def objective_options(case: str, base: dict) -> dict:
    """The loss options of objective case ``case`` (a key of OBJECTIVE_CASES) on top of ``base``."""
    opts = {"objective": case, **base, **OBJECTIVE_CASES[case]}
    if opts["objective"] != "ppo_clip":
        opts.pop("clip_c", None)  # PPO-clip's dual clip means nothing to another objective
    return opts


METRIC_KEYS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "num_tokens", "num_nonfinite")


def logits_inputs(n, v, dtype=torch.float32, seed=0, masked_frac=0.25, scale=3.0):
    """The logits path's inputs, drawn on the CPU: (tensors, extra)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        exact = reference.token_logprobs_ref(logits.double(), targets).float()
    old = exact + 0.4 * torch.randn(n, generator=g)  # ratios on both sides of the clip range
    ref_lp = exact + 0.3 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) >= masked_frac
    tensors = dict(logits=logits, targets=targets, old_logprobs=old, advantages=adv, mask=mask)
    return tensors, dict(ref_logprobs=ref_lp, seq_ids=torch.arange(n) // 3)


def linear_inputs(n, h, v, dtype=torch.float32, seed=0, masked_frac=0.25, with_bias=True):
    """The fused-linear path's inputs, drawn on the CPU: (tensors, extra)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(dtype)  # logits of scale ~2
    bias = (0.5 * torch.randn(v, generator=g)).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        exact = reference.token_logprobs_ref(F.linear(hidden, weight, bias).double(), targets).float()
    tensors = dict(
        hidden=hidden, weight=weight, targets=targets,
        old_logprobs=exact + 0.4 * torch.randn(n, generator=g),  # ratios on both sides of the clip range
        advantages=torch.randn(n, generator=g), mask=torch.rand(n, generator=g) >= masked_frac,
    )  # fmt: skip
    extra = dict(bias=bias, ref_logprobs=exact + 0.3 * torch.randn(n, generator=g), seq_ids=torch.arange(n) // 3)
    return tensors, extra


def mask_vocabulary(logits, targets, mask, seed=0, pad=3, frac=0.3):
    """-inf logits as a masked vocabulary gives them: (logits, targets, cut), ``cut`` [N, V] bool where the
    logits are -inf. The last ``pad`` columns of every row (a padded vocab) and about ``frac`` of the others
    (a logits processor), never a valid row's target; row 0 keeps its target alone (probability 1, entropy
    0), row 1 (of a wide vocab) keeps only its second half, a whole leading tile of -inf (its target moved
    to the last column before the padding), and every masked row is -inf throughout."""
    g = torch.Generator().manual_seed(seed)
    n, v = logits.shape
    targets = targets.clone()
    if n > 1 and v > 2 * pad:
        targets[1] = v - pad - 1
    cut = torch.rand(n, v, generator=g) < frac
    cut[:, max(v - pad, 1) :] = True
    if n > 1:
        cut[1, : v // 2] = True
    cut[0] = True
    cut[torch.arange(n), targets] = False
    cut[~mask] = True
    return logits.masked_fill(cut, float("-inf")), targets, cut


def masked_vocab_logits_inputs(n, v, dtype=torch.float32, seed=0):
    """``logits_inputs`` with a masked vocabulary (``mask_vocabulary``; row 0 valid): (tensors, extra, cut)."""
    tensors, extra = logits_inputs(n, v, dtype, seed=seed)
    tensors["mask"][0] = True
    logits, targets, cut = mask_vocabulary(tensors["logits"], tensors["targets"], tensors["mask"], seed=seed)
    with torch.no_grad():
        exact = reference.token_logprobs_ref(logits.double(), torch.where(tensors["mask"], targets, -1)).float()
    g = torch.Generator().manual_seed(seed + 1)
    tensors.update(logits=logits, targets=targets, old_logprobs=exact + 0.4 * torch.randn(n, generator=g))
    extra["ref_logprobs"] = exact + 0.3 * torch.randn(n, generator=g)
    return tensors, extra, cut


def masked_vocab_linear_inputs(n, h, v, dtype=torch.float32, seed=0, pad=3):
    """``linear_inputs`` whose ``bias`` masks the last ``pad`` vocab entries with -inf (a padded vocab) and no
    valid row's target: (tensors, extra, cut), ``cut`` [V] bool where the bias is -inf."""
    tensors, extra = linear_inputs(n, h, v, dtype, seed=seed, with_bias=True)
    cut = torch.zeros(v, dtype=torch.bool)
    cut[max(v - pad, 1) :] = True
    tensors["targets"] = torch.where(cut[tensors["targets"]], tensors["targets"] % max(v - pad, 1), tensors["targets"])
    extra["bias"] = extra["bias"].masked_fill(cut, float("-inf"))
    with torch.no_grad():
        logits = F.linear(tensors["hidden"], tensors["weight"], extra["bias"])
        exact = reference.token_logprobs_ref(logits.double(), torch.where(tensors["mask"], tensors["targets"], -1))
    g = torch.Generator().manual_seed(seed + 1)
    tensors["old_logprobs"] = exact.float() + 0.4 * torch.randn(n, generator=g)
    extra["ref_logprobs"] = exact.float() + 0.3 * torch.randn(n, generator=g)
    return tensors, extra, cut


def zero_probability_rows(logits, targets, mask):
    """Two ways a valid row gives its target probability 0, as (case, logits, first bad row): its target's
    logit alone is -inf, or every logit of the row is. The rows are valid (``mask``) ones."""
    rows = [int(i) for i in mask.nonzero()[:, 0]]
    first, second = rows[1], rows[-1]
    target_cut = logits.clone()
    target_cut[first, targets[first]] = float("-inf")
    target_cut[second, targets[second]] = float("-inf")
    all_cut = logits.clone()
    all_cut[second] = float("-inf")
    return [("target-minus-inf", target_cut, first), ("row-all-minus-inf", all_cut, second)]


def zero_probability_refused(row: int, what: str = "logits"):
    """A context in which the ValueError of a valid row whose target has probability 0 must be raised, naming
    ``what`` and ``row``."""
    return pytest.raises(ValueError, match=rf"^{re.escape(what)} of row {row} give its target \(token \d+\) "
                                           "probability 0")  # fmt: skip


def advantage_inputs(b=3000, seed=1):
    """compute_advantages' inputs, more than one tile of the kernel by default: (rewards, groups, correctness,
    token_counts)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (b,), generator=g).float() * 0.9 + 0.05 * torch.rand(b, generator=g)
    correct = (rewards > 0.5).float()
    groups = torch.randint(0, 400, (b,), generator=g) * 7 - 1000  # arbitrary, unsorted ids
    counts = torch.randint(0, 4000, (b,), generator=g)
    return rewards, groups, correct, counts


def logits_oracle(tensors, extra, opts):
    """The float64 reference on the CPU, from the same (already rounded) inputs: (loss, per_token, logp, entropy,
    metrics, d loss / d logits)."""
    x = tensors["logits"].double().requires_grad_(True)
    loss, per_token, logp, ent, metrics = reference.policy_loss_ref(
        x, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(), tensors["mask"],
        ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), per_token, logp, ent, metrics, x.grad


def store_rounding(dtype: torch.dtype, backend: str, on_cuda: bool) -> float:
    """The relative error of one store in ``dtype`` by ``backend`` (the interpreter truncates)."""
    interpreted = backend == "triton" and not on_cuda
    return (INTERPRETER_STORE_ROUNDING if interpreted else STORE_ROUNDING)[dtype]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the Frobenius norm, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_loss_terms(out, loss64, per_token64, logp64, entropy64, metrics64, mask, extra, opts) -> None:
    """The forward outputs against the float64 oracle: loss rel <= 1e-5 of the same aggregation of
    |per-token loss| (the loss is a sum of signed terms whose float32 rounding scales with sum |term|;
    a near-cancelling batch makes |loss| itself tiny), log-prob abs <= 1e-5, entropy <= 1e-5 of its
    scale, and the clip metrics exactly (to 1e-6)."""
    assert torch.isfinite(out.loss)
    weights = opts.get("token_weights")
    scale = reference.aggregate_ref(
        per_token64.abs() * (1.0 if weights is None else weights.double()),
        mask, opts.get("loss_agg", "token-mean"), seq_ids=extra["seq_ids"],
        normalizer=opts.get("normalizer"), norm_length=opts.get("norm_length"),
    ).item()  # fmt: skip
    assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(scale, 1e-12)
    assert (out.logprobs.double() - logp64).abs().max() <= 1e-5
    assert (out.entropy.double() - entropy64).abs().max() <= 1e-5 * max(1.0, entropy64.abs().max().item())
    for key in METRIC_KEYS:
        assert out.metrics[key].item() == pytest.approx(metrics64[key].item(), abs=1e-6), key


def assert_bad_input_named(call, args: dict, mutate, name: str, message: str) -> None:
    """``call(**args)`` after ``mutate(args)`` raises a ValueError that names ``name`` and says ``message``."""
    mutate(args)
    with pytest.raises(ValueError, match=name) as info:
        call(**args)
    assert message in str(info.value)
