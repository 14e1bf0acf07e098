"""The run's checkpoint decisions: when a step is saved, what the trainer's own state is, which checkpoint
a resume continues from and what it restores; and where a diverged run goes on from.

The files themselves are :class:`trainer.checkpoint.CheckpointManager`'s; this component gives it the
run's parts (policy, optimizer, scheduler, every rank's data cursor and DA-DLER record, the evaluation
history) and the rules: a checkpoint at every ``run.save_every`` steps, at the last step and when the
run stops on request; never one of a diverged step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import collective
from .budgets import DifficultyBudgets
from .checkpoint import CheckpointManager
from .checkpoint_layout import MODEL_DIR
from .config import TrainConfig
from .data import PromptStream
from .fsutil import UserError
from .run_folder import restart_folder, start_over_command, start_over_folder
from .run_log import CONFIG_FILE, RunLog


@dataclass
class Restored:
    """What a resume continues from: the step saved, the evaluation history, the saved policy's model folder."""

    step: int
    history: dict[str, Any]
    model_dir: Path


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

    def due(self, step: int, stopping: bool) -> bool:
        save_every = self.cfg.run.save_every
        return stopping or step == self.cfg.run.steps or bool(save_every and step % save_every == 0)

    def save(self, step: int, history: dict[str, Any]) -> None:
        state = {
            "step": step,
            "streams": collective.gather(self.stream.state_dict()),
            "budgets": collective.gather(self.budgets.state_dict()) if self.budgets is not None else None,
            "history": history,
        }
        path = self.manager.save(step, self.policy, self.optimizer, self.scheduler, state)
        if path is not None:
            self.log.say(f"checkpoint {path}")

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
        restored = Restored(int(state["step"]), dict(state.get("history", {})), path / MODEL_DIR)
        self.log.resume_at(restored.step)
        self.log.say(f"resumed from {path} at step {restored.step}")
        return restored

    def divergence_error(self, step: int, why: str) -> UserError:
        """The error that stops a diverged run, with the way on from its last good state."""
        last = self.manager.latest()
        keep = (
            f"the last good checkpoint is {last}: continue from it with `dler train --resume {self.out} "
            f"optim.lr=SMALLER`"
            if last is not None
            else f"no checkpoint was saved yet: start over with `dler train {self.out / CONFIG_FILE} "
            f"run.out={self.out} optim.lr=SMALLER`"
        )
        return UserError(
            f"step {step}: training diverged ({why}, optim.lr={self.cfg.optim.lr}); stopped without saving "
            f"this state; {keep}"
        )
