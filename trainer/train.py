"""The training loop of ``dler train``: one process on a CPU or a GPU, many with ``torchrun``.

:meth:`Trainer.fit` reads top-down as one step's data flow (``DESIGN.md`` section 2)::

    prompts -> rollouts (vLLM) -> rewards (answer check x length penalty, per-prompt budgets)
      -> dynamic sampling -> advantages (kernel) -> old / reference log-probs (no-grad kernel)
      -> policy update (FSDP2, token-budget micro-batches, fused loss) -> weight sync -> metrics, checkpoint

Everything a step needs that is not in that line is built once in :meth:`Trainer.__init__`, in an
order that puts every cheap check (config, model folder, data) before anything heavy (the policy,
the reference model, the engine).

**Many ranks.** Every rank runs its own rollout engine on its own share of the prompts (each rank
draws ``k * world`` prompts and keeps every ``world``-th one), scores them, and keeps its own data
cursor and DA-DLER record (saved for every rank, so a resume is exact). Advantages are computed on
the gathered global batch, so DLER's batch statistics are those of the whole batch; the update runs
on each rank's share with the global token normaliser (``policy.accumulate_gradients``).

**Stopping.** Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the current step: it writes a
checkpoint and returns at once, without any evaluation still due (it prints the ``dler eval`` command
that runs it later); ``dler train --resume OUT`` continues from it. A second Ctrl-C interrupts at once
(the last complete checkpoint is still there).

**Divergence.** A training step stops the run with a UserError, before anything of it is saved, when
the loss of any of its optimizer steps is not finite (the policy's own forward pass overflows: its next
samples would be garbage, or fail), when every optimizer step had a non-finite gradient norm (all were
skipped: nothing can be learned), or when the weights hold a NaN or inf after the update. A non-finite
gradient norm with a finite loss in some of the optimizer steps is a transient (one bad backward pass):
that optimizer step is skipped and counted in ``skipped_steps``, as before. No checkpoint of a diverged
step is ever written; the newest one stays the last good state.

**The run folder.** ``run.out`` is checked by ``fsutil.check_output`` before anything is written: a new or
empty folder is started; a folder an earlier ``dler train`` made (its ``.dler-run`` marker) is refused with
``--resume`` as the way on, unless it is a failed start (no complete checkpoint), which a fresh run takes
over; any other non-empty folder is the user's and is refused untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import dler_kernels as dk

from . import collective
from . import config as config_mod
from .answers import AnswerChecker
from .checkpoint import CHECKPOINTS_DIR, MODEL_DIR, CheckpointManager
from .config import TrainConfig
from .data import Example, Prompt, PromptStream, build_prompts, load_examples
from .devices import release_cached_memory
from .engine_log import ENGINE_LOG
from .engines import make_engine
from .fsdp import (
    DistEnv,
    check_weights,
    destroy_distributed,
    init_distributed,
    load_policy,
    sum_replicated_gradients,
)
from .fsutil import OWNER_MARKER, UserError, atomic_file, check_output, mark_owner, owner
from .models import resolve_model
from .optim import build_optimizer, build_scheduler, clip_gradients
from .policy import UpdateRow, accumulate_gradients, compute_logprobs, full_weights, fused_head_unsupported
from .sampling import DynamicSampler, RolloutBatch, SamplingStats, SamplingWarning, ScoredGroup

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
# Seeds of different ranks lie this far apart: more than the seeds one rank uses in a call (the engines
# seed sample j of prompt i with seed + i * n + j, and each sampling round adds 7919).
RANK_SEED_STRIDE = 1 << 24


# ------------------------------------------------------------------------------------------- helpers


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _any_rank(flag: bool) -> bool:
    return any(_gather(bool(flag)))


def _percentiles(lengths: np.ndarray) -> tuple[float, float]:
    if lengths.size == 0:
        return 0.0, 0.0
    p50, p90 = np.percentile(lengths, [50, 90])
    return float(p50), float(p90)


class RankSlice:
    """The prompts of one rank: each ``take(k)`` draws ``k * world`` from the shared order and keeps
    every ``world``-th, so ranks see disjoint prompts while their streams advance alike."""

    def __init__(self, stream: PromptStream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def take(self, k: int) -> list[Example]:
        return self.stream.take(k * self.world)[self.rank :: self.world]


class _StopRequest:
    """SIGINT / SIGTERM set a flag checked after each step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (with a checkpoint); "
            "press Ctrl-C again to interrupt at once",
            flush=True,
        )

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class EvalResult:
    accuracy: float
    mean_length: float
    p50_length: float
    p90_length: float
    truncation_rate: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------- the run


class Trainer:
    """One training run: built from a config (fresh) or from a run folder (``resume``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        *,
        resume: bool = False,
        from_step: int | None = None,
        progress: bool = True,
    ):
        self.cfg, self.env, self.progress = cfg, env, progress and env.is_main
        self.out = Path(cfg.run.out).expanduser().absolute()
        self._check_world(env.world_size)
        self._replaces_failed_start = self._check_out_folder(resume)
        try:
            self._load()
        except BaseException:
            self._release_out_folder(resume)
            raise

        self.start_step, self.history, engine_dir = 0, {}, self.model_dir
        if resume:
            engine_dir = self._restore(from_step)
        else:
            self._start_fresh()

        # The rollout engine starts from the weights the policy has now (the checkpoint's after a resume).
        self.engine = make_engine(cfg.rollout.engine, engine_dir, **self._engine_kwargs())
        self.sampler = DynamicSampler(
            self.engine,
            RankSlice(self.stream, env.rank, env.world_size),
            lambda exs: [self.prompt_ids[ex.id] for ex in exs],
            self.checker,
            cfg.reward.penalty,
            cfg.rollout.sampling,
            self.budgets,
            another_round=_any_rank,
        )

    def _load(self) -> None:
        """Everything a run needs before its first step, cheap checks first; the folder is claimed already."""
        cfg, env = self.cfg, self.env
        self.loggers = _open_loggers(cfg, self.out) if env.is_main else []
        torch.manual_seed(cfg.run.seed)

        # Cheap checks first: model folder, tokenizer, data.
        self.model_dir = resolve_model(cfg.model.path)
        check_weights(self.model_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        prompts = self._load_prompts(cfg.data.train, cfg.data.limit)
        self.prompt_ids = {p.example.id: p.token_ids for p in prompts}
        self.stream = PromptStream([p.example for p in prompts], seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.eval_prompts = self._load_prompts(cfg.eval.data, cfg.eval.limit) if cfg.eval.data is not None else []
        self.checker = AnswerChecker(**cfg.reward.checker_kwargs())
        self.budgets = cfg.reward.da_dler.make_budgets()
        if cfg.reward.penalty.name == "drqa":
            from .budgets import ConciseLengths

            penalty = cfg.reward.penalty
            examples = [p.example for p in prompts]
            self.budgets = ConciseLengths.from_file(penalty.drqa_data, examples, penalty.length_budget)

        # The policy, its optimizer and (when beta > 0) the frozen reference.
        self.policy = load_policy(self.model_dir, cfg.model, cfg.fsdp, env)
        self.reference = (
            load_policy(self.model_dir, cfg.model, cfg.fsdp, env, trainable=False) if cfg.algorithm.beta > 0 else None
        )
        self.fused_head = False
        if cfg.algorithm.use_fused_linear:
            reason = fused_head_unsupported(self.policy)
            if reason:
                warnings.warn(f"use_fused_linear: this model cannot take the fused LM-head path ({reason}); "
                              "the logits path runs instead", stacklevel=2)  # fmt: skip
            self.fused_head = reason is None
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.run.steps)
        self.checkpoints = CheckpointManager(self.out, keep=cfg.run.keep_checkpoints, source_model_dir=self.model_dir)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``run.steps``; returns the run's summary (also written to OUT/summary.json)."""
        cfg = self.cfg
        if "before" not in self.history and self.eval_prompts:
            self.history["before"] = self.evaluate("before training").as_dict()
        bar = self._bar()
        step, stopping = self.start_step, False
        with _StopRequest() as stop:
            for step in range(self.start_step + 1, cfg.run.steps + 1):
                started = time.perf_counter()
                groups, sampling = self.collect(step)  # prompts -> rollouts -> rewards -> dynamic sampling
                rows, advantages = self.advantages(groups)  # batch-normalised advantages
                timings = {"rollout_s": sampling.generate_seconds, "score_s": sampling.score_seconds}
                timings["logprob_s"] = self.log_probs(rows)  # old (and reference) log-probs
                update, timings["update_s"] = self.update(rows, step)  # the policy update
                timings["sync_s"] = self.sync_weights()  # weights to the rollout engine
                timings["step_s"] = time.perf_counter() - started
                record = self.record(step, sampling, advantages, update, timings, rows)
                diverged = self._divergence(update)
                # A stop request skips the evaluation due at this step: it would delay the stop by minutes.
                stopping = _any_rank(stop.requested)
                due = cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps
                if self.eval_prompts and due and not stopping and diverged is None:
                    record["eval"] = self.evaluate(f"step {step}").as_dict()
                self._log(record, bar)
                if diverged is not None:
                    raise UserError(self._divergence_message(step, diverged))
                if stopping or step == cfg.run.steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
                    self.save(step)
                if stopping:
                    self._say(f"stopped after step {step}; resume with: dler train --resume {self.out}")
                    break
        if bar is not None:
            bar.close()
        finished = step == cfg.run.steps
        if finished and "after" not in self.history and self.eval_prompts:
            if stopping:
                self._say(f"the final evaluation was skipped (stop requested); run it with: {self.eval_command(step)}")
            else:
                self.history["after"] = self.evaluate(f"after step {step}").as_dict()
        summary = self.finish(step, finished)
        if stopping:
            summary["stopped"] = True
        return summary

    def eval_command(self, step: int) -> str:
        """The ``dler eval`` command that evaluates checkpoint ``step`` as the run's held-out evaluation does."""
        e, d = self.cfg.eval, self.cfg.data
        model = self.checkpoints.step_dir(step) / MODEL_DIR
        args = ["dler", "eval", "--model", f"step-{step}={model}", "--data", f"heldout={e.data}"]
        if e.limit is not None:
            args += ["--limit", str(e.limit)]
        args += ["--samples", str(e.samples_per_prompt), "--temperature", str(e.temperature), "--top-p", str(e.top_p)]
        args += ["--max-tokens", str(self.cfg.eval_max_tokens), "--template", d.template, "--scaling-k", "none"]
        if self.cfg.reward.checker in ("math", "exact"):  # the answer check the run's evaluation used
            args += ["--checker", self.cfg.reward.checker]
        args += ["--out", str(self.out / f"eval-step-{step}")]
        return shlex.join(args)

    def _divergence(self, update: dict[str, float]) -> str | None:
        """Why this step's update ruined the policy (the rule in the module docstring), or None."""
        steps = int(update.get("optimizer_steps", 0))
        if steps and not math.isfinite(update.get("loss", 0.0)):
            return "the loss is not finite: the policy's own forward pass overflows"
        if steps and int(update.get("skipped_steps", 0)) >= steps:
            return "every optimizer step had a non-finite gradient norm"
        # one flag per tensor on the device, one wait for all of them (not one per parameter)
        finite = bool(torch.stack([torch.isfinite(_local(p)).all() for p in self.policy.parameters()]).all())
        if _any_rank(not finite):
            return "the weights hold NaN or inf values after the update"
        return None

    def _divergence_message(self, step: int, why: str) -> str:
        last = self.checkpoints.latest()
        keep = (
            f"the last good checkpoint is {last}: continue from it with `dler train --resume {self.out} "
            f"optim.lr=SMALLER`"
            if last is not None
            else f"no checkpoint was saved yet: start over with `dler train {self.out / CONFIG_FILE} "
            f"run.out={self.out} optim.lr=SMALLER`"
        )
        return (
            f"step {step}: training diverged ({why}, optim.lr={self.cfg.optim.lr}); stopped without saving "
            f"this state; {keep}"
        )

    # -- one step, in data-flow order ----------------------------------------------------------

    def collect(self, step: int) -> tuple[list[ScoredGroup], SamplingStats]:
        """``prompts_per_step`` scored groups with spread (dynamic sampling) from this rank's engine."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SamplingWarning)
            groups, stats = self.sampler.collect(step, seed=self._rank_seed(self._seed(step)))
        for w in caught:
            self._say(f"step {step}: {w.message}")
        self.engine.sleep()  # its device memory goes to the update (where the engine can sleep at all)
        return groups, stats

    def advantages(self, groups: Sequence[ScoredGroup]) -> tuple[list[UpdateRow], dict[str, float]]:
        """Advantages over the global batch (gathered from every rank), one row per local response."""
        batch = RolloutBatch.from_groups(groups)
        everyone = _gather(
            (
                batch.rewards.tolist(),
                batch.correct.tolist(),
                batch.lengths.tolist(),
                batch.group_ids.tolist(),
                len(groups),
            )
        )
        rewards = torch.tensor([r for part in everyone for r in part[0]], dtype=torch.float32)
        correct = torch.tensor([c for part in everyone for c in part[1]], dtype=torch.float32)
        lengths = torch.tensor([n for part in everyone for n in part[2]], dtype=torch.float32)
        group_ids, offset = [], 0
        for part in everyone:  # local group indices -> indices into the global batch
            group_ids += [offset + g for g in part[3]]
            offset += part[4]
        result = dk.compute_advantages(
            rewards,
            torch.tensor(group_ids, dtype=torch.long),
            correctness=correct,
            token_counts=lengths,
            **self.cfg.advantage_kwargs(),
        )
        start = sum(len(part[0]) for part in everyone[: self.env.rank])
        values = result.values[start : start + len(batch)].tolist()
        rows = [UpdateRow(list(p), list(r), float(a)) for p, r, a in zip(batch.prompt_ids, batch.response_ids, values)]
        kept = result.values[result.keep]
        stats = {
            "advantage_mean": float(kept.mean()) if kept.numel() else 0.0,
            "advantage_std": float(kept.std(unbiased=False)) if kept.numel() else 0.0,
            "advantage_min": float(kept.min()) if kept.numel() else 0.0,
            "advantage_max": float(kept.max()) if kept.numel() else 0.0,
            "batch_prompts": offset,
            "batch_responses": int(rewards.numel()),
        }
        return rows, stats

    def log_probs(self, rows: list[UpdateRow]) -> float:
        """Old log-probs under the current policy (mini-batches make the sampler's stale), and the
        reference's when the KL term is on; both with the no-grad kernel."""
        started = time.perf_counter()
        a = self.cfg.algorithm
        for model, field in ((self.policy, "old_logprobs"), (self.reference, "ref_logprobs")):
            if model is not None:
                compute_logprobs(
                    model,
                    rows,
                    token_budget=a.micro_batch_tokens,
                    temperature=a.temperature,
                    field=field,
                    device=self.env.device,
                    fused_head=self.fused_head,
                )
        return time.perf_counter() - started

    def update(self, rows: list[UpdateRow], step: int) -> tuple[dict[str, float], float]:
        """``epochs_per_step`` passes over the batch in mini-batches of whole prompt groups, one optimizer
        step each; then one scheduler step. Returns token-weighted means of the loss metrics."""
        started = time.perf_counter()
        cfg, a = self.cfg, self.cfg.algorithm
        per_group = cfg.rollout.sampling.samples_per_prompt
        groups = [rows[i : i + per_group] for i in range(0, len(rows), per_group)]
        local_mini = a.mini_batch_prompts // self.env.world_size
        # Ranks may hold different numbers of groups when dynamic sampling was capped: every rank
        # runs as many optimizer steps as the rank with the most (FSDP's collectives must pair up).
        n_mini = max(_gather(math.ceil(len(groups) / local_mini)))
        loss_kwargs = cfg.policy_loss_kwargs()
        totals: dict[str, float] = {}
        skipped = 0
        self.policy.train()
        for epoch in range(a.epochs_per_step):
            order = list(range(len(groups)))
            random.Random(self._seed(step) * 31 + epoch).shuffle(order)
            for m in range(n_mini):
                mini = [row for g in order[m * local_mini : (m + 1) * local_mini] for row in groups[g]]
                metrics = accumulate_gradients(
                    self.policy,
                    mini,
                    loss_kwargs,
                    token_budget=a.micro_batch_tokens,
                    device=self.env.device,
                    fused_head=self.fused_head,
                )
                sum_replicated_gradients(self.policy)  # data parallel without FSDP: one gradient for all
                grad_norm = clip_gradients(self.policy, cfg.optim.grad_clip)
                if metrics and math.isfinite(grad_norm):
                    self.optimizer.step()
                elif metrics:
                    skipped += 1  # a non-finite gradient would poison every weight: skip, report
                self.optimizer.zero_grad(set_to_none=True)
                if metrics:
                    _accumulate(totals, metrics, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        out = _mean_metrics(totals)
        out.update(lr=lr, optimizer_steps=totals.get("_steps", 0), skipped_steps=skipped)
        return out, time.perf_counter() - started

    def sync_weights(self) -> float:
        """The full weights, gathered from the shards one tensor at a time, into the rollout engine.

        A sleeping engine wakes in two parts around the load, and the update's cached device memory
        (activations, gradient buckets, gather buffers) is handed back before each part takes its
        share: the weights first (the KV cache is not needed to load them), the KV cache last."""
        started = time.perf_counter()
        release_cached_memory(self.env.device)
        self.engine.wake_up(["weights"])
        self.engine.update_weights(full_weights(self.policy, self._engine_dtype()))
        release_cached_memory(self.env.device)
        self.engine.wake_up(["kv_cache"])
        return time.perf_counter() - started

    def record(self, step, sampling: SamplingStats, advantages, update, timings, rows) -> dict[str, Any]:
        """One line of OUT/metrics.jsonl: rollout statistics over every generated response of every rank."""
        everyone = _gather(
            (sampling.as_dict(), sampling.lengths, [len(r.response_ids) for r in rows], sum(r.tokens for r in rows))
        )
        parts = [part[0] for part in everyone]
        samples = sum(p["samples"] for p in parts)

        def mean(key: str) -> float:
            return sum(p[key] * p["samples"] for p in parts) / samples if samples else 0.0

        p50, p90 = _percentiles(np.asarray([n for part in everyone for n in part[1]]))
        lengths = np.asarray([n for part in everyone for n in part[2]])
        update_tokens = sum(part[3] for part in everyone)
        generated = sum(p["generated_tokens"] for p in parts)
        record: dict[str, Any] = {
            "step": step,
            "accuracy": mean("accuracy"),
            "mean_response_length": mean("mean_length"),
            "p50_response_length": p50,
            "p90_response_length": p90,
            "truncation_rate": mean("truncation_rate"),
            "reward": sum(p["mean_reward"] for p in parts) / len(parts),
            "batch_mean_length": float(lengths.mean()) if lengths.size else 0.0,
            "prompts_generated": sum(p["prompts_generated"] for p in parts),
            "kept_fraction": sum(p["groups_with_spread"] for p in parts)
            / max(1, sum(p["prompts_generated"] for p in parts)),
            "sampling_rounds": max(p["rounds"] for p in parts),
            "sampling_capped": any(p["capped"] for p in parts),
            **advantages,
            **update,
            **timings,
            "generated_tokens": generated,
            "rollout_tokens_per_s": generated / max(sum(p["generate_seconds"] for p in parts) / len(parts), 1e-9),
            "update_tokens_per_s": update_tokens / max(timings["update_s"] + timings["logprob_s"], 1e-9),
        }
        if self.budgets is not None:
            merged: dict[str, int] = {}
            for p in parts:
                for budget, n in p["budgets"].items():
                    merged[budget] = merged.get(budget, 0) + n
            record["budgets"] = merged
        return record

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, label: str) -> EvalResult:
        """Held-out accuracy and response lengths with the eval sampling settings (every rank its share)."""
        e = self.cfg.eval
        started = time.perf_counter()
        mine = self.eval_prompts[self.env.rank :: self.env.world_size]
        # Every rank calls generate, with no prompts if its share is empty: engines may step in lockstep.
        outputs = self.engine.generate(
            [p.token_ids for p in mine],
            n=e.samples_per_prompt,
            max_tokens=self.cfg.eval_max_tokens,
            temperature=e.temperature,
            top_p=e.top_p,
            seed=self._rank_seed(self.cfg.run.seed + 7),
        )
        texts = [s.text for group in outputs for s in group]
        golds = [p.example.answer for p, group in zip(mine, outputs) for _ in group]
        correct = self.checker.score(texts, golds) if texts else []
        lengths = [len(s.token_ids) for group in outputs for s in group]
        truncated = [s.finish_reason == "length" for group in outputs for s in group]
        everyone = _gather((correct, lengths, truncated))
        correct = np.asarray([c for part in everyone for c in part[0]], dtype=np.float64)
        lengths = np.asarray([n for part in everyone for n in part[1]], dtype=np.float64)
        truncated = np.asarray([t for part in everyone for t in part[2]], dtype=np.float64)
        p50, p90 = _percentiles(lengths)
        result = EvalResult(
            accuracy=float(correct.mean()) if correct.size else 0.0,
            mean_length=float(lengths.mean()) if lengths.size else 0.0,
            p50_length=p50,
            p90_length=p90,
            truncation_rate=float(truncated.mean()) if truncated.size else 0.0,
            samples=int(correct.size),
        )
        self._say(
            f"eval {label}: accuracy {result.accuracy:.1%}, mean length {result.mean_length:.1f} tokens "
            f"(p90 {result.p90_length:.0f}), truncated {result.truncation_rate:.1%} over {result.samples} samples "
            f"[{time.perf_counter() - started:.1f} s]"
        )
        return result

    # -- checkpoints and resume ----------------------------------------------------------------

    def save(self, step: int) -> None:
        state = {
            "step": step,
            "streams": _gather(self.stream.state_dict()),
            "budgets": _gather(self.budgets.state_dict()) if self.budgets is not None else None,
            "history": self.history,
        }
        path = self.checkpoints.save(step, self.policy, self.optimizer, self.scheduler, state)
        if path is not None:
            self._say(f"checkpoint {path}")

    def _restore(self, from_step: int | None = None) -> Path:
        """Load the newest checkpoint of OUT that verifies (or step ``from_step``'s); return its model folder
        for the engine. Damaged checkpoints are passed over with one line each; the ones newer than the
        checkpoint resumed are moved aside at the next save (``CheckpointManager._prune``)."""
        if self.checkpoints.latest() is None:
            raise UserError(
                f"{self.out} has no complete checkpoint to resume from: the run stopped before its first save; "
                f"start it over with `{_start_over_command(self.out, self._start_over_folder())}`"
            )
        path, skipped = self.checkpoints.newest_good(from_step)
        for bad, why in skipped:
            self._warn(f"skipping checkpoint {bad}: {why}")
        if path is None:
            if from_step is not None:
                raise UserError(
                    f"{self.out}: the checkpoint of step {from_step} does not verify; resume from the newest one "
                    f"that does with `dler train --resume {self.out}` (without --from-step)"
                )
            restart = _start_over_command(self.out, self.out.with_name(self.out.name + "-restart"))
            raise UserError(
                f"{self.out}: none of its {len(skipped)} checkpoints verifies, so nothing can resume it; "
                f"start over in a new folder with `{restart}`"
            )
        state = self.checkpoints.load(path, self.policy, self.optimizer, self.scheduler, verify=False)
        streams, budgets = state["streams"], state["budgets"]
        if len(streams) != self.env.world_size:
            raise UserError(
                f"{path} was saved by {len(streams)} ranks; resume it with the same number of processes "
                f"(now {self.env.world_size}) so that every rank continues its own prompts exactly"
            )
        self.stream.load_state_dict(streams[self.env.rank])
        if self.budgets is not None and budgets is not None:
            self.budgets.load_state_dict(budgets[self.env.rank])
        self.start_step, self.history = int(state["step"]), dict(state.get("history", {}))
        if self.env.is_main:
            _truncate_metrics(self.out / METRICS_FILE, self.start_step)
        self._say(f"resumed from {path} at step {self.start_step}")
        return path / MODEL_DIR

    def _start_over_folder(self) -> Path:
        """Where a start-over goes: this folder if a fresh run may take it over (a failed start of ours),
        else a new sibling."""
        return self.out if owner(self.out) == "train" else self.out.with_name(self.out.name + "-restart")

    def _start_fresh(self) -> None:
        if self.env.is_main:
            metrics = self.out / METRICS_FILE
            if self._replaces_failed_start and metrics.is_file() and metrics.stat().st_size > 0:
                # Steps logged without a checkpoint cannot be resumed, but they are kept, not erased.
                aside = metrics.with_name(f"metrics-failed-{int(time.time())}.jsonl")
                os.replace(metrics, aside)
                self._warn(f"{self.out}: the failed start's metrics are kept as {aside.name}")
            config_mod.save_config(self.cfg, self.out / CONFIG_FILE)
            metrics.write_text("")

    # -- the end of a run ----------------------------------------------------------------------

    def finish(self, step: int, finished: bool) -> dict[str, Any]:
        records = _read_metrics(self.out / METRICS_FILE) if self.env.is_main else []
        summary: dict[str, Any] = {"out": str(self.out), "steps": step, "finished": finished, **self.history}
        if records:
            first, last = records[0], records[-1]
            summary["training"] = {
                "first_step": {k: first[k] for k in ("step", "accuracy", "mean_response_length", "truncation_rate")},
                "last_step": {k: last[k] for k in ("step", "accuracy", "mean_response_length", "truncation_rate")},
                "seconds": sum(r["step_s"] for r in records),
            }
        if self.env.is_main:
            _write_json(self.out / SUMMARY_FILE, summary)
            if records:
                plot_curves(records, self.history, self.out / CURVES_FILE)
            self._say(before_after_table(summary))
        return summary

    # -- setup details -------------------------------------------------------------------------

    def _check_world(self, world: int) -> None:
        s, a = self.cfg.rollout.sampling, self.cfg.algorithm
        if self.cfg.rollout.tensor_parallel_size > 1:
            raise UserError(
                f"rollout.tensor_parallel_size={self.cfg.rollout.tensor_parallel_size}: dler train runs one engine per "
                "rank (tensor_parallel_size 1), each sampling its own prompts; the ranks of a tensor-parallel engine "
                "would have to share prompts and split the responses, which the loop does not do yet"
            )
        for name, value in (
            ("rollout.sampling.prompts_per_step", s.prompts_per_step),
            ("algorithm.mini_batch_prompts", a.mini_batch_prompts),
        ):
            if value % world:
                raise UserError(f"{name} ({value}) must be a multiple of the number of processes ({world})")

    def _check_out_folder(self, resume: bool) -> bool:
        """Whether run.out may be written (``fsutil.check_output``, the rule of every dler command); returns
        True when a fresh run takes over a failed start (a run folder with no complete checkpoint: nothing
        in it can be resumed, so starting it over is what its owner wants)."""
        if resume:
            return False
        # Rank 0 decides and claims (the folder is shared); every rank gets its outcome, so that a refusal
        # (or any failure) stops them all instead of leaving the others waiting in the next collective.
        return collective.broadcast(collective.on_rank0("cannot create run.out", self._claim_out_folder, path=self.out))

    def _release_out_folder(self, resume: bool) -> None:
        """Give back a folder claimed by a start that failed before it wrote anything (a bad model path, a
        missing package): it holds only the marker, so it goes, and the user's view is as before the run."""
        if resume or not self.env.is_main:
            return
        with contextlib.suppress(OSError):
            if [p.name for p in self.out.iterdir()] == [OWNER_MARKER]:
                (self.out / OWNER_MARKER).unlink()
                if self._created_out:
                    self.out.rmdir()

    def _claim_out_folder(self) -> bool:
        resume_hint = f"continue it with `dler train --resume {self.out}`, or set run.out to another folder"
        if owner(self.out) is None and _is_legacy_run(self.out):
            # Made by a dler from before the marker: ours, but without it nothing may be taken over.
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        state = check_output(self.out, "train", flag=None, name="run.out", ours_ok=True)
        if state == "ours" and CheckpointManager(self.out).latest() is not None:
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        if state == "ours":
            self._say(f"{self.out} holds a run that stopped before its first checkpoint: starting it over")
        # Claimed now, before the minutes of loading: a read-only or unusable run.out fails at once.
        self._created_out = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        mark_owner(self.out, "train")
        return state == "ours"

    def _load_prompts(self, spec: str, limit: int | None) -> list[Prompt]:
        """Training or held-out prompts, read and encoded with ``data``'s fields and template."""
        d = self.cfg.data
        examples = load_examples(
            spec, fields=d.fields, on_bad_row=d.on_bad_row, split=d.split, limit=limit, seed=d.seed
        )
        return build_prompts(
            self.tokenizer,
            examples,
            template=d.template,
            chat=d.chat,
            max_prompt_tokens=d.max_prompt_tokens,
            on_bad_row=d.on_bad_row,  # a prompt too long for max_prompt_tokens is a bad row too
        )

    def _engine_kwargs(self) -> dict[str, Any]:
        # The engine lives where this rank computes: weight updates go there, and an HF engine runs there.
        # Its own output goes to the run folder's engine.log, not between the rows of the step table.
        return dict(self.cfg.engine_kwargs(), device=str(self.env.device), log_file=self.out / ENGINE_LOG)

    def _engine_dtype(self) -> torch.dtype | None:
        dtype = self.cfg.rollout.dtype
        return None if dtype == "auto" else getattr(torch, dtype)

    def _rank_seed(self, seed: int) -> int:
        """``seed`` moved into this rank's own range, so that ranks sampling their own prompts draw
        independent streams (with one seed, every rank's i-th sample used the same random numbers).
        Rank 0 keeps ``seed``: a single process samples as before."""
        return (seed + self.env.rank * RANK_SEED_STRIDE) % 2**31

    def _seed(self, step: int) -> int:
        return (self.cfg.run.seed * 1_000_003 + step * 7919) % (2**31)

    def _say(self, text: str) -> None:
        if self.env.is_main:
            from tqdm import tqdm

            tqdm.write(text)

    def _warn(self, text: str) -> None:
        if self.env.is_main:
            print(f"dler train: warning: {text}", file=sys.stderr, flush=True)

    def _bar(self):
        if not self.progress:
            return None
        from .progress import progress

        return progress(
            total=self.cfg.run.steps, initial=self.start_step, desc="dler train", unit="step", dynamic_ncols=True
        )

    def _log(self, record: dict[str, Any], bar) -> None:
        if not self.env.is_main:
            return
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for write in self.loggers:
            write(record["step"], scalars)
        step = record["step"]
        if step == self.start_step + 1 or (step - self.start_step) % 20 == 1:
            self._say(TABLE_HEADER)
        if step % self.cfg.run.log_every == 0 or step == self.cfg.run.steps:
            self._say(table_row(record))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{record['accuracy']:.2f}", len=f"{record['mean_response_length']:.0f}")


# ------------------------------------------------------------------------------------ metrics helpers


def _open_loggers(cfg: TrainConfig, out: Path) -> list:
    """Writers of per-step scalars besides metrics.jsonl: TensorBoard (OUT/tensorboard) and W&B, if asked.
    A missing package is a UserError at start, not a crash at the first step."""
    loggers = []
    if cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("run.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))

        def tensorboard(step: int, scalars: dict[str, float]) -> None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            writer.flush()

        loggers.append(tensorboard)
    if cfg.run.wandb_project:
        try:
            import wandb
        except ImportError:
            raise UserError(f"run.wandb_project={cfg.run.wandb_project!r} needs wandb: pip install wandb") from None
        run = wandb.init(project=cfg.run.wandb_project, dir=str(out), config=config_mod.to_dict(cfg), resume="allow")
        loggers.append(lambda step, scalars: run.log(scalars, step=step))
    return loggers


def _accumulate(totals: dict[str, float], metrics: dict[str, float], grad_norm: float) -> None:
    """Token-weighted sums over optimizer steps (the loss is a per-step mean: averaged over steps)."""
    tokens = metrics.get("tokens", 0.0)
    totals["_steps"] = totals.get("_steps", 0) + 1
    totals["_tokens"] = totals.get("_tokens", 0.0) + tokens
    totals["loss"] = totals.get("loss", 0.0) + metrics["loss"]
    totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
    totals["num_nonfinite"] = totals.get("num_nonfinite", 0.0) + metrics.get("num_nonfinite", 0.0)
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "entropy", "kl_ref"):
        if key in metrics:
            totals[key] = totals.get(key, 0.0) + metrics[key] * tokens
    totals["ratio_max"] = max(totals.get("ratio_max", -math.inf), metrics.get("ratio_max", -math.inf))
    totals["ratio_min"] = min(totals.get("ratio_min", math.inf), metrics.get("ratio_min", math.inf))


def _mean_metrics(totals: dict[str, float]) -> dict[str, float]:
    steps, tokens = totals.get("_steps", 0), totals.get("_tokens", 0.0)
    if not steps:
        return {}
    out = {"loss": totals["loss"] / steps, "grad_norm": totals["grad_norm"] / steps, "update_tokens": tokens}
    out["num_nonfinite"] = totals["num_nonfinite"]
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "entropy", "kl_ref"):
        if key in totals:
            out[key] = totals[key] / max(tokens, 1.0)
    out["ratio_max"], out["ratio_min"] = totals["ratio_max"], totals["ratio_min"]
    return out


TABLE_COLUMNS = (
    ("step", "step", "{:>5d}"),
    ("acc", "accuracy", "{:>6.3f}"),
    ("len", "mean_response_length", "{:>7.1f}"),
    ("p90", "p90_response_length", "{:>6.0f}"),
    ("trunc", "truncation_rate", "{:>6.3f}"),
    ("reward", "reward", "{:>7.3f}"),
    ("kept", "kept_fraction", "{:>5.2f}"),
    ("entropy", "entropy", "{:>8.3f}"),
    ("clip", "clip_frac_high", "{:>6.3f}"),
    ("gnorm", "grad_norm", "{:>7.3f}"),
    ("roll s", "rollout_s", "{:>7.1f}"),
    ("upd s", "update_s", "{:>6.1f}"),
    ("step s", "step_s", "{:>7.1f}"),
)
TABLE_HEADER = " ".join(title.rjust(len(fmt.format(0 if "d" in fmt else 0.0))) for title, _, fmt in TABLE_COLUMNS)


def table_row(record: dict[str, Any]) -> str:
    cells = []
    for _, key, fmt in TABLE_COLUMNS:
        value = record.get(key)
        width = len(fmt.format(0 if "d" in fmt else 0.0))
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-".rjust(width))
    return " ".join(cells)


def before_after_table(summary: dict[str, Any]) -> str:
    """The run's result in a few lines: held-out accuracy and length before and after training."""
    before, after = summary.get("before"), summary.get("after")
    lines = [f"run {summary['out']}: {summary['steps']} steps" + ("" if summary["finished"] else " (stopped early)")]
    if before is None or after is None:
        training = summary.get("training")
        if training:
            first, last = training["first_step"], training["last_step"]
            lines.append(
                f"training rollouts: accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, mean length "
                f"{first['mean_response_length']:.1f} -> {last['mean_response_length']:.1f} tokens"
            )
        return "\n".join(lines)
    rows = (
        ("accuracy", "accuracy", "{:.1%}"),
        ("mean response length", "mean_length", "{:.1f}"),
        ("p90 response length", "p90_length", "{:.0f}"),
        ("truncated", "truncation_rate", "{:.1%}"),
    )
    lines.append(f"held-out evaluation ({after['samples']} samples)")
    lines.append(f"  {'':<22}{'before':>10}{'after':>10}{'change':>10}")
    for title, key, fmt in rows:
        b, a = before[key], after[key]
        if key in ("mean_length", "p90_length"):
            change = f"{(a - b) / b:+.1%}" if b else "-"
        else:
            change = f"{(a - b) * 100:+.1f} pt"
        lines.append(f"  {title:<22}{fmt.format(b):>10}{fmt.format(a):>10}{change:>10}")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], history: dict[str, Any], path: Path) -> None:
    """Accuracy and mean response length per step (training rollouts; held-out evaluations as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    acc_ax.plot(steps, [r["accuracy"] for r in records], label="training rollouts")
    len_ax.plot(steps, [r["mean_response_length"] for r in records], label="training rollouts")
    len_ax.plot(steps, [r["p90_response_length"] for r in records], alpha=0.5, linestyle="--", label="p90")
    evals = [(0, history.get("before"))] + [(r["step"], r.get("eval")) for r in records]
    evals.append((steps[-1], history.get("after")))
    evals = [(s, e) for s, e in evals if e]
    if evals:
        acc_ax.plot([s for s, _ in evals], [e["accuracy"] for _, e in evals], "o", label="held-out eval")
        len_ax.plot([s for s, _ in evals], [e["mean_length"] for _, e in evals], "o", label="held-out eval")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    len_ax.set(xlabel="step", ylabel="tokens", title="response length")
    for ax in (acc_ax, len_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A torn last line (the process died mid-write, or the disk filled) is
    dropped with a one-line warning: its step is redone by the resume. A bad line anywhere else is damage
    the run cannot explain: an error naming the line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (line_no, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record")
        except ValueError:
            if k == len(numbered) - 1:
                print(f"dler train: warning: {path}:{line_no}: dropped a torn last line", file=sys.stderr, flush=True)
                break
            raise UserError(
                f"{path}:{line_no} is not a metrics record (the file was edited or damaged); fix or delete that line"
            ) from None
        records.append(record)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step``: they belong to the timeline the resume abandons."""
    kept = [r for r in _read_metrics(path) if r["step"] <= step]
    _write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


# ------------------------------------------------------------------------------------------ entry point


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP2)."""
    return param.to_local() if hasattr(param, "to_local") else param


def _is_legacy_run(out: Path) -> bool:
    """A run folder written before runs carried their owner marker (``fsutil.mark_owner``): a config plus
    metrics or checkpoints."""
    return (out / CONFIG_FILE).is_file() and ((out / METRICS_FILE).is_file() or (out / CHECKPOINTS_DIR).is_dir())


def _start_over_command(run: Path, out: Path) -> str:
    """The command that starts run ``run`` over with its own config, into ``out``."""
    return shlex.join(["dler", "train", str(run / CONFIG_FILE), f"run.out={out}"])


def load_run_config(out: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config a run folder was started with (OUT/config.yaml), with ``overrides`` on top."""
    path = Path(out).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{out} is not a run folder (no {CONFIG_FILE}); pass the run.out of an earlier `dler train`")
    cfg = config_mod.load_config(path, overrides)
    if Path(cfg.run.out).expanduser().absolute() != Path(out).expanduser().absolute():
        cfg = replace(cfg, run=replace(cfg.run, out=str(out)))  # the folder was moved: it is the run
    return cfg


def train(
    cfg: TrainConfig, *, resume: bool = False, from_step: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run ``cfg`` (or continue the run in ``cfg.run.out`` with ``resume``, from its checkpoint of step
    ``from_step`` if given); return the summary."""
    env = init_distributed(cfg.run.device)
    try:
        trainer = Trainer(cfg, env, resume=resume, from_step=from_step, progress=progress)
        try:
            return trainer.fit()
        finally:
            # The engine first: vLLM tears down its process groups (built on the job's) at shutdown.
            trainer.engine.close()
    finally:
        with contextlib.suppress(Exception):
            destroy_distributed()
