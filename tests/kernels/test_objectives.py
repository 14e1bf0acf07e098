"""Every objective (``dler_kernels.objectives``) on every backend and both paths against float64 autograd of the
reference, which differentiates the objective's one definition through the logits. The fused backends run every
objective but PPO-clip in two passes (``dler_kernels.objective_path``), so these tests check that path too; verl's
own functions are the peer check (tests/integrations/test_verl.py).

Tolerances are those of the PPO-clip kernel tests (oracle_checks.py, test_policy_loss.py): loss rel <= 1e-5 of the
aggregated |per-token loss|, log-prob abs <= 1e-5, gradient rel <= 1e-4 in float32 arithmetic; a bf16 gradient is
also rounded once to bf16 (the bound per element adds that rounding).
"""

import pytest
import torch
from oracle_checks import OBJECTIVE_CASES as CASES
from oracle_checks import (
    OPTION_SETS,
    check_loss_terms,
    linear_inputs,
    logits_inputs,
    logits_oracle,
    masked_vocab_logits_inputs,
    rel,
    store_rounding,
)
from oracle_checks import objective_options as options

from dler_kernels import linear_policy_loss, policy_loss, reference
from dler_kernels.objectives import OBJECTIVES


def test_every_objective_has_a_case():
    assert set(OBJECTIVES) <= {CASES[c].get("objective", c) for c in CASES}


def oracle_logits(tensors, extra, **opts):
    return logits_oracle(tensors, extra, opts)


def run_logits(tensors, extra, **opts):
    x = tensors["logits"].clone().requires_grad_(True)
    out = policy_loss(**{**tensors, "logits": x}, **extra, **opts)
    out.loss.backward()
    return out, x.grad


def check_grad(grad, grad64, dtype, backend):
    if dtype == torch.float32:
        assert rel(grad, grad64) <= 1e-4
    else:
        bound = store_rounding(dtype, backend, False) * grad64.abs() + 1e-4 * grad64.abs().max()
        assert bool(((grad.double() - grad64).abs() <= bound).all()), rel(grad, grad64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_path_matches_float64(backend, case, dtype):
    index = sorted(CASES).index(case)
    opts = options(case, OPTION_SETS[index % len(OPTION_SETS)])  # every loss_agg, KL and temperature
    tensors, extra = logits_inputs(24, 37, dtype, seed=100 + index)
    extra["seq_ids"] = torch.arange(24) // 5  # sequences of 5 tokens (and a last one of 4)
    out, grad = run_logits(tensors, extra, **opts)
    loss64, pt64, lp64, ent64, m64, grad64 = oracle_logits(tensors, extra, **opts)
    check_loss_terms(out, loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    assert grad64.abs().max() > 1e-3  # the objective moves these logits
    check_grad(grad, grad64, dtype, backend)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_linear_path_matches_float64(backend, case):
    index = sorted(CASES).index(case)
    opts = options(case, OPTION_SETS[(index + 1) % len(OPTION_SETS)])
    tensors, extra = linear_inputs(20, 16, 45, seed=200 + index)
    extra["seq_ids"] = torch.arange(20) // 4
    h = tensors["hidden"].clone().requires_grad_(True)
    w = tensors["weight"].clone().requires_grad_(True)
    b = extra["bias"].clone().requires_grad_(True)
    out = linear_policy_loss(**{**tensors, "hidden": h, "weight": w}, **{**extra, "bias": b}, chunk_size=7, **opts)
    out.loss.backward()
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (tensors["hidden"], tensors["weight"], extra["bias"]))
    loss64, pt64, lp64, ent64, m64 = reference.linear_policy_loss_ref(
        h64, w64, tensors["targets"], tensors["old_logprobs"].double(), tensors["advantages"].double(),
        tensors["mask"], bias=b64, ref_logprobs=extra["ref_logprobs"].double(), seq_ids=extra["seq_ids"], **opts,
    )  # fmt: skip
    loss64.backward()
    check_loss_terms(out, loss64.detach(), pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert want.abs().max() > 1e-4
        assert rel(got, want) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_edge_cases(backend, case):
    """Poisoned masked rows (nan logits, target -100, nan old log-prob and advantage), a sequence with no valid
    token, one-token sequences and |log r| > 20: finite, equal to the clean run on the valid rows, and the
    float64 oracle's gradient."""
    opts = options(case, dict(loss_agg="seq-mean-token-mean"))
    tensors, extra = logits_inputs(16, 29, seed=7, masked_frac=0.0)
    extra["seq_ids"] = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 4, 4, 4, 4, 5, 5, 6, 7])  # 2, 3 and 7: one token each
    mask = torch.ones(16, dtype=torch.bool)
    mask[3:6] = False  # sequence 1 has no valid token
    mask[9] = False
    tensors["mask"] = mask
    tensors["old_logprobs"][0] += 25.0  # log r < -20 and > 20: the clamps act
    tensors["old_logprobs"][12] -= 25.0
    clean, clean_grad = run_logits(tensors, extra, **opts)
    poisoned = {k: v.clone() for k, v in tensors.items()}
    poisoned["logits"][~mask] = float("nan")
    poisoned["targets"][~mask] = -100
    poisoned["old_logprobs"][~mask] = float("nan")
    poisoned["advantages"][~mask] = float("nan")
    out, grad = run_logits(poisoned, extra, **opts)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-6, abs=1e-12)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], clean_grad[mask])
    *_, grad64 = oracle_logits(tensors, extra, **opts)
    assert rel(clean_grad, grad64) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_masked_vocabulary_matches_float64_and_its_minus_inf_logits_get_no_gradient(backend, case):
    """-inf logits (a padded vocab, a logits processor) on the two-pass path: the log-prob kernel gives them
    probability 0 and the gradient kernel exactly 0."""
    opts = options(case, dict(loss_agg="seq-mean-token-mean", entropy_coef=0.01))
    tensors, extra, cut = masked_vocab_logits_inputs(20, 41, seed=31)
    extra["seq_ids"] = torch.arange(20) // 4
    out, grad = run_logits(tensors, extra, **opts)
    loss64, pt64, lp64, ent64, m64, grad64 = oracle_logits(tensors, extra, **opts)
    check_loss_terms(out, loss64, pt64, lp64, ent64, m64, tensors["mask"], extra, opts)
    assert torch.isfinite(grad).all() and torch.equal(grad[cut], torch.zeros_like(grad[cut]))
    assert rel(grad, grad64.nan_to_num()) <= 1e-4


@pytest.mark.parametrize("case", ["gspo", "vespo", "sapo"])
def test_inplace_gradient_equals_out_of_place(backend, case):
    opts = options(case, dict(loss_agg="seq-mean-token-mean", entropy_coef=0.01))
    tensors, extra = logits_inputs(12, 40, seed=5)
    out, grad = run_logits(tensors, extra, **opts)
    buffer = tensors["logits"].clone()
    out_ip = policy_loss(**{**tensors, "logits": buffer}, **extra, inplace_grad=True, **opts)
    assert out_ip.loss.item() == out.loss.item()
    assert torch.equal(buffer, grad)


def test_gspo_sequence_and_token_forms_share_their_gradient():
    """The GSPO paper's remark: with one advantage per sequence and a per-sequence mean, GSPO and GSPO-token have
    the same gradient (and the same loss)."""
    tensors, extra = logits_inputs(18, 23, torch.float64, seed=11)
    seq = torch.arange(18) // 6
    tensors["advantages"] = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)[seq]
    extra["seq_ids"] = seq
    opts = dict(loss_agg="seq-mean-token-mean", eps_low=0.05, eps_high=0.08)
    seq_form, grad_seq = run_logits(tensors, extra, objective="gspo", **opts)
    tok_form, grad_tok = run_logits(tensors, extra, objective="gspo_token", **opts)
    assert seq_form.loss.item() == pytest.approx(tok_form.loss.item(), rel=1e-6)
    assert grad_seq.abs().max() > 1e-3 and rel(grad_seq, grad_tok) <= 1e-10


def test_sapo_is_ppos_gradient_at_ratio_one():
    """At r = 1 SAPO's gate has slope 1 in r: d loss / d log pi = -A, PPO's, whatever tau."""
    logp = torch.log(torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    valid = torch.ones(3, dtype=torch.bool)
    entropy = torch.zeros(3, dtype=torch.float64)
    per_token, _ = reference.per_token_loss_from_logprobs(
        logp, entropy, logp.detach(), adv, valid, objective="sapo", tau_pos=3.0, tau_neg=0.5
    )
    per_token.sum().backward()
    torch.testing.assert_close(logp.grad, -adv)


@pytest.mark.parametrize(
    "opts, message",
    [
        (dict(objective="gpso"), r"objective must be one of .*got 'gpso' \(did you mean 'gspo'\?\)"),
        (dict(objective="sapo", eps_low=0.1), "eps_low=0.1 means nothing for objective='sapo'"),
        (dict(objective="gspo", clip_c=3.0), "clip_c=3.0 means nothing for objective='gspo'"),
        (dict(objective="cispo", cispo_clip="lower"), "cispo_clip must be one of 'both', 'upper'"),
        (dict(objective="sapo", tau_pos=0.0), "tau_pos must be > 0.0"),
        (dict(objective="gspo", eps_hihg=0.1), r"unknown loss option 'eps_hihg' \(did you mean 'eps_high'\?\)"),
    ],
)
def test_bad_objective_options_are_named(opts, message):
    tensors, extra = logits_inputs(4, 5, seed=0)
    with pytest.raises(ValueError, match=message):
        policy_loss(**tensors, **extra, **opts)


@pytest.mark.parametrize("objective", ["gspo", "gmpo", "vespo", "luspo"])
def test_a_sequence_level_objective_needs_seq_ids(objective):
    tensors, _ = logits_inputs(4, 5, seed=0)
    with pytest.raises(ValueError, match=f"seq_ids is required for objective='{objective}'"):
        policy_loss(**tensors, objective=objective)
    with pytest.raises(ValueError, match="seq_ids is required for opsm_threshold"):
        policy_loss(**tensors, opsm_threshold=0.1)
