"""Whose ``run.out`` is it: claiming the folder for a fresh run, giving back a claim whose start failed, and
the commands that start a run over.

``run.out`` is checked by ``fsutil.check_output`` before anything is written: a new or empty folder is
started; a folder an earlier ``dler train`` made (its ``.dler-run`` marker) is refused with ``--resume``
as the way on, unless it is a failed start (no complete checkpoint), which a fresh run takes over; any
other non-empty folder is the user's and is refused untouched.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from pathlib import Path

from . import collective
from .checkpoint import CheckpointManager
from .checkpoint_layout import CHECKPOINTS_DIR
from .fsutil import OWNER_MARKER, UserError, check_output, mark_owner, owner
from .run_log import CONFIG_FILE, METRICS_FILE


class RunFolder:
    """The claim on ``out`` of one ``dler train``; ``say`` prints a line on the console."""

    def __init__(self, out: Path, say: Callable[[str], None]):
        self.out, self.say = out, say
        self.created = False  # whether the claim made the folder (on rank 0)

    def claim(self, resume: bool) -> bool:
        """Whether run.out may be written (``fsutil.check_output``, the rule of every dler command); returns
        True when a fresh run takes over a failed start (a run folder with no complete checkpoint: nothing
        in it can be resumed, so starting it over is what its owner wants). Collective."""
        if resume:
            return False
        # Rank 0 decides and claims (the folder is shared); every rank gets its outcome, so that a refusal
        # (or any failure) stops them all instead of leaving the others waiting in the next collective.
        return collective.broadcast(collective.on_rank0("cannot create run.out", self._claim, path=self.out))

    def release(self, resume: bool) -> None:
        """Give back a folder claimed by a start that failed before it wrote anything (a bad model path, a
        missing package): it holds only the marker, so it goes, and the user's view is as before the run."""
        if resume or collective.rank() != 0:
            return
        with contextlib.suppress(OSError):
            if [p.name for p in self.out.iterdir()] == [OWNER_MARKER]:
                (self.out / OWNER_MARKER).unlink()
                if self.created:
                    self.out.rmdir()

    def _claim(self) -> bool:
        resume_hint = f"continue it with `dler train --resume {self.out}`, or set run.out to another folder"
        if owner(self.out) is None and is_legacy_run(self.out):
            # Made by a dler from before the marker: ours, but without it nothing may be taken over.
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        state = check_output(self.out, "train", flag=None, name="run.out", ours_ok=True)
        if state == "ours" and CheckpointManager(self.out).latest() is not None:
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        if state == "ours":
            self.say(f"{self.out} holds a run that stopped before its first checkpoint: starting it over")
        # Claimed now, before the minutes of loading: a read-only or unusable run.out fails at once.
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        mark_owner(self.out, "train")
        return state == "ours"


def is_legacy_run(out: Path) -> bool:
    """A run folder written before runs carried their owner marker (``fsutil.mark_owner``): a config plus
    metrics or checkpoints."""
    return (out / CONFIG_FILE).is_file() and ((out / METRICS_FILE).is_file() or (out / CHECKPOINTS_DIR).is_dir())


def start_over_command(run: Path, out: Path) -> str:
    """The command that starts run ``run`` over with its own config, into ``out``."""
    return shlex.join(["dler", "train", str(run / CONFIG_FILE), f"run.out={out}"])


def start_over_folder(out: Path) -> Path:
    """Where a start-over of ``out`` goes: the folder itself if a fresh run may take it over (a failed
    start of ours), else a new sibling."""
    return out if owner(out) == "train" else restart_folder(out)


def restart_folder(out: Path) -> Path:
    """The sibling a run that cannot be taken over starts again in."""
    return out.with_name(out.name + "-restart")
