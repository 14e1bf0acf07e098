"""The trainer's configuration: nested dataclasses, YAML presets, ``key=value`` overrides.

One :class:`TrainConfig` describes a run completely. It is built by :func:`load_config` from a preset
(``configs/<name>.yaml`` in the repository, or any YAML file), which may ``inherit:`` another preset, and
then the command line's ``section.key=value`` overrides; :func:`save_config` writes the fully resolved result
into the run folder, so that every run carries the exact record it was trained with and ``load_config`` on
that file gives the same config back.

Settings of components that already have a dataclass are that dataclass (``SamplingConfig``,
``LengthPenaltyConfig``, ``FieldMap``): one definition and one validation per setting. Each dataclass checks
its own fields in ``__post_init__``; :class:`TrainConfig` checks the combinations (temperatures, batch
divisibility, lengths), so an impossible config fails before any model is loaded.

Errors: what a user wrote (a preset, a YAML file, an override, a dict given to :func:`from_dict`) is reported
as :class:`~trainer.fsutil.UserError` naming the dotted key; building the dataclasses directly in Python with
bad values raises ``ValueError``, the convention of the rest of ``trainer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dler_kernels._validate import check_choice, check_number
from dler_kernels.reference import ADVANTAGE_METHODS, KL_TYPES, LOSS_AGGS, WEIGHTINGS

from .data import TEMPLATES, FieldMap
from .engines import ENGINES
from .fsutil import UserError, atomic_file
from .rewards import DifficultyBudgets, LengthPenaltyConfig
from .sampling import SamplingConfig

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_PRESET",
    "AlgorithmConfig",
    "DADLERConfig",
    "DataConfig",
    "EvalConfig",
    "FSDPConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TrainConfig",
    "describe",
    "from_dict",
    "list_presets",
    "load_config",
    "save_config",
    "to_dict",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = "toy-cpu"
INHERIT_KEY = "inherit"

CHECKER_MODES = ("math", "exact")  # trainer.answers.AnswerChecker's modes
POLICY_DTYPES = ("float32", "bfloat16")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # what both rollout engines accept
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
# Penalties that read no length budget: a max_tokens below length_budget is no contradiction for them.
_BUDGET_FREE_PENALTIES = ("none", "kimi")


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig:
    """The policy to train: what ``trainer.models.resolve_model`` accepts (an alias such as ``smollm2``, a
    local Hugging Face folder), or a hub id where the machine has internet. ``dtype`` is the dtype of the
    trainer's own (master) parameters; FSDP's ``param_dtype`` is what the forward computes in."""

    path: str = "smollm2"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not self.path:
            raise ValueError("path must name a model (an alias, a folder or a hub id)")
        check_choice("dtype", self.dtype, POLICY_DTYPES)
        check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class DataConfig:
    """Training prompts: ``train``, ``split``, ``limit``, ``fields``, ``on_bad_row`` and ``seed`` go to
    ``trainer.data.load_examples``; ``template``, ``chat``, ``max_prompt_tokens`` and ``on_bad_row`` (a prompt
    over ``max_prompt_tokens`` is a bad row too) to ``build_prompts``; ``shuffle`` and ``seed`` to
    ``PromptStream``. ``max_prompt_tokens`` also sizes the engine's context."""

    train: str = "builtin:toy-arith?difficulty=1-3&size=2000"
    split: str = "train"
    limit: int | None = None
    fields: FieldMap = field(default_factory=FieldMap)
    on_bad_row: str = "skip"
    template: str = "r1"
    chat: bool = True
    max_prompt_tokens: int | None = 1024
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.train:
            raise ValueError("train must name a data set (a file, a datasets folder, or builtin:NAME)")
        check_choice("on_bad_row", self.on_bad_row, ("skip", "error"))
        check_choice("template", self.template, tuple(TEMPLATES))
        check_number("limit", self.limit, low=1, allow_none=True)
        check_number("max_prompt_tokens", self.max_prompt_tokens, low=1, allow_none=True)


@dataclass
class RolloutConfig:
    """The rollout engine (``trainer.engines.make_engine``) and how it samples (``SamplingConfig``).

    ``gpu_memory_utilization`` None keeps the engine's default (vLLM: 0.85 on CUDA, 0.15 of host memory on
    a CPU); ``max_model_len`` None is the longest prompt plus the longest response (training or evaluation).
    ``sleep_level``: how vLLM frees the device during the update where it can sleep (CUDA): 1 offloads
    the weights to host memory, 2 discards them (no host copy; the weight sync reloads them anyway).
    """

    engine: str = "vllm"
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    sleep_level: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        check_choice("engine", self.engine, ENGINES)
        check_choice("dtype", self.dtype, ENGINE_DTYPES)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] or null; got {self.gpu_memory_utilization}")
        check_number("max_model_len", self.max_model_len, low=1, allow_none=True)
        check_number("tensor_parallel_size", self.tensor_parallel_size, low=1, allow_none=True)
        check_choice("sleep_level", self.sleep_level, (1, 2))
        check_number("sampling.temperature", self.sampling.temperature, low=0.0, low_open=True, allow_none=True)
        if not 0 < self.sampling.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1]; got {self.sampling.top_p}")


@dataclass
class DADLERConfig:
    """DA-DLER, difficulty-aware budgets, in ``DifficultyBudgets``' convention: a prompt whose correctness
    ratio passes j of the ``thresholds`` gets ``budgets[j]``, so an easy prompt (ratio >= 0.5 with the
    paper's ``thresholds: [0.5]``) gets the later, shorter budget of ``budgets: [4000, 2000]``."""

    enabled: bool = False
    thresholds: tuple[float, ...] = (0.5,)
    budgets: tuple[int, ...] = (4000, 2000)
    source: str = "current"

    def __post_init__(self):
        self.thresholds, self.budgets = tuple(self.thresholds), tuple(self.budgets)
        self._budgets()  # DifficultyBudgets validates: one budget more than thresholds, increasing thresholds

    def _budgets(self) -> DifficultyBudgets:
        return DifficultyBudgets(thresholds=self.thresholds, budgets=self.budgets, source=self.source)

    def make_budgets(self) -> DifficultyBudgets | None:
        """The per-prompt budget tracker for ``DynamicSampler``, or None when DA-DLER is off."""
        return self._budgets() if self.enabled else None


@dataclass
class RewardConfig:
    """Correctness (``trainer.answers.AnswerChecker``) times a length penalty, with optional DA-DLER budgets."""

    checker: str = "math"
    require_think: bool = False
    fallback_last_number: bool = False
    timeout_s: float = 2.0
    workers: int = 1
    penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    da_dler: DADLERConfig = field(default_factory=DADLERConfig)

    def __post_init__(self):
        check_choice("checker", self.checker, CHECKER_MODES)
        check_number("timeout_s", self.timeout_s, low=0.0, low_open=True, allow_none=True)
        check_number("workers", self.workers, low=1, allow_none=True)
        if self.penalty.name == "drqa" and self.da_dler.enabled:
            raise ValueError(
                "reward.penalty.name=drqa takes each question's budget from its DRQA data; it cannot be combined "
                "with reward.da_dler (turn one off)"
            )

    def checker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``AnswerChecker``."""
        return dict(
            mode=self.checker,
            require_think=self.require_think,
            fallback_last_number=self.fallback_last_number,
            timeout_s=self.timeout_s,
            workers=self.workers,
        )

    @property
    def largest_budget(self) -> int:
        """The longest length budget any prompt can get: what rollouts must be able to generate."""
        return max(self.da_dler.budgets) if self.da_dler.enabled else self.penalty.length_budget


@dataclass
class AlgorithmConfig:
    """Advantages (``dler_kernels.compute_advantages``), the policy loss (``dler_kernels.policy_loss``) and
    how one step's batch is cut into optimizer steps.

    ``temperature`` divides the training logits and must equal the sampling temperature, or the loss would
    score a distribution other than the one sampled (``allow_temperature_mismatch`` permits it on purpose).
    ``clip_c`` None disables the dual clip; ``beta`` 0 needs no reference model; ``norm_length`` (the
    constant of ``seq-mean-token-sum-norm``) None means the max response length. One step's
    ``prompts_per_step`` prompts are split into mini-batches of ``mini_batch_prompts`` prompts, one optimizer
    step each, for ``epochs_per_step`` passes; a mini-batch runs in micro-batches of at most
    ``micro_batch_tokens`` packed tokens. ``use_fused_linear``: the loss and old/ref log-probs from the
    hidden states and the LM head weight (``dler_kernels.linear_policy_loss``: no [tokens, vocab] logits),
    for every model whose logits are the plain ``nn.Linear`` head's output; others (soft-capped or
    scaled logits) warn and take the logits path.
    """

    advantage: str = "dler"
    weighting: str = "token"
    eps: float = 1e-6
    loss_agg: str = "token-mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float | None = 10.0
    beta: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    allow_temperature_mismatch: bool = False
    norm_length: float | None = None
    mini_batch_prompts: int = 8
    epochs_per_step: int = 1
    micro_batch_tokens: int = 16384
    use_fused_linear: bool = True

    def __post_init__(self):
        check_choice("advantage", self.advantage, ADVANTAGE_METHODS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        check_choice("kl_type", self.kl_type, KL_TYPES)
        check_number("eps", self.eps, low=0.0, low_open=True, allow_none=True)
        if not 0 <= self.eps_low <= 1:
            raise ValueError(f"eps_low must be in [0, 1]; got {self.eps_low}")
        check_number("eps_high", self.eps_high, low=0.0, allow_none=True)
        check_number("clip_c", self.clip_c, low=1.0, low_open=True, allow_none=True)
        check_number("beta", self.beta, low=0.0, allow_none=True)
        check_number("temperature", self.temperature, low=0.0, low_open=True, allow_none=True)
        check_number("norm_length", self.norm_length, low=0.0, low_open=True, allow_none=True)
        for name in ("mini_batch_prompts", "epochs_per_step", "micro_batch_tokens"):
            check_number(name, getattr(self, name), low=1, allow_none=True)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: linear warmup over ``warmup_steps``, then ``schedule`` down to
    ``lr * min_lr_ratio`` at the last step (``constant`` stays at ``lr``). ``grad_clip`` None: no clipping."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        check_number("lr", self.lr, low=0.0, low_open=True, allow_none=True)
        check_number("weight_decay", self.weight_decay, low=0.0, allow_none=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {list(self.betas)}")
        check_number("eps", self.eps, low=0.0, low_open=True, allow_none=True)
        check_number("warmup_steps", self.warmup_steps, low=0, allow_none=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        check_number("grad_clip", self.grad_clip, low=0.0, low_open=True, allow_none=True)


@dataclass
class FSDPConfig:
    """FSDP2 sharding of the policy (and reference) model. ``enabled`` None: on when the world size is > 1.
    ``param_dtype`` is what the forward and backward compute in, ``reduce_dtype`` what gradients are
    reduced in; the master weights keep ``model.dtype``."""

    enabled: bool | None = None
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self):
        check_choice("param_dtype", self.param_dtype, POLICY_DTYPES)
        check_choice("reduce_dtype", self.reduce_dtype, POLICY_DTYPES)

    def active(self, world_size: int) -> bool:
        """Whether to shard with ``world_size`` processes."""
        return world_size > 1 if self.enabled is None else self.enabled


@dataclass
class EvalConfig:
    """Held-out evaluation (accuracy and mean response length), read with ``data``'s fields and template.

    With ``data`` set, the trainer evaluates before the first step and after the last (the before/after
    table), and every ``run.eval_every`` steps in between. ``max_tokens`` None is the training max response
    length. Defaults follow the paper's protocol (temperature 0.6, top-p 0.95), with fewer samples.
    """

    data: str | None = None
    limit: int | None = 256
    samples_per_prompt: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int | None = None

    def __post_init__(self):
        check_number("limit", self.limit, low=1, allow_none=True)
        check_number("samples_per_prompt", self.samples_per_prompt, low=1, allow_none=True)
        check_number("temperature", self.temperature, low=0.0, allow_none=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        check_number("max_tokens", self.max_tokens, low=1, allow_none=True)


@dataclass
class RunConfig:
    """Where the run writes and how long it lasts. ``steps`` counts training steps (one rollout batch each);
    ``save_every`` 0 checkpoints only at the end; the last ``keep_checkpoints`` checkpoints are kept;
    ``eval_every`` 0 evaluates only before and after training. ``device`` auto: CUDA when available."""

    out: str = "runs/dler"
    steps: int = 100
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0
    tensorboard: bool = False
    wandb_project: str | None = None
    device: str = "auto"

    def __post_init__(self):
        if not self.out:
            raise ValueError("out must name the run's output folder")
        check_number("steps", self.steps, low=1, allow_none=True)
        for name in ("save_every", "eval_every"):
            check_number(name, getattr(self, name), low=0, allow_none=True)
        for name in ("keep_checkpoints", "log_every"):
            check_number(name, getattr(self, name), low=1, allow_none=True)
        check_choice("device", self.device, DEVICES)


# ------------------------------------------------------------------------------------------------ the root


@dataclass
class TrainConfig:
    """Everything a training run reads; see each section's class for its fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self._check_temperature()
        self._check_batches()
        self._check_lengths()
        self._check_device()
        if self.run.eval_every > 0 and self.eval.data is None:
            raise ValueError(f"run.eval_every={self.run.eval_every} needs eval.data (the held-out prompts)")

    def _check_temperature(self) -> None:
        train, sample = self.algorithm.temperature, self.rollout.sampling.temperature
        if train != sample and not self.algorithm.allow_temperature_mismatch:
            raise ValueError(
                f"algorithm.temperature ({train}) differs from rollout.sampling.temperature ({sample}): the loss "
                "would score another distribution than the one sampled; set both to the same value (or "
                "algorithm.allow_temperature_mismatch=true to do this on purpose)"
            )

    def _check_batches(self) -> None:
        batch, mini = self.rollout.sampling.prompts_per_step, self.algorithm.mini_batch_prompts
        if mini > batch:
            raise ValueError(
                f"algorithm.mini_batch_prompts ({mini}) is larger than the batch, "
                f"rollout.sampling.prompts_per_step ({batch})"
            )
        if batch % mini:
            raise ValueError(
                f"rollout.sampling.prompts_per_step ({batch}) must be a multiple of algorithm.mini_batch_prompts "
                f"({mini}): each optimizer step takes one mini-batch of whole prompt groups"
            )

    def _check_lengths(self) -> None:
        max_tokens, budget = self.rollout.sampling.max_tokens, self.reward.largest_budget
        budget_used = self.reward.da_dler.enabled or self.reward.penalty.name not in _BUDGET_FREE_PENALTIES
        if max_tokens is not None and budget_used and max_tokens < budget:
            which = "reward.da_dler.budgets" if self.reward.da_dler.enabled else "reward.penalty.length_budget"
            raise ValueError(
                f"the length budget {which} ({budget}) is above the max response length "
                f"rollout.sampling.max_tokens ({max_tokens}): no response could reach it; raise max_tokens or "
                "lower the budget"
            )
        if self.data.max_prompt_tokens is None and self.rollout.max_model_len is None:
            raise ValueError("set data.max_prompt_tokens or rollout.max_model_len: the engine's context needs a size")
        needed = self._context_needed()
        if needed is not None and self.rollout.max_model_len is not None and self.rollout.max_model_len < needed:
            raise ValueError(
                f"rollout.max_model_len ({self.rollout.max_model_len}) is below data.max_prompt_tokens "
                f"({self.data.max_prompt_tokens}) + the longest response ({needed - self.data.max_prompt_tokens})"
            )
        longest = self.max_sequence_tokens
        if longest is not None and self.algorithm.micro_batch_tokens < longest:
            raise ValueError(
                f"algorithm.micro_batch_tokens ({self.algorithm.micro_batch_tokens}) cannot hold one full sequence "
                f"(data.max_prompt_tokens + max response = {longest} tokens); raise it to at least {longest}"
            )

    def _check_device(self) -> None:
        if self.model.attn_implementation == "flash_attention_2" and self.run.device == "cpu":
            raise ValueError("model.attn_implementation 'flash_attention_2' needs CUDA; run.device is 'cpu'")

    @property
    def max_response_tokens(self) -> int:
        """What rollouts generate up to: ``max_tokens``, else the largest length budget (as ``DynamicSampler``)."""
        max_tokens = self.rollout.sampling.max_tokens
        return max_tokens if max_tokens is not None else self.reward.largest_budget

    @property
    def max_sequence_tokens(self) -> int | None:
        """The longest training sequence, prompt plus response (None when prompts are not capped)."""
        if self.data.max_prompt_tokens is None:
            return None
        return self.data.max_prompt_tokens + self.max_response_tokens

    @property
    def eval_max_tokens(self) -> int:
        """What evaluation generates up to: ``eval.max_tokens``, else the training max response length."""
        return self.eval.max_tokens if self.eval.max_tokens is not None else self.max_response_tokens

    def _context_needed(self) -> int | None:
        if self.data.max_prompt_tokens is None:
            return None
        longest = max(self.max_response_tokens, self.eval_max_tokens if self.eval.data is not None else 0)
        return self.data.max_prompt_tokens + longest

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``trainer.engines.make_engine`` (after its ``kind`` and model folder)."""
        options: dict[str, Any] = dict(dtype=self.rollout.dtype, seed=self.run.seed)
        if self.rollout.engine == "hf":
            options["device"] = None if self.run.device == "auto" else self.run.device
            return options
        max_model_len = self.rollout.max_model_len
        return dict(
            options,
            max_model_len=max_model_len if max_model_len is not None else self._context_needed(),
            gpu_memory_utilization=self.rollout.gpu_memory_utilization,
            tensor_parallel_size=self.rollout.tensor_parallel_size,
            sleep_level=self.rollout.sleep_level,
        )

    def advantage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dler_kernels.compute_advantages``."""
        a = self.algorithm
        return dict(
            method=a.advantage,
            weighting=a.weighting,
            eps=a.eps,
            dynamic_sampling=self.rollout.sampling.dynamic_sampling,
        )

    def policy_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dler_kernels.policy_loss`` / ``linear_policy_loss`` set by the config."""
        a = self.algorithm
        norm_length = a.norm_length if a.norm_length is not None else float(self.max_response_tokens)
        return dict(
            eps_low=a.eps_low,
            eps_high=a.eps_high,
            clip_c=a.clip_c,
            beta=a.beta,
            kl_type=a.kl_type,
            entropy_coef=a.entropy_coef,
            temperature=a.temperature,
            loss_agg=a.loss_agg,
            norm_length=norm_length if a.loss_agg == "seq-mean-token-sum-norm" else None,
        )


# ------------------------------------------------------------------------------ conversion from plain data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _all_keys(cls: type = TrainConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of ``cls``, sections included: where a misplaced key is looked for."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, dotted + ".")
    return tuple(keys)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: object) -> str:
    """A value as the user wrote it (YAML/JSON spelling: null, true, "text")."""
    return json.dumps(value, default=str)


def _expected(tp: Any) -> str:
    """The English name of an annotation, for messages."""
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[tp]


class _BadValue(Exception):
    """Internal: a value does not fit its annotation (turned into a UserError naming the key)."""


def _number(value: object) -> float | None:
    """A finite number from an int, a float, or a numeric string (PyYAML reads ``1e-6`` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _scalar(value: object, tp: type) -> object:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric name, e.g. run.out=2024
    else:
        raise TypeError(f"config annotation {tp!r} is not supported")
    raise _BadValue


def _convert(value: object, tp: Any, key: str, origin: str) -> object:
    """``value`` checked against the annotation ``tp``: numbers of the right kind, lists as tuples, nested
    sections as normalised dicts. Raises UserError naming ``key``, the value and the expected type."""
    if dataclasses.is_dataclass(tp):
        return _normalise(tp, value, key, origin)
    kind, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if kind in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = (a for a in args if a is not type(None))  # only Optional[X] is used
            return _convert(value, inner, key, origin)
        if kind is tuple:
            return _tuple(value, args, key, origin)
        return _scalar(value, tp)
    except _BadValue:
        raise UserError(f"{origin}: {key} must be {_expected(tp)}; got {_show(value)}") from None


def _tuple(value: object, args: tuple, key: str, origin: str) -> tuple:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif variadic and value is not None and not isinstance(value, Mapping):
        items = [value]  # a single threshold may be written without brackets
    else:
        raise _BadValue
    if not variadic and len(items) != len(args):
        raise _BadValue
    types_ = [args[0]] * len(items) if variadic else list(args)
    return tuple(_convert(v, t, f"{key}[{i}]", origin) for i, (v, t) in enumerate(zip(items, types_)))


def _unknown_key(key: str, name: str, cls: type, origin: str) -> UserError:
    """An error for ``key`` that names the closest valid key: at its level, else anywhere in the tree."""
    valid = list(_hints(cls))
    parent = key[: -len(name) - 1] if "." in key else ""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{_join(parent, close[0])}'?"
    else:
        tails = {k: k.rsplit(".", 1)[-1] for k in _all_keys()}
        near = difflib.get_close_matches(name, sorted(set(tails.values())), n=1, cutoff=0.8)
        matches = [k for k, tail in tails.items() if near and tail == near[0]]
        hint = f"; did you mean {' or '.join(repr(k) for k in matches)}?" if matches else ""
    level = f"'{parent}'" if parent else "the top level"
    return UserError(f"{origin}: unknown config key '{key}'{hint} (valid keys at {level}: {', '.join(valid)})")


def _normalise(cls: type, data: object, key: str, origin: str) -> dict[str, Any]:
    """Check the keys and value types of a (partial) section; return it as a dict of converted values."""
    if not isinstance(data, Mapping):
        raise UserError(f"{origin}: {key or 'the config'} must be a mapping of keys; got {_show(data)}")
    hints, out = _hints(cls), {}
    for name, value in data.items():
        dotted = _join(key, str(name))
        if name not in hints:
            raise _unknown_key(dotted, str(name), cls, origin)
        out[name] = _convert(value, hints[name], dotted, origin)
    return out


def _instantiate(cls: type, data: Mapping[str, Any], key: str, origin: str) -> Any:
    """Build ``cls`` from a normalised dict (missing keys keep their defaults); validation errors name the
    section they come from."""
    hints, kwargs = _hints(cls), dict(data)
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _instantiate(hints[name], value, _join(key, name), origin)
    try:
        return cls(**kwargs)
    except ValueError as e:
        where = f"{key}: " if key else ""
        raise UserError(f"{origin}: invalid config: {where}{e}") from None


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merge key by key, values (lists included) replace."""
    out = dict(base)
    for name, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), Mapping):
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------ presets and overrides


def list_presets() -> list[str]:
    """The names of the presets in ``configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _preset_path(ref: str, relative_to: Path | None) -> Path:
    """A preset name (``configs/<name>.yaml``) or a path to a YAML file (relative to the inheriting file)."""
    as_path = Path(ref).expanduser()
    if as_path.suffix in (".yaml", ".yml") or len(as_path.parts) > 1 or as_path.is_file():
        if not as_path.is_absolute() and relative_to is not None:
            as_path = relative_to / as_path
        if not as_path.is_file():
            raise UserError(f"config file {as_path} not found")
        return as_path
    path = CONFIG_DIR / f"{ref}.yaml"
    if not path.is_file():
        presets = list_presets()
        close = difflib.get_close_matches(ref, presets, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown preset {ref!r}{hint} (presets in {CONFIG_DIR}: {', '.join(presets)})")
    return path


class _DuplicateKey(Exception):
    """A mapping of a YAML document repeats a key: its dotted path and the two 1-based lines."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"key '{key}' is given twice (lines {first} and {second}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key in a mapping, where PyYAML keeps the last one silently
    (``lr`` written twice in a long file: one of the two values is ignored without a word).

    Keys brought in by a merge (``<<: *base``) may be overridden by the mapping's own keys, as YAML intends;
    only the mapping's own keys must be unique.
    """

    def construct_document(self, node):
        # Dotted paths of the document's mappings, for messages: construct_mapping sees one node at a time.
        self._paths: dict[int, str] = {}
        stack = [(node, "")]
        while stack:
            current, path = stack.pop()
            if isinstance(current, yaml.MappingNode):
                self._paths[id(current)] = path
                for key, value in current.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    stack.append((value, _join(path, str(name))))
            elif isinstance(current, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(current.value))
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _DuplicateKey(_join(self._paths.get(id(node), ""), str(key)), first_line[key], line)
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`_DuplicateKey` for a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except _DuplicateKey as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys; got {_show(data)}")
    return data


def _read_preset(ref: str, relative_to: Path | None = None, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The normalised tree of a preset, its ``inherit:`` chain applied first (base, then the file's keys)."""
    path = _preset_path(ref, relative_to).resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise UserError(f"presets inherit in a cycle: {chain}")
    raw = _read_yaml(path)
    parent = raw.pop(INHERIT_KEY, None)
    own = _normalise(TrainConfig, raw, "", str(path))
    if parent is None:
        return own
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: {INHERIT_KEY} must name one preset or YAML file; got {_show(parent)}")
    return _merge(_read_preset(parent, path.parent, (*seen, path)), own)


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _apply_override(tree: dict[str, Any], text: str) -> dict[str, Any]:
    """``a.b.c=value``: the value read as YAML (``1e-6``, ``true``, ``null``, ``[4000, 2000]``, ``{...}``)
    and checked against the field's annotation; a string field keeps the raw text when YAML read it as
    something else (``model.path=yes``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} must look like key=value, e.g. optim.lr=1e-6")
    parts, cls = key.split("."), TrainConfig
    for i, name in enumerate(parts):
        if name not in _hints(cls):
            raise _unknown_key(".".join(parts[: i + 1]), name, cls, "override")
        tp = _hints(cls)[name]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"override {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            cls = tp
    try:
        value = _load_yaml(raw)
    except _DuplicateKey as e:
        raise UserError(f"override {text!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    try:
        converted = _convert(value, tp, key, f"override {text!r}")
    except UserError:
        if not (_accepts_str(tp) and raw.strip()):
            raise
        converted = raw.strip()
    for name in reversed(parts):
        converted = {name: converted}
    return _merge(tree, converted)


def load_config(preset_or_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of a preset name (``configs/<name>.yaml``; default ``toy-cpu``) or YAML file, with
    ``key=value`` overrides applied in order. Raises UserError for anything the user can fix."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    ref = str(preset_or_path) if preset_or_path is not None else DEFAULT_PRESET
    tree = _read_preset(ref)
    for text in overrides:
        tree = _apply_override(tree, text)
    origin = f"config {ref!r}" + (f" with {' '.join(overrides)}" if overrides else "")
    return _instantiate(TrainConfig, tree, "", origin)


# ------------------------------------------------------------------------------------------- serialisation


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested dicts, lists and scalars: JSON and YAML serialisable."""
    return _plain(cfg)


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The inverse of :func:`to_dict`; a partial dict keeps the defaults of what it leaves out."""
    return _instantiate(TrainConfig, _normalise(TrainConfig, data, "", "config dict"), "", "config dict")


_SAVED_HEADER = (
    "# The fully resolved training config of this run; trainer.config.load_config(<this file>) reads it back.\n"
)


class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists inline (``budgets: [4000, 2000]``), as the presets are written."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML, atomically (a temporary sibling, fsync, ``os.replace``): a crash leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    text = _SAVED_HEADER + yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    with atomic_file(path) as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------- the summary


def _penalty_text(reward: RewardConfig) -> str:
    p = reward.penalty
    budget = (
        f"DA-DLER budgets {list(reward.da_dler.budgets)} at thresholds {list(reward.da_dler.thresholds)}"
        if reward.da_dler.enabled
        else f"budget {p.length_budget}"
    )
    coef = f", coef {p.truncation_coef:g}" if p.name == "truncation" else ""
    return f"{p.name} penalty, {budget}{coef}"


def describe(cfg: TrainConfig) -> str:
    """A few lines for the console at the start of a run: what is trained, on what, and how."""
    s, a, o, r = cfg.rollout.sampling, cfg.algorithm, cfg.optim, cfg.run
    fsdp = {None: "fsdp auto", True: "fsdp on", False: "fsdp off"}[cfg.fsdp.enabled]
    dual = f", dual clip {a.clip_c:g}" if a.clip_c is not None else ""
    kl = f", KL {a.kl_type} {a.beta:g}" if a.beta > 0 else ""
    dynamic = f", dynamic sampling ({s.max_rounds} rounds)" if s.dynamic_sampling else ""
    updates = s.prompts_per_step // a.mini_batch_prompts * a.epochs_per_step
    clip = "off" if o.grad_clip is None else f"{o.grad_clip:g}"
    lines = [
        f"model      {cfg.model.path} ({cfg.model.dtype} params, {cfg.model.attn_implementation}, {fsdp})",
        f"data       {cfg.data.train} (template {cfg.data.template}, max prompt {cfg.data.max_prompt_tokens} tokens)",
        f"rollout    {cfg.rollout.engine} {cfg.rollout.dtype}: {s.prompts_per_step} prompts x {s.samples_per_prompt} "
        f"samples, max {cfg.max_response_tokens} tokens, T {s.temperature:g}, top-p {s.top_p:g}{dynamic}",
        f"reward     {cfg.reward.checker} checker; {_penalty_text(cfg.reward)}",
        f"algorithm  {a.advantage} advantages, {a.loss_agg}, clip {a.eps_low:g}/{a.eps_high:g}{dual}{kl}; "
        f"{updates} optimizer step(s) per step",
        f"optim      AdamW lr {o.lr:g}, wd {o.weight_decay:g}, {o.schedule}, warmup {o.warmup_steps}, grad clip {clip}",
        f"run        {r.steps} steps -> {r.out} (seed {r.seed}, device {r.device}, checkpoint every "
        f"{r.save_every or r.steps})",
    ]
    return "\n".join(lines)
