"""trainer.config: presets, overrides, validation, round trip, summary."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    CONFIG_DIR,
    AlgorithmConfig,
    DADLERConfig,
    OptimConfig,
    TrainConfig,
    describe,
    from_dict,
    list_presets,
    load_config,
    save_config,
    to_dict,
)
from trainer.fsutil import UserError
from trainer.reward.answers import AnswerChecker

PAPER_PRESETS = {"r1-distill-1.5b-dler": "1.5B", "r1-distill-7b-dler": "7B"}


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# -------------------------------------------------------------------------------------------------- presets


def test_required_presets_exist():
    assert {"toy-cpu", "smollm2", "r1-distill-1.5b-dler", "r1-distill-7b-dler", "da-dler"} <= set(list_presets())


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_is_documented(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, TrainConfig)
    first = (CONFIG_DIR / f"{preset}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# {preset}:"), "each preset opens with a comment saying what it is for"


def test_default_preset_is_the_cpu_demo():
    cfg = load_config()
    assert cfg == load_config("toy-cpu")
    assert cfg.model.path == "demo-verbose-arith"
    assert cfg.data.train.startswith("builtin:toy-arith")
    assert (cfg.rollout.engine, cfg.rollout.dtype, cfg.rollout.gpu_memory_utilization) == ("vllm", "float32", 0.1)
    assert cfg.fsdp.enabled is False and cfg.run.device == "cpu"
    assert (cfg.reward.checker, cfg.reward.fallback_last_number, cfg.data.template) == ("exact", False, "plain")
    assert cfg.reward.penalty.name == "truncation"
    assert cfg.reward.penalty.length_budget <= cfg.max_response_tokens <= 192


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_paper_settings_exactly(preset):
    cfg = load_config(preset)
    s, a, o, p = cfg.rollout.sampling, cfg.algorithm, cfg.optim, cfg.reward.penalty
    assert cfg.model.path == f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{PAPER_PRESETS[preset]}"
    assert (o.lr, o.weight_decay, o.grad_clip) == (1e-6, 0.01, 1.0)
    assert (s.prompts_per_step, s.samples_per_prompt, a.mini_batch_prompts, a.epochs_per_step) == (512, 16, 64, 1)
    assert (cfg.data.max_prompt_tokens, s.max_tokens, p.length_budget) == (1024, 4000, 4000)
    assert s.temperature == a.temperature == 1.0
    assert (a.eps_low, a.eps_high, a.clip_c) == (0.2, 0.28, 10.0)
    assert (a.beta, a.kl_type) == (0.0005, "low_var_kl")
    assert (a.loss_agg, a.advantage, s.dynamic_sampling) == ("token-mean", "dler", True)
    assert (a.correct_advantage_boost, s.dynamic_sampling_on, p.truncation_coef) == (0.0, "reward", 0.0)
    assert (p.name, p.truncation_coef) == ("truncation", 0.0)
    assert (cfg.reward.checker, cfg.reward.require_think, cfg.data.template) == ("math", True, "r1")
    assert (cfg.fsdp.enabled, cfg.fsdp.param_dtype, cfg.fsdp.reduce_dtype) == (True, "bfloat16", "float32")
    assert cfg.reward.da_dler.enabled is False


def test_the_release_preset_differs_from_the_paper_in_the_release_settings_alone():
    """NVlabs/DLER verl-dler/dler.sh: stop-properly penalty 0.1, advantage boost 0.1, groups filtered on the verifier
    score, 256 prompts per step; everything else is the paper's."""
    paper, release = to_dict(load_config("r1-distill-1.5b-dler")), to_dict(load_config("r1-distill-1.5b-dler-release"))
    changed = {}
    for section in paper:
        for key, value in paper[section].items():
            if release[section][key] != value:
                changed[(section, key)] = release[section][key]
    assert changed == {
        ("rollout", "sampling"): {**paper["rollout"]["sampling"], "prompts_per_step": 256,
                                  "dynamic_sampling_on": "correctness"},
        ("reward", "penalty"): {**paper["reward"]["penalty"], "truncation_coef": 0.1},
        ("algorithm", "correct_advantage_boost"): 0.1,
        ("run", "out"): "runs/r1-distill-1.5b-dler-release",
    }  # fmt: skip


def test_da_dler_is_the_7b_recipe_with_difficulty_budgets():
    da, base = to_dict(load_config("da-dler")), to_dict(load_config("r1-distill-7b-dler"))
    expected = {"enabled": True, "thresholds": [0.5], "budgets": [4000, 2000], "source": "current"}
    assert da["reward"]["da_dler"] == expected
    for d in (da, base):
        del d["reward"]["da_dler"], d["run"]["out"]
    assert da == base
    budgets = load_config("da-dler").reward.da_dler.make_budgets()
    assert budgets.budget_for_ratio(0.5) == 2000 and budgets.budget_for_ratio(0.25) == 4000  # easy -> short
    assert load_config("r1-distill-7b-dler").reward.da_dler.make_budgets() is None


def test_grpo_demo_differs_from_the_demo_only_in_the_algorithm():
    grpo, dler = load_config("toy-cpu-grpo"), load_config("toy-cpu")
    assert (grpo.algorithm.advantage, grpo.algorithm.clip_c) == ("grpo", None)
    assert grpo.rollout.sampling.dynamic_sampling is False
    assert grpo.algorithm.eps_low == grpo.algorithm.eps_high
    assert (grpo.model, grpo.data, grpo.reward, grpo.optim) == (dler.model, dler.data, dler.reward, dler.optim)


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_of_each_type():
    cfg = load_config(
        "toy-cpu",
        [
            "optim.lr=1e-6",  # PyYAML reads this as a string
            "algorithm.eps=1e-8",
            "fsdp.cpu_offload=true",
            "algorithm.clip_c=null",
            "reward.da_dler.thresholds=[0.5]",
            "reward.da_dler.budgets=[128, 64]",
            "optim.betas=[0.9, 0.95]",
            "rollout.sampling.samples_per_prompt=4",
            "run.steps=1e3",
            "model.path=yes",  # YAML would read a boolean; a string field keeps the text
        ],
    )
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.algorithm.eps == 1e-8
    assert cfg.fsdp.cpu_offload is True
    assert cfg.algorithm.clip_c is None
    assert cfg.reward.da_dler.thresholds == (0.5,) and cfg.reward.da_dler.budgets == (128, 64)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.rollout.sampling.samples_per_prompt == 4
    assert cfg.run.steps == 1000 and isinstance(cfg.run.steps, int)
    assert cfg.model.path == "yes"


def test_override_of_a_section_merges_into_it():
    cfg = load_config("toy-cpu", ["reward.penalty={name: overlong, overlong_buffer: 32}"])
    assert (cfg.reward.penalty.name, cfg.reward.penalty.overlong_buffer) == ("overlong", 32)
    assert cfg.reward.penalty.length_budget == 80  # kept from the preset


def test_later_override_wins():
    assert load_config("toy-cpu", ["run.steps=3", "run.steps=5"]).run.steps == 5


def test_yaml_file_floats_in_e_notation(tmp_path):
    path = _write(tmp_path / "c.yaml", "optim:\n  lr: 1e-6\n  eps: 1e-8\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.eps) == (1e-6, 1e-8)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithm.eps_hgih=0.3", "did you mean 'algorithm.eps_high'"),
        ("lr=1e-6", "did you mean 'optim.lr'"),
        ("algorithm.lr=1e-6", "did you mean 'optim.lr'"),
        ("rollout.sampling.prompts_per_stp=4", "did you mean 'rollout.sampling.prompts_per_step'"),
    ],
)
def test_unknown_key_suggests_the_closest(override, expected):
    with pytest.raises(UserError, match="unknown config key") as e:
        load_config("toy-cpu", [override])
    assert expected in str(e.value)
    assert "valid keys" in str(e.value)


def test_unknown_key_in_a_file_names_file_and_dotted_key(tmp_path):
    path = _write(tmp_path / "c.yaml", {"reward": {"penalty": {"lenght_budget": 100}}})
    with pytest.raises(UserError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path.name) in message and "'reward.penalty.lenght_budget'" in message
    assert "did you mean 'reward.penalty.length_budget'" in message


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("run.steps=abc", ["run.steps", '"abc"', "an integer"]),
        ("run.steps=1.5", ["run.steps", "1.5", "an integer"]),
        ("optim.lr=fast", ["optim.lr", '"fast"', "a number"]),
        ("fsdp.cpu_offload=maybe", ["fsdp.cpu_offload", '"maybe"', "true or false"]),
        ("optim.betas=[0.9]", ["optim.betas", "[0.9]", "a list of 2 numbers"]),
        ("reward.da_dler.budgets=[100, x]", ["reward.da_dler.budgets[1]", '"x"', "an integer"]),
        ("reward.penalty=3", ["reward.penalty", "3", "a mapping"]),
        ("run.steps=null", ["run.steps", "null", "an integer"]),
    ],
)
def test_bad_type_names_key_value_and_type(override, parts):
    with pytest.raises(UserError) as e:
        load_config("toy-cpu", [override])
    for part in parts:
        assert part in str(e.value)


def test_malformed_overrides():
    with pytest.raises(UserError, match="key=value"):
        load_config("toy-cpu", ["run.steps"])
    with pytest.raises(UserError, match="not a section"):
        load_config("toy-cpu", ["run.steps.x=1"])
    with pytest.raises(TypeError):
        load_config("toy-cpu", "run.steps=3")


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'toy-cpu'"):
        load_config("toy-cpuu")


# ---------------------------------------------------------------------------------------------- inheritance


def test_inheritance_by_name_and_relative_path(tmp_path):
    _write(tmp_path / "base.yaml", {"inherit": "toy-cpu", "optim": {"lr": 2e-5}, "run": {"steps": 7}})
    _write(tmp_path / "child.yaml", {"inherit": "base.yaml", "run": {"steps": 9}})
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.run.steps) == (2e-5, 9)
    assert cfg.model == load_config("toy-cpu").model  # from the grandparent
    assert cfg.rollout.sampling.max_tokens == 80  # a nested key the children never touched


def test_inheritance_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    _write(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


# ------------------------------------------------------------------------------------------ duplicated keys


def test_a_duplicated_key_in_a_config_file_is_an_error_naming_the_file_the_key_and_both_lines(tmp_path, capsys):
    from trainer.cli import main

    path = _write(tmp_path / "run.yaml", "inherit: toy-cpu\noptim:\n  lr: 1.0e-6\n  warmup_steps: 3\n  lr: 5.0e-6\n")
    message = f"{path}: key 'optim.lr' is given twice (lines 3 and 5)"
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(path)
    assert main(["train", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_duplicated_section_in_an_inherited_preset_is_an_error_naming_that_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "inherit: toy-cpu\nrun:\n  steps: 3\noptim: {lr: 1.0e-6}\nrun: {seed: 4}\n")
    _write(tmp_path / "child.yaml", "inherit: base.yaml\n")
    with pytest.raises(UserError, match=re.escape(f"{base}: key 'run' is given twice (lines 2 and 5)")):
        load_config(tmp_path / "child.yaml")


def test_a_duplicated_key_in_an_override_value_is_an_error():
    with pytest.raises(UserError, match=re.escape("key 'temperature' is given twice")):
        load_config("toy-cpu", ["rollout.sampling={temperature: 1.0, temperature: 0.5}"])


# ------------------------------------------------------------------------------------------ serialisation


@pytest.mark.parametrize("preset", list_presets())
def test_save_load_round_trip(tmp_path, preset):
    cfg = load_config(preset, ["optim.lr=3e-7", "algorithm.clip_c=null"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    json.dumps(to_dict(cfg))  # plain data
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left behind
    assert path.read_text().startswith("#")


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config("toy-cpu"), path)
    save_config(load_config("smollm2"), path)
    assert load_config(path) == load_config("smollm2")


def test_from_dict_keeps_defaults_and_checks_keys():
    assert from_dict({}) == TrainConfig()
    assert from_dict({"run": {"steps": 3}}).run.steps == 3
    with pytest.raises(UserError, match="did you mean 'run.steps'"):
        from_dict({"run": {"stepz": 3}})


# ------------------------------------------------------------------------------------------------ validation


def test_temperature_mismatch_names_both():
    with pytest.raises(UserError) as e:
        load_config("toy-cpu", ["rollout.sampling.temperature=0.6"])
    assert "algorithm.temperature (1.0)" in str(e.value) and "rollout.sampling.temperature (0.6)" in str(e.value)
    cfg = load_config("toy-cpu", ["rollout.sampling.temperature=0.6", "algorithm.allow_temperature_mismatch=true"])
    assert cfg.policy_loss_kwargs()["temperature"] == 1.0
    assert load_config("toy-cpu", ["rollout.sampling.temperature=0.6", "algorithm.temperature=0.6"])


def test_mini_batch_must_divide_the_batch():
    with pytest.raises(UserError, match=r"prompts_per_step \(8\) must be a multiple of algorithm.mini_batch_prompts"):
        load_config("toy-cpu", ["algorithm.mini_batch_prompts=3"])
    with pytest.raises(UserError, match="larger than the batch"):
        load_config("toy-cpu", ["algorithm.mini_batch_prompts=16"])


def test_impossible_lengths():
    with pytest.raises(UserError, match="above the max response length"):
        load_config("toy-cpu", ["reward.penalty.length_budget=4000"])
    with pytest.raises(UserError, match="reward.da_dler.budgets"):
        load_config("toy-cpu", ["reward.da_dler.enabled=true", "reward.da_dler.budgets=[256, 64]"])
    with pytest.raises(UserError, match="micro_batch_tokens"):
        load_config("toy-cpu", ["algorithm.micro_batch_tokens=100"])
    with pytest.raises(UserError, match="max_model_len"):
        load_config("toy-cpu", ["rollout.max_model_len=200"])
    # A penalty without a budget does not constrain max_tokens.
    assert load_config("toy-cpu", ["reward.penalty.name=none", "reward.penalty.length_budget=4000"])


def test_section_errors_name_the_field():
    with pytest.raises(UserError, match=r"model: dtype must be one of 'float32', 'bfloat16'; got 'fp16'"):
        load_config("toy-cpu", ["model.dtype=fp16"])
    with pytest.raises(UserError, match="rollout.sampling: prompts_per_step must be >= 1"):
        load_config("toy-cpu", ["rollout.sampling.prompts_per_step=0"])
    with pytest.raises(UserError, match="reward.da_dler: thresholds must be strictly increasing"):
        load_config("toy-cpu", ["reward.da_dler.thresholds=[0.6, 0.4]", "reward.da_dler.budgets=[3, 2, 1]"])
    with pytest.raises(UserError, match="eval.data"):
        load_config("toy-cpu", ["run.eval_every=2", "eval.data=null"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="kl_type must be one of"):
        AlgorithmConfig(kl_type="k4")
    with pytest.raises(ValueError, match="budgets needs one entry more"):
        DADLERConfig(thresholds=(0.5,), budgets=(4000,))


def test_new_length_control_settings_are_checked_with_their_keys():
    with pytest.raises(UserError, match="reward.budget_schedule: budget schedule decay must be in"):
        load_config("toy-cpu", ["reward.budget_schedule.decay=1.5"])
    with pytest.raises(UserError, match="reward.budget_schedule: budget schedule every must be >= 1"):
        load_config("toy-cpu", ["reward.budget_schedule.every=0"])
    with pytest.raises(UserError, match="reward.budget_schedule shrinks the length budget.*kimi"):
        load_config("toy-cpu", ["reward.budget_schedule.enabled=true", "reward.penalty.name=kimi"])
    with pytest.raises(UserError, match="rollout.sampling: gfpo_sample_size .8. must be larger"):
        load_config("toy-cpu", ["rollout.sampling.gfpo_sample_size=8"])
    with pytest.raises(UserError, match="gfpo_metric must be one of"):
        load_config("toy-cpu", ["rollout.sampling.gfpo_metric=reward"])
    with pytest.raises(UserError, match="reward.penalty: alp_beta must be >= 0"):
        load_config("toy-cpu", ["reward.penalty.alp_beta=-1"])
    cfg = load_config("toy-cpu", ["reward.penalty.name=alp", "rollout.sampling.gfpo_sample_size=16"])
    assert cfg.reward.penalty.name == "alp" and cfg.rollout.sampling.gfpo_sample_size == 16


# ------------------------------------------------------------------------------------ what the trainer reads


def test_derived_arguments_fit_the_components():
    from dler_kernels import compute_advantages, policy_loss
    from trainer.rollout.hf_engine import HFEngine
    from trainer.rollout.vllm_engine import VLLMEngine

    cfg = load_config("r1-distill-7b-dler")
    for kwargs, fn in [
        (cfg.policy_loss_kwargs(), policy_loss),
        (cfg.advantage_kwargs(), compute_advantages),
        (cfg.reward.checker_kwargs(), AnswerChecker),
        (cfg.engine_kwargs(), VLLMEngine),
        (load_config("toy-cpu", ["rollout.engine=hf"]).engine_kwargs(), HFEngine),
    ]:
        assert set(kwargs) <= set(inspect.signature(fn).parameters), fn
    assert cfg.engine_kwargs()["max_model_len"] == 1024 + 4000
    assert cfg.policy_loss_kwargs()["norm_length"] is None
    norm = load_config("toy-cpu", ["algorithm.loss_agg=seq-mean-token-sum-norm"]).policy_loss_kwargs()
    assert norm["norm_length"] == 80.0
    assert cfg.fsdp.active(1) is True and load_config("smollm2").fsdp.active(1) is False


def test_describe_mentions_model_data_and_penalty():
    cfg = load_config("da-dler")
    text = describe(cfg)
    assert cfg.model.path in text and cfg.data.train in text
    assert "truncation penalty" in text and "[4000, 2000]" in text
    assert len(text.splitlines()) <= 10
    assert "budget 80" in describe(load_config("toy-cpu"))


def test_describe_mentions_gfpo_and_the_budget_schedule_when_on():
    on = [
        "rollout.sampling.gfpo_sample_size=16",
        "reward.budget_schedule.enabled=true",
        "reward.budget_schedule.every=5",
    ]
    text = describe(load_config("toy-cpu", on))
    assert "8 samples (GFPO: the best of 16 by length)" in text
    assert "budget 80, x0.75 every 5 steps (floor 1)" in text
    off = describe(load_config("toy-cpu"))
    assert "GFPO" not in off and "every" not in off.split("reward")[1].split("\n")[0]


def test_lm_head_fp32_reaches_the_trainer_and_the_vllm_engine():
    default = load_config("toy-cpu")
    assert default.algorithm.lm_head_fp32 is False and default.engine_kwargs()["lm_head_fp32"] is False
    cfg = load_config("toy-cpu", ["algorithm.lm_head_fp32=true", "rollout.lm_head_fp32=true"])
    assert cfg.algorithm.lm_head_fp32 is True and cfg.engine_kwargs()["lm_head_fp32"] is True
    printed = to_dict(cfg)  # what --print-config shows
    assert printed["algorithm"]["lm_head_fp32"] is True and printed["rollout"]["lm_head_fp32"] is True
    with pytest.raises(UserError, match="rollout: lm_head_fp32 needs engine 'vllm'.*rollout.dtype=float32"):
        load_config("toy-cpu", ["rollout.engine=hf", "rollout.lm_head_fp32=true"])
    with pytest.raises(UserError, match="algorithm.lm_head_fp32.*true or false"):
        load_config("toy-cpu", ["algorithm.lm_head_fp32=maybe"])


def test_describe_names_the_rollout_correction_the_bypass_and_the_fp32_head_when_on():
    line = describe(load_config("toy-cpu", ["algorithm.rollout_correction.mode=token_tis"])).splitlines()[4]
    assert line.endswith("; rollout correction token_tis cap 2")
    icepop = describe(load_config("toy-cpu", ["algorithm.rollout_correction.mode=icepop"]))
    assert "rollout correction icepop [0.5, 5]" in icepop
    bypass = describe(load_config("toy-cpu", ["algorithm.old_logprobs=sampler", "algorithm.lm_head_fp32=true"]))
    assert "old log-probs from the sampler (bypass); fp32 LM head (trainer)" in bypass
    off = describe(load_config("toy-cpu")).splitlines()[4]
    assert off.endswith("optimizer step(s) per step")


# ------------------------------------------------------------------------------------------ objectives


def test_the_objective_and_its_parameters_come_from_the_algorithm_section():
    cfg = load_config("toy-cpu", ["algorithm.objective=sapo", "algorithm.tau_neg=1.2"])
    kwargs = cfg.policy_loss_kwargs()
    assert (kwargs["objective"], kwargs["tau_neg"], kwargs["tau_pos"]) == ("sapo", 1.2, None)  # None: the default
    assert cfg.algorithm.objective_params() == {"tau_pos": 1.0, "tau_neg": 1.2}
    assert "sapo, tau_pos 1, tau_neg 1.2" in describe(cfg)
    # every loss option of the kernels is a key of the algorithm section, declared once (LossSettings)
    from dler_kernels.loss_inputs import LOSS_OPTION_NAMES

    assert set(LOSS_OPTION_NAMES) - {"normalizer"} <= set(kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.objective=gpso"], r"objective must be one of .* got 'gpso' \(did you mean 'gspo'\?\)"),
        (["algorithm.objective=gspo", "algorithm.tau_pos=1"], "tau_pos=1.0 means nothing for objective='gspo'"),
        (["algorithm.objective=sapo", "algorithm.eps_low=0.2"], "eps_low=0.2 means nothing for objective='sapo'"),
        (["algorithm.objective=ppo_clip", "algorithm.clip_c=0.5"], "clip_c must be > 1.0"),
        (["algorithm.objective=cispo", "algorithm.cispo_clip=lower"], "cispo_clip must be one of 'both', 'upper'"),
        (["algorithm.objective=dppo_tv", "algorithm.clip_c=3"], "clip_c=3.0 means nothing for objective='dppo_tv'"),
    ],
)
def test_bad_objective_settings_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        load_config("toy-cpu", overrides)
    assert "\n" not in str(err.value)
