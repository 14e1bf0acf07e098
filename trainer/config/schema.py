"""The training config's schema: one dataclass per section, one documented field per setting.

One :class:`TrainConfig` describes a run completely. Each field is written once here, with its type, its
default and one doc line; a field with a fixed set of values is a ``typing.Literal``, and
:func:`check_choices` validates every such field from its annotation, so the choices are written once and
the error lists them. Settings of components that already have a dataclass are that dataclass
(``SamplingConfig``, ``LengthPenaltyConfig``, ``FieldMap``): one definition and one validation per setting.
Each section checks its own fields in ``__post_init__``; :class:`TrainConfig` checks the combinations
(temperatures, batch divisibility, lengths), so an impossible config fails before any model is loaded.
Building the dataclasses in Python with bad values raises ``ValueError``, the convention of ``trainer``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dler_kernels.loss_inputs import LossSettings
from dler_kernels.reference import ADVANTAGE_METHODS, KL_TYPES, LOSS_AGGS, WEIGHTINGS
from dler_kernels.validate import check_choice, check_number

from ..data import TEMPLATES, FieldMap
from ..reward.budgets import BudgetSchedule, DifficultyBudgets, ScheduledBudgets
from ..reward.rewards import LengthPenaltyConfig
from ..rollout.correction import RolloutCorrectionConfig
from ..rollout.engines import ENGINES
from ..rollout.sampling import SamplingConfig

# Choices the config owns are written here; the others are the owning module's list, made a Literal.
PolicyDtype = Literal["float32", "bfloat16"]
EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]  # what both rollout engines accept
AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
Schedule = Literal["constant", "cosine", "linear"]
Device = Literal["auto", "cpu", "cuda"]
CheckerMode = Literal["math", "exact"]  # trainer.reward.answers.AnswerChecker's modes
OnBadRow = Literal["skip", "error"]
SleepLevel = Literal[1, 2]
TemplateName = Literal[tuple(TEMPLATES)]
EngineName = Literal[ENGINES]
AdvantageMethod = Literal[ADVANTAGE_METHODS]
Weighting = Literal[WEIGHTINGS]
LossAgg = Literal[LOSS_AGGS]
KLType = Literal[KL_TYPES]
OldLogprobs = Literal["recompute", "sampler"]  # trainer.train.Trainer.log_probs

DEVICES = typing.get_args(Device)
# Penalties that read no length budget: a max_tokens below length_budget is no contradiction for them.
_BUDGET_FREE_PENALTIES = ("none", "kimi")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a section's init fields (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_choices(section: object) -> None:
    """Raise ValueError for a ``Literal`` field of ``section`` whose value is not one of its choices."""
    for name, tp in field_types(type(section)).items():
        if typing.get_origin(tp) is Literal:
            check_choice(name, getattr(section, name), typing.get_args(tp))


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig:
    """The policy to train."""

    path: str = "smollm2"
    """What ``trainer.models.resolve.resolve_model`` accepts: an alias (``smollm2``), a local folder, or a hub id."""
    dtype: PolicyDtype = "float32"
    """The trainer's own (master) parameters; FSDP's ``param_dtype`` is what the forward computes in."""
    attn_implementation: AttnImplementation = "sdpa"
    """The transformers attention kernel (``flash_attention_2`` needs CUDA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward instead of storing them."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path must name a model (an alias, a folder or a hub id)")
        check_choices(self)


@dataclass
class DataConfig:
    """Training prompts: ``trainer.data.load_examples`` reads them, ``build_prompts`` tokenises them,
    ``PromptStream`` orders them."""

    train: str = "builtin:toy-arith?difficulty=1-3&size=2000"
    """The data set: a .jsonl/.json/.parquet file, a ``datasets`` folder, or ``builtin:NAME?key=value``."""
    split: str = "train"
    """The split of a ``datasets`` folder (DatasetDict)."""
    limit: int | None = None
    """Keep the first ``limit`` rows (None: all)."""
    fields: FieldMap = field(default_factory=FieldMap)
    """Which columns hold the question, the answer and the id."""
    on_bad_row: OnBadRow = "skip"
    """A malformed row, or a prompt over ``max_prompt_tokens``: skip it with one warning, or stop with an error."""
    template: TemplateName = "r1"
    """The prompt template (``trainer.data.TEMPLATES``)."""
    chat: bool = True
    """Wrap the prompt in the tokenizer's chat template."""
    max_prompt_tokens: int | None = 1024
    """The longest prompt kept; it also sizes the engine's context (None: no cap)."""
    shuffle: bool = True
    """A new permutation of the prompts each epoch (else file order)."""
    seed: int = 0
    """Seed of the permutation and of the built-in generators."""

    def __post_init__(self):
        if not self.train:
            raise ValueError("train must name a data set (a file, a datasets folder, or builtin:NAME)")
        check_choices(self)
        check_number("limit", self.limit, low=1, allow_none=True)
        check_number("max_prompt_tokens", self.max_prompt_tokens, low=1, allow_none=True)


@dataclass
class RolloutConfig:
    """The rollout engine (``trainer.rollout.engines.make_engine``) and how it samples (``SamplingConfig``)."""

    engine: EngineName = "vllm"
    """vLLM, or transformers ``generate`` (``hf``)."""
    dtype: EngineDtype = "auto"
    """The engine's compute dtype."""
    gpu_memory_utilization: float | None = None
    """Fraction of device memory for the engine (None: vLLM's default, 0.85 on CUDA, 0.15 of host memory on a CPU)."""
    max_model_len: int | None = None
    """The engine's context (None: the longest prompt plus the longest response, training or evaluation)."""
    tensor_parallel_size: int = 1
    """GPUs one engine spans."""
    sleep_level: SleepLevel = 1
    """How vLLM frees the device during the update (CUDA): 1 offloads the weights to host memory, 2 discards them."""
    lm_head_fp32: bool = False
    """vLLM computes its LM head (and so the sampling log-probs) in float32 (its ``head_dtype`` override)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Prompts and samples per step, max tokens, temperature, top-p, dynamic sampling."""
    async_staleness: int = 0
    """k: 0 samples each step with the newest weights, the engine colocated (sleeping during the update where it
    can); k >= 1 runs the engine in its own process, sampling the batch of step b with the weights of step b-1-k
    while the trainer updates (``trainer.rollout.async_rollout``)."""
    engine_timeout_s: float = 1800.0
    """k >= 1: the longest wait on one call of the engine process before the run fails naming its log."""
    engine_devices: str | None = None
    """k >= 1 on GPUs: the engines' devices, one entry per local rank (``"4,5,6,7"``); None: the trainer's own."""
    engine_threads: int | None = None
    """k >= 1: the engine process's torch threads (None: half the cores on a CPU, as the trainer's; else torch's)."""

    def __post_init__(self):
        check_choices(self)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] or null; got {self.gpu_memory_utilization}")
        check_number("max_model_len", self.max_model_len, low=1, allow_none=True)
        check_number("tensor_parallel_size", self.tensor_parallel_size, low=1, allow_none=True)
        check_number("sampling.temperature", self.sampling.temperature, low=0.0, low_open=True, allow_none=True)
        if not 0 < self.sampling.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1]; got {self.sampling.top_p}")
        if isinstance(self.async_staleness, bool) or not isinstance(self.async_staleness, int):
            raise ValueError(f"async_staleness must be a whole number of steps, got {self.async_staleness!r}")
        check_number("async_staleness", self.async_staleness, low=0)
        check_number("engine_timeout_s", self.engine_timeout_s, low=0.0, low_open=True, allow_none=True)
        check_number("engine_threads", self.engine_threads, low=1, allow_none=True)
        if self.engine_devices is not None and not self.async_staleness:
            raise ValueError("engine_devices places the engine process of async_staleness >= 1; with 0 the engine "
                             "is colocated with the trainer: set async_staleness or drop engine_devices")  # fmt: skip
        if self.lm_head_fp32 and self.engine != "vllm":
            raise ValueError(
                f"lm_head_fp32 needs engine 'vllm' (its head_dtype override); the {self.engine!r} engine computes "
                "its head in rollout.dtype: set rollout.dtype=float32 for a float32 head there"
            )


@dataclass
class DADLERConfig:
    """DA-DLER, difficulty-aware budgets, in ``DifficultyBudgets``' convention: a prompt whose correctness
    ratio passes j of the ``thresholds`` gets ``budgets[j]``, so an easy prompt (ratio >= 0.5 with the
    paper's ``thresholds: [0.5]``) gets the later, shorter budget of ``budgets: [4000, 2000]``."""

    enabled: bool = False
    """Per-prompt budgets instead of ``reward.penalty.length_budget``."""
    thresholds: tuple[float, ...] = (0.5,)
    """Increasing correctness-ratio thresholds (paper: 0.5)."""
    budgets: tuple[int, ...] = (4000, 2000)
    """One budget more than thresholds, in tokens (paper: 4000 hard, 2000 easy)."""
    source: str = "current"
    """Judge a prompt by its group of this step (``current``) or its previous one (``previous``)."""

    def __post_init__(self):
        self.thresholds, self.budgets = tuple(self.thresholds), tuple(self.budgets)
        self._budgets()  # DifficultyBudgets validates: one budget more than thresholds, increasing thresholds

    def _budgets(self) -> DifficultyBudgets:
        return DifficultyBudgets(thresholds=self.thresholds, budgets=self.budgets, source=self.source)

    def make_budgets(self) -> DifficultyBudgets | None:
        """The per-prompt budget tracker for ``DynamicSampler``, or None when DA-DLER is off."""
        return self._budgets() if self.enabled else None


@dataclass
class BudgetScheduleConfig:
    """A length budget that shrinks during training (``trainer.reward.budgets.BudgetSchedule``: ThinkPrune, "Train Long,
    Think Short"): from step t the budget is max(min_budget, round(B * decay^floor((t-1)/every))), where B is the
    prompt's budget without a schedule (``reward.penalty.length_budget``, or its DA-DLER or DRQA budget)."""

    enabled: bool = False
    """Shrink every budget on this schedule."""
    decay: float = 0.75
    """The factor each stage multiplies the budget by, in (0, 1]."""
    every: int = 50
    """Steps per stage."""
    min_budget: int = 1
    """The floor of the budget, in tokens."""

    def __post_init__(self):
        self._schedule()  # BudgetSchedule validates

    def _schedule(self) -> BudgetSchedule:
        return BudgetSchedule(decay=self.decay, every=self.every, min_budget=self.min_budget)

    def wrap(self, budgets, default: int):
        """``budgets`` (per-prompt budgets or None) under this schedule, or ``budgets`` itself when it is off."""
        return ScheduledBudgets(self._schedule(), budgets, default) if self.enabled else budgets


@dataclass
class RewardConfig:
    """Correctness (``trainer.reward.answers.AnswerChecker``) times a length penalty, with optional DA-DLER budgets."""

    checker: CheckerMode = "math"
    """``math`` (math-verify equivalence) or ``exact`` (the normalised strings)."""
    require_think: bool = False
    """The answer must follow the closed ``</think>`` reasoning (a response that never closes it has no answer)."""
    fallback_last_number: bool = False
    """Without a boxed answer, take the last number of the answer region."""
    timeout_s: float = 2.0
    """Seconds one math check may take (the pair counts as wrong after it)."""
    workers: int = 1
    """Processes checking answers in parallel."""
    penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    """The length penalty (``trainer.reward.rewards.LENGTH_PENALTIES``) and its parameters."""
    da_dler: DADLERConfig = field(default_factory=DADLERConfig)
    """Difficulty-aware budgets."""
    budget_schedule: BudgetScheduleConfig = field(default_factory=BudgetScheduleConfig)
    """A budget that shrinks during training (composes with DA-DLER: it scales each prompt's budget)."""

    def __post_init__(self):
        check_choices(self)
        check_number("timeout_s", self.timeout_s, low=0.0, low_open=True, allow_none=True)
        check_number("workers", self.workers, low=1, allow_none=True)
        if self.budget_schedule.enabled and self.penalty.name in _BUDGET_FREE_PENALTIES:
            raise ValueError(
                f"reward.budget_schedule shrinks the length budget, which reward.penalty.name={self.penalty.name} "
                "does not read; choose a penalty with a budget (e.g. truncation) or turn the schedule off"
            )
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


@dataclass(frozen=True)
class AlgorithmConfig(LossSettings):
    """Advantages (``dler_kernels.compute_advantages``), the policy loss (``dler_kernels.policy_loss``) and
    how one step's batch is cut into optimizer steps: ``prompts_per_step`` prompts are split into mini-batches
    of ``mini_batch_prompts``, one optimizer step each, for ``epochs_per_step`` passes. The policy loss's settings
    (``objective`` and its parameters, ``beta``, ``kl_type``, ``entropy_coef``, ``temperature``, ``loss_agg``,
    ``norm_length``) are ``dler_kernels.loss_inputs.LossSettings``' fields, declared and documented there once.
    Two are only re-annotated here: ``kl_type`` and ``loss_agg`` as Literals of the kernels' own lists, so that the
    config checks them and its help lists the choices (``kl_type`` named by verl's ``low_var_kl``, k3's other name)."""

    kl_type: KLType = "low_var_kl"
    """The KL estimator (``low_var_kl`` is ``k3``)."""
    loss_agg: LossAgg = "token-mean"
    """How token losses are aggregated (DLER, DAPO: ``token-mean``)."""
    advantage: AdvantageMethod = "dler"
    """``grpo``, ``dr_grpo``, or ``dler`` (batch-normalised)."""
    weighting: Weighting = "token"
    """How the ``dler`` batch statistics weigh responses: every token once, or every response once."""
    eps: float = 1e-6
    """Added to standard deviations before dividing."""
    correct_advantage_boost: float = 0.0
    """Added after the normalisation to the advantage of every response scored correct (before the length penalty):
    the DLER release's ``correct_sample_advantage_boost_value`` (0.1 in its dler.sh; not in the paper's text)."""
    allow_temperature_mismatch: bool = False
    """Permit ``temperature`` to differ from ``rollout.sampling.temperature`` on purpose."""
    mini_batch_prompts: int = 8
    """Prompts (whole groups) per optimizer step."""
    epochs_per_step: int = 1
    """Passes over one step's batch."""
    micro_batch_tokens: int = 16384
    """Packed tokens per forward/backward; must hold one full sequence."""
    use_fused_linear: bool = True
    """Loss and log-probs from the hidden states and the LM head (no [tokens, vocab] logits); models whose
    logits are not the plain head's output (soft-capped, scaled) warn and take the logits path."""
    lm_head_fp32: bool = False
    """The LM head's matmul in float32 (upcast hidden states and weight) in the log-prob passes and the update."""
    # -- the trainer-sampler mismatch (trainer.rollout.correction, trainer.update.mismatch_metrics) --
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Weights / masks from the ratio pi_old(trainer) / pi_sampler per token (TIS, MIS, IcePop; ``none``)."""
    old_logprobs: OldLogprobs = "recompute"
    """The PPO ratio's old log-probs: the trainer's own (``recompute``) or the engine's (``sampler``, bypass)."""

    def __post_init__(self):
        check_choices(self)
        super().__post_init__()  # the loss settings, the objective's parameters included
        check_number("eps", self.eps, low=0.0, low_open=True, allow_none=True)
        check_number("correct_advantage_boost", self.correct_advantage_boost, low=0.0)
        for name in ("mini_batch_prompts", "epochs_per_step", "micro_batch_tokens"):
            check_number(name, getattr(self, name), low=1, allow_none=True)
        if self.old_logprobs == "sampler" and self.rollout_correction.mode != "none":
            raise ValueError(
                f"old_logprobs=sampler (bypass) takes the engine's log-probs as the old policy, so the correction's "
                f"ratio pi_old / pi_sampler is 1 on every token and rollout_correction.mode="
                f"{self.rollout_correction.mode} would change nothing; the PPO ratio pi_theta / pi_sampler and its "
                "clip already correct against the sampler. Set rollout_correction.mode=none, or "
                "old_logprobs=recompute to correct pi_old(trainer) against the sampler"
            )


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: linear warmup, then ``schedule`` down to ``lr * min_lr_ratio``
    at the last step."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    schedule: Schedule = "constant"
    """The decay after warmup (``constant`` stays at ``lr``)."""
    min_lr_ratio: float = 0.0
    """The final learning rate as a fraction of ``lr``."""
    grad_clip: float | None = 1.0
    """Max global gradient norm (None: no clipping)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        check_number("lr", self.lr, low=0.0, low_open=True, allow_none=True)
        check_number("weight_decay", self.weight_decay, low=0.0, allow_none=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {list(self.betas)}")
        check_number("eps", self.eps, low=0.0, low_open=True, allow_none=True)
        check_number("warmup_steps", self.warmup_steps, low=0, allow_none=True)
        check_choices(self)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        check_number("grad_clip", self.grad_clip, low=0.0, low_open=True, allow_none=True)


@dataclass
class FSDPConfig:
    """FSDP2 sharding of the policy (and reference) model; the master weights keep ``model.dtype``."""

    enabled: bool | None = None
    """Shard the model (None: when the world size is > 1)."""
    param_dtype: PolicyDtype = "bfloat16"
    """What the forward and backward compute in."""
    reduce_dtype: PolicyDtype = "float32"
    """What gradients are reduced in."""
    cpu_offload: bool = False
    """Keep parameters, gradients and optimizer state in host memory."""
    reshard_after_forward: bool = True
    """Free the gathered parameters after the forward (less memory, one more all-gather in the backward)."""

    def __post_init__(self):
        check_choices(self)

    def active(self, world_size: int) -> bool:
        """Whether to shard with ``world_size`` processes."""
        return world_size > 1 if self.enabled is None else self.enabled


@dataclass
class EvalConfig:
    """Held-out evaluation (accuracy and mean response length), read with ``data``'s fields and template,
    before the first step, after the last, and every ``run.eval_every`` steps. Defaults follow the paper's
    protocol (temperature 0.6, top-p 0.95), with fewer samples."""

    data: str | None = None
    """The held-out data set, as ``data.train`` (None: no evaluation)."""
    limit: int | None = 256
    """The first ``limit`` questions (None: all)."""
    samples_per_prompt: int = 4
    """Responses per question."""
    temperature: float = 0.6
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_tokens: int | None = None
    """Max response length (None: the training max response length)."""

    def __post_init__(self):
        check_number("limit", self.limit, low=1, allow_none=True)
        check_number("samples_per_prompt", self.samples_per_prompt, low=1, allow_none=True)
        check_number("temperature", self.temperature, low=0.0, allow_none=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        check_number("max_tokens", self.max_tokens, low=1, allow_none=True)


@dataclass
class RunConfig:
    """Where the run writes and how long it lasts."""

    out: str = "runs/dler"
    """The run folder: config, metrics, checkpoints, summary, plots."""
    steps: int = 100
    """Training steps (one rollout batch each)."""
    seed: int = 0
    """The run's seed: torch's initialisation, rollout sampling, the engine."""
    save_every: int = 50
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    log_every: int = 1
    """Print a console table row every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""
    device: Device = "auto"
    """Where the policy trains (``auto``: CUDA when available)."""
    threads: int | None = None
    """The trainer's torch threads (None: torch's default; half the cores on a CPU with ``rollout.async_staleness``)."""

    def __post_init__(self):
        check_number("threads", self.threads, low=1, allow_none=True)
        if not self.out:
            raise ValueError("out must name the run's output folder")
        check_number("steps", self.steps, low=1, allow_none=True)
        for name in ("save_every", "eval_every"):
            check_number(name, getattr(self, name), low=0, allow_none=True)
        for name in ("keep_checkpoints", "log_every"):
            check_number(name, getattr(self, name), low=1, allow_none=True)
        check_choices(self)


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
        if self.rollout.engine_devices is not None and self.run.device == "cpu":
            raise ValueError("rollout.engine_devices names the engine process's GPUs; run.device is 'cpu'")
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
        """Keyword arguments of ``trainer.rollout.engines.make_engine`` (after its ``kind`` and model folder)."""
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
            lm_head_fp32=self.rollout.lm_head_fp32,
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
        """Keyword arguments of ``dler_kernels.policy_loss`` / ``linear_policy_loss`` set by the config: every
        ``LossSettings`` field of the algorithm section, ``norm_length`` resolved."""
        a = self.algorithm
        kwargs = {f.name: getattr(a, f.name) for f in dataclasses.fields(LossSettings)}
        norm_length = a.norm_length if a.norm_length is not None else float(self.max_response_tokens)
        kwargs["norm_length"] = norm_length if a.loss_agg == "seq-mean-token-sum-norm" else None
        return kwargs
