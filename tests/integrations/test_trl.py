"""DLERGRPOTrainer against the real TRL GRPOTrainer: the same loss, gradients and metrics on a tiny
Llama and fixed batches, for every supported option; clear errors for the others.

Tolerances (fp32): loss rel <= 1e-5 and gradient rel <= 1e-4 (the issue's bounds). The two sides
differ only in float32 summation order (TRL: [B, C] tensors and chunked autograd; here the fused
kernels), about 1e-7 relative per sum.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from dler_kernels.integrations import trl as dler_trl  # noqa: E402
from dler_kernels.integrations import warn_if_untested  # noqa: E402

V, HIDDEN, B, P, C = 301, 32, 4, 6, 10


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(V)}
    vocab.update({"<pad>": 0, "</s>": 1, "<s>": 2})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits of scale ~3, so that ratios and entropies are not all trivial
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return str(path)


def make_trainer(cls, model_dir, out_dir, **config):
    from transformers import LlamaForCausalLM

    args = trl.GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
        report_to="none", use_cpu=True, bf16=False, gradient_accumulation_steps=2, epsilon=0.2, epsilon_high=0.28,
        **config,
    )  # fmt: skip
    dataset = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7"] * 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=LlamaForCausalLM.from_pretrained(model_dir), reward_funcs=lambda completions, **kw: [0.0] * 4,
            args=args, train_dataset=dataset, processing_class=_tokenizer(),
        )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's loop during train()
    return trainer


_TRAINERS = {}


@pytest.fixture
def trainers(model_dir, tmp_path_factory):
    """(TRL's trainer, ours) for a temperature (baked into TRL's fused head at construction), cached."""

    def get(temperature=1.0):
        if temperature not in _TRAINERS:
            out = tmp_path_factory.mktemp("out")
            _TRAINERS[temperature] = tuple(
                make_trainer(cls, model_dir, out, temperature=temperature, beta=0.04)
                for cls in (trl.GRPOTrainer, dler_trl.DLERGRPOTrainer)
            )
        return _TRAINERS[temperature]

    return get


def make_inputs(seed=1, old=True, beta=False, is_ratio=None, tool_mask=False, adv_2d=False):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 7:] = 0
    completion_mask[2, 4:] = 0
    completion_mask[3, :] = 0 if seed % 2 else 1  # an empty completion in some batches
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
    if adv_2d:
        advantages = advantages[:, None] + 0.3 * torch.randn(B, C, generator=g)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum() * 2}  # fmt: skip
    if old:
        inputs["old_per_token_logps"] = "current+noise"
    if beta:
        inputs["ref_per_token_logps"] = "current+noise"
    if is_ratio == "token":
        inputs["importance_sampling_ratio"] = torch.rand(B, C, generator=g) * 2.0
    elif is_ratio == "sequence":
        inputs["importance_sampling_ratio"] = torch.rand(B, 1, generator=g) * 2.0
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(B, C, generator=g) > 0.3).long()
    return inputs


def _fill_logps(trainer, inputs, seed):
    """old / ref log-probs near the model's current ones, so that ratios fall on both sides of the clip."""
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = trainer.model(input_ids=ids, attention_mask=am).logits[:, -C - 1 : -1] / trainer.temperature
        current = torch.log_softmax(logits.double(), -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    g = torch.Generator().manual_seed(seed + 100)
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        if inputs.get(key) == "current+noise":
            inputs[key] = (current + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)).float()
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics.values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach().double(), grads.double(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def configure(trainer, **attrs):
    args_attrs = {k: attrs.pop(k) for k in list(attrs) if k in ("use_bias_correction_kl", "steps_per_generation")}
    for k, v in attrs.items():
        setattr(trainer, k, v)
    for k, v in args_attrs.items():
        setattr(trainer.args, k, v)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(trainers, temperature=1.0, seed=1, inputs_kw=None, train=True, **attrs):
    ref_trainer, ours = trainers(temperature)
    attrs = {"beta": 0.0, "use_vllm": False, "vllm_importance_sampling_correction": False,
             "use_bias_correction_kl": True, "steps_per_generation": 2, **attrs}  # fmt: skip
    inputs = _fill_logps(ref_trainer, make_inputs(seed=seed, **(inputs_kw or {})), seed)
    results = []
    for trainer in (ref_trainer, ours):
        configure(trainer, **attrs)
        trainer.model.train(train)
        results.append(loss_and_grads(trainer, inputs))
    (loss_ref, grad_ref, metrics_ref), (loss, grad, metrics) = results
    assert torch.isfinite(loss) and grad_ref.norm() > 0
    assert abs(loss - loss_ref).item() <= 1e-5 * abs(loss_ref).item(), (loss.item(), loss_ref.item())
    assert rel(grad, grad_ref) <= 1e-4, rel(grad, grad_ref)
    assert set(metrics) == set(metrics_ref)
    for key, value in metrics_ref.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return loss, metrics


@pytest.mark.parametrize("loss_type", dler_trl.SUPPORTED_LOSS_TYPES)
@pytest.mark.parametrize("seed", [1, 2])
def test_each_loss_type_matches_trl(trainers, loss_type, seed):
    _, metrics = compare(trainers, seed=seed, loss_type=loss_type)
    assert 0.0 < metrics["clip_ratio/region_mean"] < 1.0  # the clip is exercised on both sides of it


@pytest.mark.parametrize("loss_type", dler_trl.SUPPORTED_LOSS_TYPES)
@pytest.mark.parametrize("bias_correction", [True, False], ids=["kl_times_ratio", "plain_k3"])
def test_kl_term_matches_trl(trainers, loss_type, bias_correction):
    compare(trainers, loss_type=loss_type, beta=0.04, use_bias_correction_kl=bias_correction,
            inputs_kw=dict(beta=True))  # fmt: skip


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_temperature_matches_trl(trainers, loss_type):
    compare(trainers, temperature=0.7, loss_type=loss_type, beta=0.04, inputs_kw=dict(beta=True))


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_on_policy_without_old_logps_matches_trl(trainers, loss_type):
    """TRL then uses its current log-probs, detached (ratio 1, gradient -A, KL times a ratio of 1)."""
    compare(trainers, loss_type=loss_type, beta=0.04, inputs_kw=dict(old=False, beta=True))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_vllm_importance_sampling_ratio_matches_trl(trainers, loss_type, level):
    compare(trainers, loss_type=loss_type, use_vllm=True, vllm_importance_sampling_correction=True,
            inputs_kw=dict(is_ratio=level))  # fmt: skip


def test_tool_mask_and_per_token_advantages_match_trl(trainers):
    compare(trainers, loss_type="dr_grpo", beta=0.04, inputs_kw=dict(tool_mask=True, adv_2d=True, beta=True))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_eval_mode_normaliser_matches_trl(trainers, loss_type):
    """In eval TRL neither divides by the accumulation steps nor rescales dapo's normaliser (by
    accumulation steps / steps_per_generation, here 2 / 4)."""
    loss_eval, _ = compare(trainers, loss_type=loss_type, train=False, steps_per_generation=4)
    loss_train, _ = compare(trainers, loss_type=loss_type, train=True, steps_per_generation=4)
    assert loss_eval.item() != pytest.approx(loss_train.item())


def test_the_loss_runs_through_the_fused_kernel(trainers, monkeypatch):
    """No [tokens, V] logits: the model's own lm_head forward never runs, linear_policy_loss does."""
    _, ours = trainers(1.0)
    configure(ours, loss_type="dapo", beta=0.0, use_vllm=False)
    calls = []
    real = dler_trl.linear_policy_loss
    monkeypatch.setattr(dler_trl, "linear_policy_loss", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    inputs = _fill_logps(ours, make_inputs(seed=3), 3)
    hook = ours.model.lm_head.register_forward_hook(lambda *a: pytest.fail("lm_head forward ran"))
    try:
        loss_and_grads(ours, inputs)
    finally:
        hook.remove()
    assert calls == [torch.Size([B * C, HIDDEN])]


# ---------------------------------------------------------------- options we do not compute


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(loss_type="cispo"), "loss_type='cispo' is not supported"),
        (dict(loss_type="sapo"), "loss_type='sapo' is not supported"),
        (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
        (dict(delta=2.0), "delta"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(entropy_coef=0.01), "entropy_coef"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_unsupported_option_is_named(model_dir, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(dler_trl.DLERGRPOTrainer, model_dir, tmp_path, **config)


def test_kl_with_vllm_importance_sampling_is_refused(trainers):
    _, ours = trainers(1.0)
    configure(ours, loss_type="dapo", beta=0.04, use_vllm=True, vllm_importance_sampling_correction=True)
    try:
        with pytest.raises(ValueError, match="beta != 0 together with vllm_importance_sampling_correction"):
            ours.compute_loss(ours.model, make_inputs(is_ratio="token", beta=True))
    finally:
        configure(ours, beta=0.0, use_vllm=False, vllm_importance_sampling_correction=False)


def test_vision_inputs_are_refused(trainers):
    _, ours = trainers(1.0)
    configure(ours, loss_type="dapo", beta=0.0, use_vllm=False)
    inputs = _fill_logps(ours, make_inputs(), 1)
    with pytest.raises(ValueError, match="pixel_values"):
        ours.compute_loss(ours.model, {**inputs, "pixel_values": torch.zeros(1, 3)})


def test_untested_trl_version_warns_with_the_tested_range(monkeypatch):
    with pytest.warns(UserWarning, match=r"trl 1\.12\.0 is outside the tested versions \(>=1\.16\.0, <1\.17\.0\)"):
        assert not warn_if_untested("trl", "1.12.0", dler_trl.TESTED_TRL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_untested("trl", trl.__version__, dler_trl.TESTED_TRL)  # the installed one is tested
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.warns(UserWarning, match="trl 2.0.0 is outside"):
        importlib.reload(dler_trl)
    monkeypatch.undo()
    importlib.reload(dler_trl)
