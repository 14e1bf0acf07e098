"""The training loop of ``dler train``: one process on a CPU or a GPU, many with ``torchrun``.

:meth:`Trainer.fit` reads top-down as one step's data flow::

    prompts -> rollouts (vLLM) -> rewards (answer check x length penalty, per-prompt budgets)
      -> dynamic sampling -> advantages (kernel) -> old / reference log-probs (no-grad kernel)
      -> policy update (FSDP2, token-budget micro-batches, fused loss) -> weight sync -> record

and leaves every decision around the step to a component that makes it: the run log
(:mod:`trainer.run.run_log`: metrics file, console table, plots, external loggers), the step timer
(:mod:`trainer.run.step_timer`), the stop vote and evaluation schedule (:mod:`trainer.run.schedule`), the
held-out evaluation (:mod:`trainer.run.heldout`), the checkpointer (:mod:`trainer.checkpoint.checkpointer`: when to
save, what a resume restores) and the run folder's claim (:mod:`trainer.checkpoint.run_folder`).

Everything a step needs is built once in :meth:`Trainer.__init__`, in an order that puts every cheap
check (config, model folder, data) before anything heavy (the policy, the reference model, the engine).

**Many ranks.** Every rank runs its own rollout engine on its own share of the prompts (each rank
draws ``k * world`` prompts and keeps every ``world``-th one), scores them, and keeps its own data
cursor and DA-DLER record (saved for every rank, so a resume is exact). Advantages are computed on
the gathered global batch (:mod:`trainer.update.global_batch`), so DLER's batch statistics are those of the
whole batch; the update runs on each rank's share with the global token normaliser
(``policy.accumulate_gradients``).

**Asynchronous rollouts** (``rollout.async_staleness`` k >= 1, :mod:`trainer.rollout.async_rollout`): the engine
runs in its own process and samples the batch of step b with the weights of step b - 1 - k while the trainer
updates; ``collect`` takes the batch from its queue, ``sync_weights`` publishes a CPU copy of the weights, and a
checkpoint saves the batches sampled ahead. k = 0 is the loop above, unchanged.

**Stopping and divergence** (the rules are :mod:`trainer.run.schedule`'s): a stop request writes a
checkpoint after the current step and returns at once, without any evaluation still due (it prints the
``dler eval`` command that runs it later); ``dler train --resume OUT`` continues from it. A diverged
step stops the run with a UserError before anything of it is saved.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from .checkpoint.checkpointer import Checkpointer
from .checkpoint.run_folder import RunFolder
from .config import TrainConfig
from .data import Prompt, PromptStream, build_prompts, load_examples
from .devices import release_cached_memory
from .dist import collective
from .dist.distributed_env import DistEnv, destroy_distributed, init_distributed
from .dist.fsdp import check_weights, full_weights, load_policy, sum_replicated_gradients
from .fsutil import UserError
from .model_files.hf_folder import load_tokenizer
from .models.resolve import resolve_model
from .reward.answers import AnswerChecker
from .rollout.async_rollout import AsyncRollout, StepBatch, decode_batch
from .rollout.correction import correct_rows
from .rollout.engine_log import ENGINE_LOG
from .rollout.engine_process import EngineProcess
from .rollout.engines import make_engine
from .rollout.sampling import DynamicSampler, RankSlice, SamplingStats, SamplingWarning, ScoredGroup
from .run.heldout import HeldOutEval
from .run.run_log import CONFIG_FILE, RunLog
from .run.schedule import RunControl, Verdict
from .run.step_metrics import UpdateTotals, step_record
from .run.step_timer import StepTimer
from .seeds import epoch_shuffle_seed, rank_seed, step_seed
from .update.fused_head import fused_head_unsupported
from .update.global_batch import global_advantages
from .update.mismatch_metrics import MismatchSums
from .update.optim import build_optimizer, build_scheduler, clip_gradients
from .update.packing import UpdateRow
from .update.policy import accumulate_gradients, compute_logprobs, loss_backend


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
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.run.out).expanduser().absolute()
        self.log = RunLog(cfg, self.out, is_main=env.is_main, progress=progress)
        self.timer = StepTimer()
        self._check_world(env.world_size)
        self.folder = RunFolder(self.out, self.log.say)
        replaces_failed_start = self.folder.claim(resume)  # and its lock, held until close()
        try:
            self._load()
            self._start(resume, from_step, replaces_failed_start)
        except BaseException:
            self.folder.release(resume)
            raise

    def _start(self, resume: bool, from_step: int | None, replaces_failed_start: bool) -> None:
        """Where the run starts (a checkpoint, or the model), its rollout engine and what samples with it."""
        cfg, env = self.cfg, self.env
        self.start_step, self.history, engine_dir, pending = 0, {}, self.model_dir, []
        if resume:
            restored = self.checkpointer.restore(from_step)
            self.start_step, self.history, engine_dir = restored.step, restored.history, restored.model_dir
            pending = restored.pending
        else:
            self.log.start_fresh(replaces_failed_start)
            self.checkpointer.measure_start()

        # The rollout engine starts from the weights the policy has now (the checkpoint's after a resume):
        # colocated (k = 0), or in its own process sampling ahead of the trainer (k >= 1).
        k = cfg.rollout.async_staleness
        if k == 0:
            self.engine = make_engine(cfg.rollout.engine, engine_dir, **self._engine_kwargs())
        else:
            self.engine = EngineProcess(cfg.rollout.engine, engine_dir, **self._engine_process_kwargs())
        self.sampler = DynamicSampler(
            self.engine,
            RankSlice(self.stream, env.rank, env.world_size),
            lambda exs: [self.prompt_ids[ex.id] for ex in exs],
            self.checker,
            cfg.reward.penalty,
            cfg.rollout.sampling,
            self.budgets,
            # Colocated engines may step in lockstep across ranks (vLLM's data parallelism); engine processes
            # are each their own, and the producer thread must not take part in the trainer's collectives.
            another_round=collective.any_rank if k == 0 else bool,
        )
        self.rollout: AsyncRollout | None = None
        if k:
            self.rollout = AsyncRollout(
                self.sampler,
                self.engine,
                staleness=k,
                start_step=self.start_step,
                last_step=cfg.run.steps,
                seed_of=lambda b: rank_seed(step_seed(cfg.run.seed, b), env.rank),
                state_of=self._sampler_state,
                timeout_s=cfg.rollout.engine_timeout_s,
                pending=[decode_batch(p) for p in pending],
            )
            self.rollout.publish(self.start_step, self._weights_snapshot())  # the engine's own, kept for its batches
        elif pending:
            self.log.say(f"{sum(len(p['groups']) for p in pending)} groups the asynchronous loop had sampled ahead are "
                         "dropped (rollout.async_staleness is 0 now); their prompts are not trained on")  # fmt: skip
        self.async_stats: dict[str, float] = {}
        share = dict(rank=env.rank, world_size=env.world_size)
        self.heldout = HeldOutEval(cfg, self.eval_prompts, self.checker, self.engine, **share, say=self.log.say)

    def close(self) -> None:
        """The end of the run: the engine shut down, then the run folder's lock let go."""
        try:
            if self.rollout is not None:
                self.rollout.close()  # the producer first: it stops before its next batch
            # The engine first: vLLM tears down its process groups (built on the job's) at shutdown.
            self.engine.close()
        finally:
            self.folder.unlock()

    def _load(self) -> None:
        """Everything a run needs before its first step, cheap checks first; the folder is claimed already."""
        cfg, env = self.cfg, self.env
        self.log.open_loggers()
        threads = cfg.run.threads
        if threads is None and cfg.rollout.async_staleness and self.env.device.type == "cpu":
            threads = cpu_share()  # the engine process computes beside the trainer: half the cores each
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(cfg.run.seed)

        # Cheap checks first: model folder, tokenizer, data.
        self.model_dir = resolve_model(cfg.model.path)
        check_weights(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        prompts = self._load_prompts(cfg.data.train, cfg.data.limit)
        self.prompt_ids = {p.example.id: p.token_ids for p in prompts}
        self.stream = PromptStream([p.example for p in prompts], seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.eval_prompts = self._load_prompts(cfg.eval.data, cfg.eval.limit) if cfg.eval.data is not None else []
        self.checker = AnswerChecker(**cfg.reward.checker_kwargs())
        self.budgets = cfg.reward.da_dler.make_budgets()
        if cfg.reward.penalty.name == "drqa":
            from .reward.budgets import ConciseLengths

            penalty = cfg.reward.penalty
            examples = [p.example for p in prompts]
            self.budgets = ConciseLengths.from_file(penalty.drqa_data, examples, penalty.length_budget)
        self.budgets = cfg.reward.budget_schedule.wrap(self.budgets, cfg.reward.penalty.length_budget)

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
        self.checkpointer = Checkpointer(
            cfg, self.out, self.model_dir, (self.policy, self.optimizer, self.scheduler), self.stream, self.budgets,
            self.log,
        )  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``run.steps``; returns the run's summary (also written to OUT/summary.json)."""
        if "before" not in self.history and self.heldout:
            self.history["before"] = self.heldout.run("before training").as_dict()
        if self.rollout is not None:
            self.rollout.start()  # after the evaluation before training, which had the engine to itself
        self.log.open_bar()
        step, verdict = self.start_step, Verdict(stop=False, diverged=None)
        with RunControl(self.cfg, has_eval=bool(self.heldout)) as control:
            for step in range(self.start_step + 1, self.cfg.run.steps + 1):
                self.timer.start()
                groups, sampling = self.collect(step)  # prompts -> rollouts -> rewards -> dynamic sampling
                rows, advantages = self.advantages(groups)  # batch-normalised advantages
                rows = self.log_probs(rows)  # old (and reference) log-probs
                update = self.update(rows, step)  # the policy update
                self.sync_weights(step)  # weights to the rollout engine
                record = self.record(step, sampling, advantages, update, rows)
                # a stop request or divergence, on every rank alike
                verdict = control.vote(update, self.policy, self.checkpointer.start_weight_norm)
                self.close_step(step, record, verdict, control)
                if verdict.stop:
                    break
        self.log.close_bar()
        return self.finish(step, stopped=verdict.stop)

    def close_step(self, step: int, record: dict[str, Any], verdict: Verdict, control: RunControl) -> None:
        """After the step: the evaluation if due, the record, then a diverged run's error (nothing of the
        step saved) or the checkpoint if due."""
        if control.eval_due(step, verdict):
            record["eval"] = self.evaluate(step, f"step {step}")
        self.log.record(record)
        if verdict.diverged is not None:
            raise self.checkpointer.divergence_error(step, verdict.diverged)
        if self.checkpointer.due(step, stopping=verdict.stop):
            in_flight = self.rollout.checkpoint_state(step) if self.rollout is not None else None
            self.checkpointer.save(step, self.history, record, rollout_state=in_flight)
        if verdict.stop:
            self.log.say(f"stopped after step {step}; resume with: dler train --resume {self.out}")

    def finish(self, step: int, *, stopped: bool) -> dict[str, Any]:
        """The final evaluation (unless a stop request skipped it) and the run's summary."""
        finished = step == self.cfg.run.steps
        if finished and "after" not in self.history and self.heldout:
            if stopped:
                command = self.heldout.command(step, self.checkpointer.model_dir(step), self.out / f"eval-step-{step}")
                self.log.say(f"the final evaluation was skipped (stop requested); run it with: {command}")
            else:
                self.history["after"] = self.evaluate(step, f"after step {step}")
        summary = self.log.finish(step, finished, self.history, kernels=loss_backend(self.env.device))
        if stopped:
            summary["stopped"] = True
        return summary

    def evaluate(self, step: int, label: str) -> dict[str, Any]:
        """The held-out evaluation of the weights of ``step`` (the asynchronous engine's between two batches)."""
        if self.rollout is None:
            return self.heldout.run(label).as_dict()
        with self.rollout.engine_at(step):
            return self.heldout.run(label).as_dict()

    # -- one step, in data-flow order ----------------------------------------------------------

    def collect(self, step: int) -> tuple[list[ScoredGroup], SamplingStats]:
        """``prompts_per_step`` scored groups with spread (dynamic sampling) from this rank's engine; from the
        asynchronous loop's queue when it runs (sampled ahead, with the weights of step - 1 - k)."""
        if self.rollout is not None:
            return self._take(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SamplingWarning)
            seed = rank_seed(step_seed(self.cfg.run.seed, step), self.env.rank)
            groups, stats = self.sampler.collect(step, seed=seed)
        for w in caught:
            self.log.say(f"step {step}: {w.message}")
        self.timer.add("rollout_s", stats.generate_seconds)
        self.timer.add("score_s", stats.score_seconds)
        self.engine.sleep()  # its device memory goes to the update (where the engine can sleep at all)
        return groups, stats

    def _take(self, step: int) -> tuple[list[ScoredGroup], SamplingStats]:
        batch: StepBatch
        batch, waited = self.rollout.take(step)
        for message in batch.warnings:
            self.log.say(f"step {step}: {message}")
        self.timer.add("rollout_s", batch.stats.generate_seconds)
        self.timer.add("score_s", batch.stats.score_seconds)
        self.timer.add("rollout_wait_s", waited)
        self.async_stats = {
            "staleness": batch.staleness,
            "sampled_with_step": batch.version,
            "stale_dropped_groups": self.rollout.dropped_groups if step == self.start_step + 1 else 0,
        }
        self._compute_start = time.perf_counter()  # the trainer's work that generation can overlap starts here
        return batch.groups, batch.stats

    def advantages(self, groups: Sequence[ScoredGroup]) -> tuple[list[UpdateRow], dict[str, float]]:
        """Advantages over the global batch (gathered from every rank), one row per local response."""
        return global_advantages(
            groups,
            self.cfg.advantage_kwargs(),
            spread_on=self.cfg.rollout.sampling.dynamic_sampling_on,
            correct_boost=self.cfg.algorithm.correct_advantage_boost,
        )

    def log_probs(self, rows: list[UpdateRow]) -> list[UpdateRow]:
        """The rows with their old log-probs, and the reference's when the KL term is on; both with the
        no-grad kernel. The old ones are the current policy's (``algorithm.old_logprobs: recompute``: the
        sampler's differ by the engine's numerics, and mini-batches make them stale), with the rollout
        correction's weights and mask from both; or the engine's own (``sampler``, the bypass: no forward)."""
        a = self.cfg.algorithm
        settings = dict(token_budget=a.micro_batch_tokens, temperature=a.temperature, device=self.env.device,
                        lm_head_fp32=a.lm_head_fp32)  # fmt: skip
        needs_sampler = a.old_logprobs == "sampler" or a.rollout_correction.mode != "none"
        if needs_sampler:
            require_sampler_logprobs(rows, self.cfg)
        with self.timer.phase("logprob_s"):
            if a.old_logprobs == "sampler":
                old = [row.sampler_logprobs for row in rows]
            else:
                old = compute_logprobs(self.policy, rows, **settings, fused_head=self.fused_head)
            ref = [None] * len(rows)
            if self.reference is not None:
                ref = compute_logprobs(self.reference, rows, **settings, fused_head=self.fused_head)
        rows = [replace(row, old_logprobs=o, ref_logprobs=r) for row, o, r in zip(rows, old, ref)]
        if a.rollout_correction.mode == "none":
            return rows
        fixes = correct_rows(a.rollout_correction, old, [row.sampler_logprobs for row in rows])
        return [replace(row, token_weights=f.weights, loss_mask=f.mask) for row, f in zip(rows, fixes)]

    def update(self, rows: list[UpdateRow], step: int) -> dict[str, float]:
        """``epochs_per_step`` passes over the batch in mini-batches of whole prompt groups, one optimizer
        step each; then one scheduler step. Returns token-weighted means of the loss metrics."""
        cfg, a = self.cfg, self.cfg.algorithm
        per_group = cfg.rollout.sampling.samples_per_prompt
        groups = [rows[i : i + per_group] for i in range(0, len(rows), per_group)]
        local_mini = a.mini_batch_prompts // self.env.world_size
        # Ranks may hold different numbers of groups when dynamic sampling was capped: every rank
        # runs as many optimizer steps as the rank with the most (FSDP's collectives must pair up).
        n_mini = max(collective.gather(math.ceil(len(groups) / local_mini)))
        loss_kwargs = cfg.policy_loss_kwargs()
        totals = UpdateTotals()
        with self.timer.phase("update_s"):
            self.policy.train()
            for epoch in range(a.epochs_per_step):
                order = list(range(len(groups)))
                random.Random(epoch_shuffle_seed(step_seed(cfg.run.seed, step), epoch)).shuffle(order)
                for m in range(n_mini):
                    mini = [row for g in order[m * local_mini : (m + 1) * local_mini] for row in groups[g]]
                    metrics = accumulate_gradients(
                        self.policy,
                        mini,
                        loss_kwargs,
                        token_budget=a.micro_batch_tokens,
                        device=self.env.device,
                        fused_head=self.fused_head,
                        lm_head_fp32=a.lm_head_fp32,
                    )
                    sum_replicated_gradients(self.policy)  # data parallel without FSDP: one gradient for all
                    grad_norm = clip_gradients(self.policy, cfg.optim.grad_clip)
                    if metrics and math.isfinite(grad_norm):
                        self.optimizer.step()
                    elif metrics:
                        totals.skip()  # a non-finite gradient would poison every weight: skip, report
                    self.optimizer.zero_grad(set_to_none=True)
                    if metrics:
                        totals.add(metrics, grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
        return totals.means(lr)

    def sync_weights(self, step: int) -> None:
        """The full weights, gathered from the shards one tensor at a time, into the rollout engine.

        A sleeping engine wakes in two parts around the load, and the update's cached device memory
        (activations, gradient buckets, gather buffers) is handed back before each part takes its
        share: the weights first (the KV cache is not needed to load them), the KV cache last.
        The asynchronous loop instead publishes a CPU copy, which the engine loads when a batch needs it."""
        if self.rollout is not None:
            with self.timer.phase("sync_s"):
                self.rollout.publish(step, self._weights_snapshot())
            return
        with self.timer.phase("sync_s"):
            release_cached_memory(self.env.device)
            self.engine.wake_up(["weights"])
            self.engine.update_weights(full_weights(self.policy, self._engine_dtype()))
            release_cached_memory(self.env.device)
            self.engine.wake_up(["kv_cache"])

    def record(self, step, sampling: SamplingStats, advantages, update, rows) -> dict[str, Any]:
        """One line of OUT/metrics.jsonl: rollout statistics over every generated response of every rank."""
        timings = {**self.timer.seconds, "step_s": self.timer.step_seconds()}
        if self.rollout is not None:
            # The fraction of the step in which the engine generated while the trainer worked (after its wait).
            overlap = self.rollout.overlap_seconds(self._compute_start, time.perf_counter())
            timings["overlap"] = overlap / timings["step_s"] if timings["step_s"] > 0 else 0.0
            timings.update(self.async_stats)
            timings["stale_dropped_groups"] = sum(collective.gather(self.async_stats["stale_dropped_groups"]))
        a = self.cfg.algorithm
        # In the bypass the old log-probs are the sampler's: there is no trainer-side figure to compare.
        measured = a.old_logprobs == "recompute"
        mismatch = MismatchSums.of(rows, corrected=a.rollout_correction.mode != "none") if measured else None
        return step_record(
            step, sampling, rows, advantages, update, timings, with_budgets=self.budgets is not None, mismatch=mismatch
        )

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

    def _engine_kwargs(self, device: torch.device | None = None) -> dict[str, Any]:
        # The engine lives where this rank computes (unless given its own device): weight updates go there, and an
        # HF engine runs there. Its own output goes to the run folder's engine.log, not between the step table's rows.
        return dict(self.cfg.engine_kwargs(), device=str(device or self.env.device), log_file=self.out / ENGINE_LOG)

    def _engine_process_kwargs(self) -> dict[str, Any]:
        """The engine process's: on its own GPU (``rollout.engine_devices``, one per local rank) or the trainer's
        device; with its own thread count and the timeout every call is bounded by."""
        r, device, devices = self.cfg.rollout, self.env.device, None
        if r.engine_devices is not None:
            entries = [d.strip() for d in r.engine_devices.split(",") if d.strip()]
            if len(entries) <= self.env.local_rank:
                raise UserError(f"rollout.engine_devices names {len(entries)} devices, none for local rank "
                                f"{self.env.local_rank}: give one per local rank")  # fmt: skip
            devices, device = entries[self.env.local_rank], torch.device("cuda", 0)  # the one the child sees
        return dict(
            self._engine_kwargs(device), devices=devices, timeout_s=r.engine_timeout_s,
            threads=r.engine_threads if r.engine_threads is not None or device.type != "cpu" else cpu_share(),
        )  # fmt: skip

    def _weights_snapshot(self) -> list[tuple[str, torch.Tensor]]:
        """A CPU copy of the full weights (collective under FSDP), safe to hand to the engine process while the
        optimizer goes on changing the live ones."""
        return [(name, t.detach().to("cpu", copy=True)) for name, t in full_weights(self.policy, self._engine_dtype())]

    def _sampler_state(self) -> dict[str, Any]:
        """The data cursor and DA-DLER record as a checkpoint saves them (read by the producer after a batch)."""
        return {"stream": self.stream.state_dict(),
                "budgets": self.budgets.state_dict() if self.budgets is not None else None}  # fmt: skip

    def _engine_dtype(self) -> torch.dtype | None:
        dtype = self.cfg.rollout.dtype
        return None if dtype == "auto" else getattr(torch, dtype)


# ------------------------------------------------------------------------------------------ entry point


def cpu_share() -> int:
    """The torch threads each of the trainer and its engine process get on a CPU when both compute at once:
    half the cores. Measured on 2 cores: 1 + 1 threads gave 1.25 s steps, 2 (torch's default) + 1 gave
    2.34 s, slower than the synchronous loop's 1.75 s (OpenMP threads spin while they wait for a core)."""
    return max(1, (os.cpu_count() or 2) // 2)


def require_sampler_logprobs(rows: Sequence[UpdateRow], cfg: TrainConfig) -> None:
    """Refuse, on every rank alike, a batch without the engine's log-prob of every sampled token (the
    bypass and the rollout corrections need them): a rank that raised alone would leave the others waiting
    in the update's first collective."""
    missing = [i for i, row in enumerate(rows) if row.sampler_logprobs is None]
    if collective.any_rank(bool(missing)):
        which = f"response {missing[0]} of this rank" if missing else "a response of another rank"
        bypass = cfg.algorithm.old_logprobs == "sampler"
        key = (
            "algorithm.old_logprobs=sampler"
            if bypass
            else f"algorithm.rollout_correction {cfg.algorithm.rollout_correction.mode!r}"
        )
        fix = "algorithm.old_logprobs=recompute" if bypass else "algorithm.rollout_correction.mode=none"
        raise UserError(
            f"{key} needs the engine's log-prob of every sampled token, and the {cfg.rollout.engine} engine gave "
            f"none (or not one per token) for {which}; use {fix}"
        )


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
            trainer.close()
    finally:
        with contextlib.suppress(Exception):
            destroy_distributed()
