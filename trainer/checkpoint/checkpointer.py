"""The run's checkpoint decisions: when a step is saved, what the trainer's own state is, which checkpoint
a resume continues from and what it restores; and where a diverged run goes on from.

The files themselves are :class:`trainer.checkpoint.manager.CheckpointManager`'s; this component gives it the
run's parts (policy, optimizer, scheduler, every rank's data cursor and DA-DLER record, the evaluation
history) and the rules: a checkpoint at every ``run.save_every`` steps, at the last step and when the
run stops on request; never one of a diverged step. Each checkpoint carries its health figures (the loss and
gradient norm of its step, its weights' norm and the start's), by which a diverged run's error names only a
checkpoint that is good (``schedule.checkpoint_trouble``) as the one to continue from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import PromptStream
from ..dist import collective
from ..fsutil import UserError
from ..reward.budgets import DifficultyBudgets
from ..run.run_log import CONFIG_FILE, RunLog
from ..run.schedule import checkpoint_trouble
from ..update.optim import apply_config, weight_norm
from .files import read_state_json
from .layout import MODEL_DIR
from .manager import CheckpointManager
from .run_folder import restart_folder, start_over_command, start_over_folder


@dataclass
class Restored:
    """What a resume continues from: the step saved, the evaluation history, the saved policy's model folder."""

    step: int
    history: dict[str, Any]
    model_dir: Path
    pending: list[dict[str, Any]]  # the asynchronous loop's batches made for later steps (encoded), this rank's


class Checkpointer:
    """Saves and restores one run's state in ``out`` (collective: every rank calls every method alike)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        model_dir: Path,
        parts: tuple[Any, Any, Any],
        stream: PromptStream,
        budgets: DifficultyBudgets | None,
        log: RunLog,
    ):
        self.cfg, self.out, self.log = cfg, out, log
        self.policy, self.optimizer, self.scheduler = parts
        self.stream, self.budgets = stream, budgets
        self.manager = CheckpointManager(out, keep=cfg.run.keep_checkpoints, source_model_dir=model_dir)
        self.start_weight_norm: float | None = None  # the weights' norm the run started from (fresh or restored)

    def measure_start(self) -> None:
        """Note the norm of the weights a fresh run starts from, which its checkpoints are judged by (collective)."""
        self.start_weight_norm = weight_norm(self.policy)

    def due(self, step: int, stopping: bool) -> bool:
        save_every = self.cfg.run.save_every
        return stopping or step == self.cfg.run.steps or bool(save_every and step % save_every == 0)

    def save(
        self, step: int, history: dict[str, Any], record: dict[str, Any], rollout_state: dict | None = None
    ) -> None:
        """Checkpoint ``step`` (collective), with the health figures of its step's ``record``. The asynchronous
        loop gives ``rollout_state`` (``AsyncRollout.checkpoint_state``): its batches for later steps, and the
        stream and DA-DLER state after them, which are saved in place of the live ones."""
        health = {
            "loss": record.get("loss"),
            "grad_norm": record.get("grad_norm"),
            "weight_norm": weight_norm(self.policy),
            "start_weight_norm": self.start_weight_norm,
        }
        if rollout_state is None:
            sampler_state = {"stream": self.stream.state_dict(), "budgets": None}
            if self.budgets is not None:
                sampler_state["budgets"] = self.budgets.state_dict()
        else:
            sampler_state = rollout_state["state"]
        state = {
            "step": step,
            "streams": collective.gather(sampler_state["stream"]),
            "budgets": collective.gather(sampler_state["budgets"]) if self.budgets is not None else None,
            "history": history,
            "health": health,
        }
        if rollout_state is not None:
            state["pending"] = collective.gather(rollout_state["pending"])
        path = self.manager.save(step, self.policy, self.optimizer, self.scheduler, state)
        if path is not None:
            self.log.say(f"checkpoint {path}")
            trouble = checkpoint_trouble(health)
            if trouble is not None:
                self.log.warn(f"checkpoint {path} is not a good one to continue from: {trouble}")

    def model_dir(self, step: int) -> Path:
        """The model folder of checkpoint ``step``."""
        return self.manager.step_dir(step) / MODEL_DIR

    def restore(self, from_step: int | None = None) -> Restored:
        """Load the newest checkpoint of OUT that verifies (or step ``from_step``'s). Damaged checkpoints
        are passed over with one line each; the ones newer than the checkpoint resumed are moved aside at
        the next save (``CheckpointManager._prune``)."""
        if self.manager.latest() is None:
            raise UserError(
                f"{self.out} has no complete checkpoint to resume from: the run stopped before its first save; "
                f"start it over with `{start_over_command(self.out, start_over_folder(self.out))}`"
            )
        path, skipped = self.manager.newest_good(from_step)
        for bad, why in skipped:
            self.log.warn(f"skipping checkpoint {bad}: {why}")
        if path is None:
            if from_step is not None:
                raise UserError(
                    f"{self.out}: the checkpoint of step {from_step} does not verify; resume from the newest one "
                    f"that does with `dler train --resume {self.out}` (without --from-step)"
                )
            restart = start_over_command(self.out, restart_folder(self.out))
            raise UserError(
                f"{self.out}: none of its {len(skipped)} checkpoints verifies, so nothing can resume it; "
                f"start over in a new folder with `{restart}`"
            )
        state = self.manager.load(path, self.policy, self.optimizer, self.scheduler, verify=False)
        saved_lr = self.scheduler.base_lrs[0]
        apply_config(self.optimizer, self.scheduler, self.cfg.optim)  # the resume's own optim.* overrides
        if saved_lr != self.cfg.optim.lr:
            self.log.say(f"optim.lr: {saved_lr:g} until step {int(state['step'])}, {self.cfg.optim.lr:g} from here on")
        streams, budgets = state["streams"], state["budgets"]
        world, rank = collective.world_size(), collective.rank()
        if len(streams) != world:
            raise UserError(
                f"{path} was saved by {len(streams)} ranks; resume it with the same number of processes "
                f"(now {world}) so that every rank continues its own prompts exactly"
            )
        self.stream.load_state_dict(streams[rank])
        if self.budgets is not None and budgets is not None:
            self.budgets.load_state_dict(budgets[rank])
        self.start_weight_norm = (state.get("health") or {}).get("start_weight_norm")
        pending = state["pending"][rank] if state.get("pending") else []
        restored = Restored(int(state["step"]), dict(state.get("history", {})), path / MODEL_DIR, pending)
        self.log.resume_at(restored.step)
        self.log.say(f"resumed from {path} at step {restored.step}")
        return restored

    def divergence_error(self, step: int, why: str) -> UserError:
        """The error that stops a diverged run, with the way on from its newest good checkpoint, if any
        (collective: rank 0 reads the checkpoints' health, every rank gets the same message)."""
        message = collective.on_rank0(f"cannot read the checkpoints of {self.out}", self._divergence_message, step, why)
        return UserError(collective.broadcast(message))

    def _divergence_message(self, step: int, why: str) -> str:
        checkpoints = []
        for saved, path in reversed(self.manager.checkpoints()):
            try:
                trainer_state = read_state_json(path)["trainer"]
            except (OSError, UserError):  # unreadable or damaged (CorruptCheckpoint): not one to recommend
                trainer_state = None
            health = trainer_state.get("health") if isinstance(trainer_state, dict) else None
            checkpoints.append((saved, path, health))
        return divergence_message(self.out, step, why, self.cfg.optim.lr, checkpoints)


def divergence_message(
    out: Path, step: int, why: str, lr: float, checkpoints: list[tuple[int, Path, dict[str, Any] | None]]
) -> str:
    """What a diverged run says: what diverged, and the way on: ``checkpoints`` are the run's complete ones,
    newest first, as (step, path, health figures); only one that ``schedule.checkpoint_trouble`` passes is
    offered to continue from, and none is called good that was not checked."""
    said = f"step {step}: training diverged ({why}, optim.lr={lr}); stopped without saving this state; "
    if not checkpoints:
        return said + (
            f"no checkpoint was saved yet: start over with `dler train {out / CONFIG_FILE} run.out={out} "
            f"optim.lr=SMALLER`"
        )
    newest_step, _, newest_health = checkpoints[0]
    for saved, path, health in checkpoints:
        if checkpoint_trouble(health) is None:
            ratio = health["weight_norm"] / health["start_weight_norm"]
            checked = f"step {saved}: finite loss and gradient norm, weights' norm {ratio:.3g} times the start's"
            if saved == newest_step:
                return said + (
                    f"the last good checkpoint is {path} ({checked}): continue from it with "
                    f"`dler train --resume {out} optim.lr=SMALLER`"
                )
            return said + (
                f"the newest good checkpoint is {path} ({checked}; the newer step {newest_step}'s is not: "
                f"{checkpoint_trouble(newest_health)}): continue from it with "
                f"`dler train --resume {out} --from-step {saved} optim.lr=SMALLER`"
            )
    restart = start_over_command(out, restart_folder(out))
    return said + (
        f"no checkpoint of the run is known to be good (the newest, step {newest_step}'s: "
        f"{checkpoint_trouble(newest_health)}): start over in a new folder with `{restart} optim.lr=SMALLER`"
    )
