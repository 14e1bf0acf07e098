"""The policy update on packed micro-batches equals the per-sequence computation and one big batch."""

import pytest
import torch

from dler_kernels import reference as ref
from trainer.update.fused_head import fused_head_unsupported
from trainer.update.packing import Packed, UpdateRow, plan_micro_batches
from trainer.update.policy import accumulate_gradients, compute_logprobs


def test_plan_keeps_order_and_respects_the_budget():
    assert plan_micro_batches([3, 4, 2, 7, 1, 1], 7) == [[0, 1], [2], [3], [4, 5]]
    assert plan_micro_batches([10, 1], 5) == [[0], [1]]  # a long row gets a micro-batch of its own
    assert plan_micro_batches([], 5) == []
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        plan_micro_batches([1], 0)


def test_packing_positions_and_targets():
    rows = [UpdateRow([1, 2], [3, 4, 5], 0.5), UpdateRow([6], [7], -1.0)]
    p = Packed.of(rows, torch.device("cpu"))
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert p.loss_positions.tolist() == [1, 2, 3, 5]  # each predicts the next token
    assert p.targets.tolist() == [3, 4, 5, 7] and p.seq_ids.tolist() == [0, 0, 0, 1]
    assert p.advantages.tolist() == [0.5, 0.5, 0.5, -1.0]
    with pytest.raises(ValueError, match="at least one prompt token"):
        Packed.of([UpdateRow([], [1], 0.0)], torch.device("cpu"))


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # larger weights than the init, so that ratios and clipping are exercised
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return m


def make_rows(seed, n=6):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, r = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(0, 9, (1,), generator=gen))
        ids = torch.randint(0, 49152, (p + r,), generator=gen).tolist()
        rows.append(UpdateRow(ids[:p], ids[p:], float(torch.randn(1, generator=gen))))
    return rows


def per_sequence_loss(model, rows, loss: dict, old):
    """The specification: each sequence in its own forward (no packing), the reference loss."""
    logits, targets, seq, adv = [], [], [], []
    for i, row in enumerate(rows):
        if not row.response_ids:
            continue
        ids = torch.tensor([row.prompt_ids + row.response_ids])
        out = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1]
        logits.append(out)
        targets += row.response_ids
        seq += [i] * len(row.response_ids)
        adv += [row.advantage] * len(row.response_ids)
    logits = torch.cat(logits)
    targets = torch.tensor(targets)
    return ref.policy_loss_ref(
        logits,
        targets,
        old,
        torch.tensor(adv),
        torch.ones_like(targets, dtype=torch.bool),
        seq_ids=torch.tensor(seq),
        **loss,
    )[0]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused-head"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_micro_batches_equal_the_per_sequence_big_batch(model, loss_agg, fused_head):
    rows = make_rows(1)
    settings = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, loss_agg=loss_agg, temperature=0.8)
    for row, logp in zip(rows, compute_logprobs(model, rows, token_budget=10**6, temperature=0.8)):
        row.old_logprobs = logp
    # perturb the "old" policy so that ratios differ from 1 and both clips engage
    gen = torch.Generator().manual_seed(2)
    for r in rows:
        r.old_logprobs = r.old_logprobs + 0.3 * torch.randn(r.old_logprobs.shape, generator=gen)
    old = torch.cat([r.old_logprobs for r in rows])

    model.zero_grad(set_to_none=True)
    expected = per_sequence_loss(model, rows, settings, old)
    expected.backward()
    want = grads(model)

    for budget in (10**6, 12, 1):  # one micro-batch, a few, one per sequence
        model.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(model, rows, settings, token_budget=budget, fused_head=fused_head)
        # float32 throughout; packing changes only summation order: measured ~1e-7
        assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
        got = grads(model)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics["tokens"] == sum(len(r.response_ids) for r in rows)


@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused-head"])
def test_old_logprobs_match_an_unpacked_forward(model, fused_head):
    rows = make_rows(3)
    for row, logp in zip(rows, compute_logprobs(model, rows, token_budget=8, temperature=0.7, fused_head=fused_head)):
        row.old_logprobs = logp
    for row in rows:
        assert row.old_logprobs.shape == (len(row.response_ids),)
        if not row.response_ids:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row.prompt_ids + row.response_ids])).logits[0]
        want = torch.log_softmax(logits[len(row.prompt_ids) - 1 : -1] / 0.7, -1)
        want = want.gather(-1, torch.tensor(row.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(row.old_logprobs, want, rtol=0, atol=1e-5)


def test_update_needs_old_logprobs(model):
    with pytest.raises(ValueError, match="old_logprobs missing"):
        accumulate_gradients(model, make_rows(4), {}, token_budget=64)
    rows = make_rows(4)
    for r in rows:
        r.old_logprobs = torch.zeros(len(r.response_ids))
    with pytest.raises(ValueError, match="ref_logprobs missing while beta > 0"):
        accumulate_gradients(model, rows, {"beta": 0.1}, token_budget=64)


def test_fused_head_leaves_the_model_as_it_was(model):
    rows = make_rows(5)
    compute_logprobs(model, rows, token_budget=8, temperature=1.0, fused_head=True)
    assert "forward" not in vars(model.lm_head)  # the swapped forward is gone
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)


def test_fused_head_support_is_checked(model):
    assert fused_head_unsupported(model) is None
    model.config.final_logit_softcapping = 30.0
    try:
        assert "final_logit_softcapping=30.0" in fused_head_unsupported(model)
    finally:
        del model.config.final_logit_softcapping
    assert "not an nn.Linear" in fused_head_unsupported(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- fp32 LM head (algorithm.lm_head_fp32)
#
# On a bf16 model the oracle is float64 from the LM head's own inputs on: the bf16 hidden states the
# packed forward hands the head (captured by a pre-hook, which fires on both paths) and the bf16 head
# weight, upcast exactly. With lm_head_fp32 the head's logits are float32 of those values: log-probs
# within 1e-5 absolute and the loss within 1e-5 relative (float32 rounding, as the kernels' float32
# tests); without it they are rounded to bf16 first. Measured here: log-prob error 1.1e-6 with the fp32
# head, 5.7e-3 without; loss 1.7e-7 and 2.3e-4 relative to mean |per-token loss|.


@pytest.fixture(scope="module")
def bf16_model(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def head_inputs(model, run, *args, **kwargs):
    """``run(model, *args, **kwargs)`` and the hidden states [N, H] each head call of ``model`` received,
    with their gradients."""
    seen, grads = [], []

    def keep(module, args):
        hidden = args[0]
        seen.append(hidden.detach()[0])
        if hidden.requires_grad:
            hidden.register_hook(lambda g: grads.append(g[0]))

    handle = model.lm_head.register_forward_pre_hook(keep)
    try:
        result = run(model, *args, **kwargs)
    finally:
        handle.remove()
    return result, seen, grads


def logprob_errors(model, rows, temperature: float, fused_head: bool) -> dict[bool, float]:
    """lm_head_fp32 -> the largest |error| of compute_logprobs against float64 log-probs of the hidden
    states the head received (bf16: the model's) and its weight as stored."""
    weight64 = model.get_output_embeddings().weight.detach().double()
    targets = torch.tensor([t for r in rows for t in r.response_ids])
    errors = {}
    for lm_head_fp32 in (True, False):
        logp, seen, _ = head_inputs(
            model, compute_logprobs, rows, token_budget=10**6, temperature=temperature, fused_head=fused_head,
            lm_head_fp32=lm_head_fp32,
        )  # fmt: skip
        assert len(seen) == 1 and seen[0].dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in logp)
        want = ref.token_logprobs_ref(seen[0].double() @ weight64.t(), targets, temperature=temperature)
        errors[lm_head_fp32] = (torch.cat(logp).double() - want).abs().max().item()
    return errors


@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused-head"])
def test_fp32_head_logprobs_of_a_bf16_model_match_float64(bf16_model, fused_head):
    errors = logprob_errors(bf16_model, make_rows(6), temperature=0.8, fused_head=fused_head)
    assert errors[True] <= 1e-5, errors
    assert errors[False] >= 1e-3, errors  # the bf16 head's rounding, for contrast


@pytest.mark.parametrize("fused_head", [False, True], ids=["logits", "fused-head"])
def test_fp32_head_loss_and_head_gradient_of_a_bf16_model_match_float64(bf16_model, fused_head):
    rows = make_rows(7)
    for row, logp in zip(rows, compute_logprobs(bf16_model, rows, token_budget=10**6, temperature=0.8)):
        row.old_logprobs = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(len(logp)))
    settings = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, loss_agg="token-mean", temperature=0.8)
    bf16_model.zero_grad(set_to_none=True)
    metrics, seen, dx = head_inputs(
        bf16_model, accumulate_gradients, rows, settings, token_budget=10**6, fused_head=fused_head, lm_head_fp32=True
    )
    bf16_model.zero_grad(set_to_none=True)
    assert len(seen) == 1 and len(dx) == 1 and dx[0].dtype == torch.bfloat16

    x64, w64 = seen[0].double(), bf16_model.lm_head.weight.detach().double()
    logits64 = (x64 @ w64.t()).requires_grad_(True)
    targets = torch.tensor([t for r in rows for t in r.response_ids])
    seq = torch.tensor([i for i, r in enumerate(rows) for _ in r.response_ids])
    adv = torch.tensor([r.advantage for r in rows for _ in r.response_ids], dtype=torch.float64)
    old = torch.cat([r.old_logprobs for r in rows]).double()
    loss64, per_token64, *_ = ref.policy_loss_ref(
        logits64, targets, old, adv, torch.ones_like(targets, dtype=torch.bool), seq_ids=seq, **settings
    )
    loss64.backward()
    # float32 arithmetic on sums of signed terms: 1e-5 of sum |per-token loss| (as the kernels' tests)
    assert abs(metrics["loss"] - loss64.item()) <= 1e-5 * per_token64.abs().mean().item()
    # d(loss)/d(hidden): float32 sums rounded once to bf16 (2^-8 relative) plus 1e-5 of the absolute sum
    dz = logits64.grad
    want, terms = dz @ w64, dz.abs() @ w64.abs()
    assert bool(((dx[0].double() - want).abs() <= 2.0**-8 * want.abs() + 1e-5 * terms).all())


def test_fp32_head_logits_path_needs_a_linear_head(model):
    import copy

    odd = copy.deepcopy(model)
    odd.set_output_embeddings(torch.nn.Identity())
    with pytest.raises(ValueError, match="lm_head_fp32 needs an nn.Linear LM head; .* is Identity"):
        compute_logprobs(odd, make_rows(8), token_budget=64, temperature=1.0, lm_head_fp32=True)


def test_fp32_head_leaves_the_model_as_it_was(model):
    rows = make_rows(5)
    for fused_head in (False, True):
        compute_logprobs(model, rows, token_budget=8, temperature=1.0, fused_head=fused_head, lm_head_fp32=True)
        assert "forward" not in vars(model.lm_head)


def test_fp32_head_uses_a_float32_head_weight_as_it_is(bf16_model):
    """A float32 head weight under bf16 activations: the fused head upcasts the hidden states instead of
    rounding the weight to bf16 (which the option off does, as before)."""
    import copy

    model = copy.deepcopy(bf16_model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
    model.set_output_embeddings(head)
    errors = logprob_errors(model, make_rows(10), temperature=1.0, fused_head=True)
    assert errors[True] <= 1e-5 and errors[False] >= 1e-3, errors
