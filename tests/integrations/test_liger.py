"""policy_loss against Liger-Kernel's ``triton_grpo_loss`` (liger-kernel 0.8.5, its Triton kernels run by the
interpreter on the CPU: TRITON_INTERPRET=1, tests/conftest.py) on the same logits, for each of its loss types:
the loss and d(loss)/d(logits).

Our settings for a Liger loss type are the TRL drop-in's (``dler_kernels.integrations.trl.objective_settings``:
Liger's loss types are TRL's, with TRL's normalisers), so these tests also check that mapping against a second
implementation. One documented difference (README, "Differences from the peers"): Liger's ``luspo`` still has TRL's
aggregation of before huggingface/trl#6654, mean over B x L of each token's loss times its sequence's length
(each sequence's token sum weighted by a further |y| / L), and at ``importance_sampling_level="token"`` its gradient
is not the gradient of its own loss. The tests reproduce Liger's aggregation with ``token_weights`` and assert both.

Tolerances (fp32 on both sides): loss rel <= 1e-5 and gradient rel <= 1e-4, the bounds of the TRL and verl tests;
the two sides differ only in float32 summation order (Liger: online softmax in blocks of 2048 columns; here the
kernels' own), about 1e-7 relative per sum (measured: <= 2e-7).
"""

from __future__ import annotations

import importlib.util
import os
import types

import pytest
import torch

# Liger and the TRL drop-in are imported where they are used: pytest imports this file in every xdist worker to
# collect it, and they import transformers (and the drop-in TRL's GRPOTrainer, vLLM with it), ~3 s of CPU.
if importlib.util.find_spec("liger_kernel") is None:  # `make setup` installs it (the bench extra)
    if os.environ.get("CI") == "true":  # CI's `make test` must not skip these
        raise ImportError("liger-kernel is not installed: `make setup` installs it (the bench extra)")
    pytest.skip("liger-kernel is not installed (pip install -e '.[bench]')", allow_module_level=True)

from dler_kernels import available_backends, policy_loss  # noqa: E402

B, L, V = 4, 6, 37
# Liger's (= TRL's) defaults for the parameters these tests do not vary.
LIGER_DEFAULTS = dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                      vespo_k_neg=3.0, vespo_lambda_neg=2.0, delta=None)  # fmt: skip
BACKENDS = [b for b in ("triton", "cpu") if b in available_backends()]


def make_inputs(seed, temperature):
    """Logits [B, L + 1, V] (Liger's shape: one position more than the completion), completion ids and mask (row 1
    padded after 4 tokens, row 3 empty), one advantage per row, old and reference log-probs near the current ones so
    that the ratios fall on both sides of every clip."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L + 1, V, generator=g) * 3.0
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, :] = 0
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
    current = torch.log_softmax(logits[:, :-1].double() / temperature, -1).gather(-1, ids[..., None])[..., 0]
    old = (current + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ref = (current + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    is_ratio = torch.rand(B, L, generator=g) * 2.0
    return dict(logits=logits, ids=ids, mask=mask, advantages=advantages, old=old, ref=ref, is_ratio=is_ratio)


def liger_loss(x, loss_type, level="token", beta=0.0, temperature=1.0, eps_high=0.28, is_ratio=False,
               bias_kl=False):  # fmt: skip
    """Liger's reduced loss and d(loss)/d(logits) [B, L + 1, V]."""
    from liger_kernel.transformers import grpo_loss as liger_grpo

    logits = x["logits"].clone().requires_grad_()
    loss, _ = liger_grpo.triton_grpo_loss(
        logits, x["old"], x["ref"] if beta else None, x["ids"], x["advantages"], x["mask"], temperature=temperature,
        beta=beta, eps_low=0.2, eps_high=eps_high, inplace=False, loss_type=loss_type,
        importance_sampling_level=level, reduce=True, vllm_is_ratio=x["is_ratio"] if is_ratio else None,
        use_bias_correction_kl=bias_kl,
    )  # fmt: skip
    loss.backward()
    return loss.detach().double(), logits.grad.double()


def our_settings(loss_type, level, eps_high, mask):
    """Liger's loss type as policy_loss options: the TRL drop-in's objective, and Liger's aggregation (TRL's but for
    luspo, whose sequence weights len / L are token weights over a B x L mean)."""
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(**LIGER_DEFAULTS), loss_type=loss_type,
                                    importance_sampling_level=level, epsilon_low=0.2, epsilon_high=eps_high,
                                    off_policy_mask_threshold=None)  # fmt: skip
    from dler_kernels.integrations.trl import objective_settings

    settings = objective_settings(trainer)
    lengths = mask.sum(-1, keepdim=True).float()
    if loss_type in ("grpo", "sapo"):
        return dict(settings, loss_agg="seq-mean-token-mean", normalizer=B), None
    if loss_type == "dr_grpo":
        return dict(settings, loss_agg="token-mean", normalizer=B * L), None
    if loss_type == "luspo":
        return dict(settings, loss_agg="token-mean", normalizer=B * L), lengths.expand(B, L).reshape(-1)
    # bnpo, dapo, cispo, vespo: the valid-token count (Liger's dapo normaliser without num_items_in_batch)
    return dict(settings, loss_agg="token-mean", normalizer=mask.sum().clamp(min=1).item()), None


def our_loss(x, loss_type, backend, level="token", beta=0.0, temperature=1.0, eps_high=0.28, is_ratio=False,
             bias_kl=False):  # fmt: skip
    """policy_loss's loss and d(loss)/d(logits), on the L completion positions, flattened [B * L, V]."""
    settings, weights = our_settings(loss_type, level, eps_high, x["mask"])
    if is_ratio:
        weights = x["is_ratio"].reshape(-1) if weights is None else weights * x["is_ratio"].reshape(-1)
    logits = x["logits"][:, :-1].reshape(-1, V).clone().requires_grad_()
    out = policy_loss(
        logits, x["ids"].reshape(-1), x["old"].reshape(-1), x["advantages"].repeat_interleave(L),
        x["mask"].reshape(-1).bool(), ref_logprobs=x["ref"].reshape(-1) if beta else None,
        seq_ids=torch.arange(B).repeat_interleave(L), token_weights=weights, backend=backend, beta=beta,
        kl_type="k3_ratio" if bias_kl else "k3", temperature=temperature, **settings,
    )  # fmt: skip
    out.loss.backward()
    return out.loss.detach().double(), logits.grad.double()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(backend, loss_type, seed=1, **kw):
    x = make_inputs(seed, kw.get("temperature", 1.0))
    loss_ref, grad_ref = liger_loss(x, loss_type, **kw)
    loss, grad = our_loss(x, loss_type, backend, **kw)
    assert grad_ref[:, -1].abs().max() == 0  # the extra position has no loss
    grad_ref = grad_ref[:, :-1].reshape(-1, V)
    assert torch.isfinite(loss) and grad_ref.norm() > 0
    assert abs(loss - loss_ref).item() <= 1e-5 * abs(loss_ref).item(), (loss.item(), loss_ref.item())
    assert rel(grad, grad_ref) <= 1e-4, rel(grad, grad_ref)


# Liger's loss types beyond PPO-clip, each where its own clip, gate or weight acts: cispo with Liger's (TRL's)
# absolute cap 1.2, binding on the ratios above it; sapo and vespo at their defaults.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("loss_type,kw", [("cispo", dict(eps_high=1.2)), ("sapo", {}), ("vespo", {})])
def test_loss_type_matches_liger(backend, loss_type, kw, seed):
    compare(backend, loss_type, seed=seed, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,kw", [("cispo", dict(eps_high=1.2)), ("sapo", {}), ("vespo", {})])
def test_kl_term_and_temperature_match_liger(backend, loss_type, kw):
    """The k3 KL to the reference weighted by the token ratio (Liger's use_bias_correction_kl), temperature 0.7."""
    compare(backend, loss_type, beta=0.04, bias_kl=True, temperature=0.7, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,kw", [("cispo", dict(eps_high=1.2)), ("sapo", {}), ("dapo", {})])
def test_importance_sampling_ratio_matches_liger(backend, loss_type, kw):
    """Liger's vllm_is_ratio multiplies each token's policy loss: the kernels' token_weights (no KL term here; with
    one, Liger weights only the policy term, as TRL does, which the TRL drop-in refuses)."""
    compare(backend, loss_type, is_ratio=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ppo_loss_types_match_liger(backend, loss_type, level):
    """PPO-clip (token) and GSPO (sequence: Liger's own sequence kernel) under each of Liger's normalisers."""
    compare(backend, loss_type, level=level, beta=0.04, bias_kl=level == "token")


@pytest.mark.parametrize("backend", BACKENDS)
def test_luspo_sequence_level_matches_liger(backend):
    """LUSPO as its paper and TRL run it: GSPO's sequence ratio, each sequence's loss scaled by its length (Liger's
    B x L mean of it reproduced by token weights len / L, see the module docstring)."""
    compare(backend, "luspo", level="sequence", beta=0.04)


def test_liger_luspo_token_level_gradient_is_not_its_loss_gradient():
    """The documented difference: Liger 0.8.5's token-level luspo returns the loss of its formula, (ptl * len).mean()
    over B x L, but a gradient 50% off (relative norm) the gradient of that loss, which float64 autograd gives and
    the kernels match. (Its backward scales by a [B, 1] tensor where the token kernel reads [B, L].) When this test
    fails, Liger has fixed it: move luspo/token into test_luspo_sequence_level_matches_liger and drop the README
    line."""
    x = make_inputs(1, 1.0)
    loss_liger, grad_liger = liger_loss(x, "luspo")
    loss, grad = our_loss(x, "luspo", BACKENDS[0] if BACKENDS else "reference")
    logits = x["logits"].double().requires_grad_()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x["ids"][..., None])[..., 0]
    ratio, adv, mask = torch.exp(logp - x["old"].double()), x["advantages"].double()[:, None], x["mask"].double()
    per_token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    oracle = (per_token * mask * mask.sum(-1, keepdim=True)).mean()
    oracle.backward()
    oracle_grad = logits.grad[:, :-1].reshape(-1, V)
    assert abs(loss_liger - oracle).item() <= 1e-5 * abs(oracle).item()  # Liger's loss is its formula's
    assert abs(loss - oracle).item() <= 1e-5 * abs(oracle).item()
    assert rel(grad, oracle_grad) <= 1e-4  # ours is its gradient
    assert rel(grad_liger[:, :-1].reshape(-1, V), oracle_grad) > 0.1  # Liger's is not
