"""DLERGRPOTrainer against the real TRL GRPOTrainer: the same loss, gradients and metrics on a tiny
Llama and fixed batches, for every supported option; clear errors for the others.

Tolerances (fp32): loss rel <= 1e-5 and gradient rel <= 1e-4 (the bounds of every integration test). The two sides
differ only in float32 summation order (TRL: [B, C] tensors and chunked autograd; here the fused
kernels), about 1e-7 relative per sum.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
if importlib.util.find_spec("datasets") is None:
    pytest.skip("datasets is not installed (the trl extra)", allow_module_level=True)

from dler_kernels.integrations import warn_if_untested  # noqa: E402


def drop_in():
    """``dler_kernels.integrations.trl``, imported at first use, not at collection: pytest imports this file in every
    xdist worker, and the drop-in imports TRL's GRPOTrainer, which imports vLLM (~3 s of CPU). Not a module-level
    name: pytest reads attributes of every module-level object while it collects."""
    return importlib.import_module("dler_kernels.integrations.trl")


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
        report_to="none", use_cpu=True, bf16=False, gradient_accumulation_steps=2,
        **{"epsilon": 0.2, "epsilon_high": 0.28, **config},
    )  # fmt: skip
    import datasets

    dataset = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7"] * 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=LlamaForCausalLM.from_pretrained(model_dir), reward_funcs=lambda completions, **kw: [0.0] * 4,
            args=args, train_dataset=dataset, processing_class=_tokenizer(),
        )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's loop during train()
    return trainer


PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # PPO-clip, each with its own normaliser

_TRAINERS = {}


@pytest.fixture
def trainers(model_dir, tmp_path_factory):
    """(TRL's trainer, ours) for a temperature (baked into TRL's fused head at construction), cached."""

    def get(temperature=1.0):
        if temperature not in _TRAINERS:
            out = tmp_path_factory.mktemp("out")
            _TRAINERS[temperature] = tuple(
                make_trainer(cls, model_dir, out, temperature=temperature, beta=0.04)
                for cls in (trl.GRPOTrainer, drop_in().DLERGRPOTrainer)
            )
        return _TRAINERS[temperature]

    return get


def make_inputs(seed=1, old=True, beta=False, is_ratio=None, tool_mask=False, adv_2d=False, sampling=False):
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
    if sampling:  # what TRL's generation adds with vLLM: the sampler's log-probs
        inputs["sampling_per_token_logps"] = torch.zeros(B, C)
    return inputs


def current_logps(trainer, inputs):
    """[B, C] float64: the model's log-prob of each completion token."""
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = trainer.model(input_ids=ids, attention_mask=am).logits[:, -C - 1 : -1] / trainer.temperature
        return torch.log_softmax(logits.double(), -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]


def _fill_logps(trainer, inputs, seed, drift=None):
    """old / ref log-probs near the model's current ones, so that ratios fall on both sides of the clip;
    ``drift`` [B] is added to each row's old log-probs (log(pi_old / pi) of that row, plus the noise)."""
    current = current_logps(trainer, inputs)
    g = torch.Generator().manual_seed(seed + 100)
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        if inputs.get(key) == "current+noise":
            inputs[key] = (current + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)).float()
    if drift is not None:
        inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + drift[:, None]
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics.values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach().double(), grads.double(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


# Every option the tests vary, at these values unless a test says otherwise (the trainers are shared).
DEFAULTS = dict(
    loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
    use_vllm=False, vllm_importance_sampling_correction=False, off_policy_mask_threshold=None,
    use_bias_correction_kl=True, steps_per_generation=2, delta=None, sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
)  # fmt: skip
ARGS_ATTRS = ("use_bias_correction_kl", "steps_per_generation", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
              "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")  # fmt: skip


def configure(trainer, **attrs):
    """Set every option of ``DEFAULTS`` (``attrs`` overriding), on the trainer or its args where TRL reads it."""
    for k, v in {**DEFAULTS, **attrs}.items():
        setattr(trainer.args if k in ARGS_ATTRS else trainer, k, v)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(trainers, temperature=1.0, seed=1, inputs_kw=None, train=True, drift=None, **attrs):
    ref_trainer, ours = trainers(temperature)
    inputs = _fill_logps(ref_trainer, make_inputs(seed=seed, **(inputs_kw or {})), seed, drift)
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


@pytest.mark.parametrize("loss_type", PPO_LOSS_TYPES)
@pytest.mark.parametrize("seed", [1, 2])
def test_each_loss_type_matches_trl(trainers, loss_type, seed):
    _, metrics = compare(trainers, seed=seed, loss_type=loss_type)
    assert 0.0 < metrics["clip_ratio/region_mean"] < 1.0  # the clip is exercised on both sides of it


@pytest.mark.parametrize("loss_type", PPO_LOSS_TYPES)
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


# Settings where each loss type's clip, gate or weight acts. cispo: TRL's absolute cap epsilon_high, here
# binding on the ratios above 1.2; sapo: temperatures far apart, so that swapping them (or the defaults) would
# show; vespo: TRL's defaults, asymmetric already.
OTHER_LOSS_TYPES = {
    "cispo": dict(epsilon_high=1.2),
    "sapo": dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "luspo": {},
    "vespo": {},
}


def test_every_supported_loss_type_is_compared_with_trl():
    assert sorted(PPO_LOSS_TYPES + tuple(OTHER_LOSS_TYPES)) == sorted(drop_in().SUPPORTED_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", OTHER_LOSS_TYPES)
def test_other_loss_types_match_trl(trainers, loss_type):
    """cispo, sapo, luspo (token level: PPO's clip, summed per sequence) and vespo, with the KL term."""
    _, metrics = compare(trainers, loss_type=loss_type, beta=0.04, inputs_kw=dict(beta=True),
                         **OTHER_LOSS_TYPES[loss_type])  # fmt: skip
    if loss_type == "cispo":
        assert 0.0 < metrics["cispo_clip_ratio"] < 1.0
    elif loss_type == "luspo":
        assert 0.0 < metrics["clip_ratio/region_mean"] < 1.0
    elif loss_type == "vespo":
        assert abs(metrics["vespo/phi_seq_mean"] - 1.0) > 1e-2  # the weight moves away from phi(1) = 1


@pytest.mark.parametrize(
    "loss_type,inputs_kw",
    [("grpo", {}), ("dapo", {}), ("luspo", {}), ("vespo", {}), ("bnpo", dict(adv_2d=True, tool_mask=True))],
    ids=["grpo", "dapo", "luspo", "vespo", "bnpo-per-token-advantages"],
)
def test_sequence_level_matches_trl(trainers, loss_type, inputs_kw):
    """importance_sampling_level="sequence" (GSPO's ratio), with bounds narrow enough that it clips, and the plain
    k3 KL, which luspo sums over each sequence. Per-token advantages give TRL's metrics per token instead of per
    row."""
    _, metrics = compare(trainers, loss_type=loss_type, importance_sampling_level="sequence", epsilon_low=0.02,
                         epsilon_high=0.03, beta=0.04, use_bias_correction_kl=False,
                         inputs_kw=dict(beta=True, **inputs_kw))  # fmt: skip
    if loss_type != "vespo":
        assert 0.0 < metrics["clip_ratio/region_mean"] < 1.0


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")])
def test_off_policy_mask_matches_trl(trainers, loss_type, level):
    """OPSM at threshold 0.25: row 1 (A < 0), whose old log-probs exceed the current ones by 0.5 on average, is
    dropped; row 0, drifted alike, is kept (A > 0); rows 2 and 3 (A < 0) drift by 0 and -0.3, kept."""
    drift = torch.tensor([0.5, 0.5, 0.0, -0.3])
    compare(trainers, seed=2, drift=drift, loss_type=loss_type, importance_sampling_level=level,
            off_policy_mask_threshold=0.25, beta=0.04, use_bias_correction_kl=level == "token",
            inputs_kw=dict(beta=True), **({"epsilon_high": 1.2} if loss_type == "cispo" else {}))  # fmt: skip
    ref_trainer, _ = trainers(1.0)
    inputs = _fill_logps(ref_trainer, make_inputs(seed=2, beta=True), 2, drift)
    keep = trl.GRPOTrainer.get_off_policy_mask(
        inputs["advantages"][:, None], current_logps(ref_trainer, inputs).float(), inputs["old_per_token_logps"],
        inputs["completion_mask"], 0.25,
    )  # fmt: skip
    assert keep[:, 0].tolist() == [1, 0, 1, 1]


def test_two_sided_clip_delta_matches_trl(trainers):
    """delta = 1.5 >= 1 + epsilon_high binds: rows 1 and 3 (A < 0) have ratios near e^0.6 = 1.8."""
    drift = torch.tensor([0.0, -0.6, 0.0, -0.6])
    _, metrics = compare(trainers, seed=2, drift=drift, loss_type="dapo", delta=1.5)
    ref_trainer, _ = trainers(1.0)
    inputs = _fill_logps(ref_trainer, make_inputs(seed=2), 2, drift)
    ratio = torch.exp(current_logps(ref_trainer, inputs) - inputs["old_per_token_logps"])
    negative = inputs["advantages"][:, None] < 0
    assert bool(((ratio > 1.5) & negative & inputs["completion_mask"].bool()).any())


def test_the_loss_runs_through_the_fused_kernel(trainers, monkeypatch):
    """No [tokens, V] logits: the model's own lm_head forward never runs, linear_policy_loss does."""
    _, ours = trainers(1.0)
    configure(ours, loss_type="dapo", beta=0.0, use_vllm=False)
    calls = []
    real = drop_in().linear_policy_loss
    monkeypatch.setattr(drop_in(), "linear_policy_loss", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
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
        (dict(loss_type="cispo"), "epsilon_high=0.28: loss_type='cispo' caps the ratio at epsilon_high itself"),
        (dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence"),
         "importance_sampling_level='sequence' with loss_type='cispo'"),
        (dict(loss_type="sapo", importance_sampling_level="sequence"),
         "importance_sampling_level='sequence' with loss_type='sapo'"),
        (dict(importance_sampling_level="sequence", beta=0.04), "use_bias_correction_kl=True"),
        (dict(delta=1.2), "delta=1.2: .* delta >= 1 \\+ epsilon_high"),
        (dict(delta=2.0, importance_sampling_level="sequence"), "delta=2.0: .*importance_sampling_level='token'"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(entropy_coef=0.01), "entropy_coef"),
    ],
    ids=lambda v: str(v)[:60],
)  # fmt: skip
def test_unsupported_option_is_named(model_dir, tmp_path, config, message):
    with pytest.raises(ValueError, match=message) as info:
        make_trainer(drop_in().DLERGRPOTrainer, model_dir, tmp_path, **config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "attrs,inputs_kw,message",
    [
        (dict(beta=0.04, use_vllm=True, vllm_importance_sampling_correction=True), dict(is_ratio="token", beta=True),
         "beta != 0 together with vllm_importance_sampling_correction"),
        (dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True), dict(is_ratio="token"),
         "loss_type='vespo' with vllm_importance_sampling_correction=True"),
        (dict(off_policy_mask_threshold=0.5, use_vllm=True), {}, "off_policy_mask_threshold with use_vllm=True"),
        (dict(off_policy_mask_threshold=0.5), dict(sampling=True),
         "off_policy_mask_threshold with inputs\\['sampling_per_token_logps'\\]"),
    ],
    ids=["kl-vllm-is", "vespo-vllm-is", "opsm-vllm", "opsm-sampler-logps"],
)  # fmt: skip
def test_unsupported_option_at_loss_time_is_named(trainers, attrs, inputs_kw, message):
    """Options set on a built trainer (vLLM's need a vLLM server to build one) are refused by the loss."""
    _, ours = trainers(1.0)
    configure(ours, **attrs)
    try:
        with pytest.raises(ValueError, match=message) as info:
            ours.compute_loss(ours.model, _fill_logps(ours, make_inputs(**inputs_kw), 1))
        assert "\n" not in str(info.value)
    finally:
        configure(ours)


def test_vision_inputs_are_refused(trainers):
    _, ours = trainers(1.0)
    configure(ours, loss_type="dapo", beta=0.0, use_vllm=False)
    inputs = _fill_logps(ours, make_inputs(), 1)
    with pytest.raises(ValueError, match="pixel_values"):
        ours.compute_loss(ours.model, {**inputs, "pixel_values": torch.zeros(1, 3)})


def test_untested_trl_version_warns_with_the_tested_range(monkeypatch):
    with pytest.warns(UserWarning, match=r"trl 1\.12\.0 is outside the tested versions \(>=1\.16\.0, <1\.17\.0\)"):
        assert not warn_if_untested("trl", "1.12.0", drop_in().TESTED_TRL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_untested("trl", trl.__version__, drop_in().TESTED_TRL)  # the installed one is tested
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.warns(UserWarning, match="trl 2.0.0 is outside"):
        importlib.reload(drop_in())
    monkeypatch.undo()
    importlib.reload(drop_in())
