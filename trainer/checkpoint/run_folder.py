"""Whose ``run.out`` is it: claiming the folder for a fresh run or a resume, giving back a claim whose start
failed, and the commands that start a run over.

``run.out`` is checked by ``fsutil.check_output`` before anything is written: a new or empty folder is
started; a folder an earlier ``dler train`` made (its ``.dler-run`` marker) is refused with ``--resume``
as the way on, unless it is a failed start (no complete checkpoint), which a fresh run takes over; any
other non-empty folder is the user's and is refused untouched.

One run at a time: the claim (fresh or resume) takes the folder's lock (``fsutil.FolderLock``) and holds it
until the run ends, so a second ``dler train`` on the same ``run.out`` stops at once with one line naming the
holder's pid, instead of both writing the same metrics and moving each other's checkpoints aside. All ranks
of a job share the folder: rank 0 alone takes the lock, for the job.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from pathlib import Path

from ..dist import collective
from ..fsutil import LOCK_FILE, OWNER_MARKER, FolderLock, UserError, check_output, mark_owner, owner
from ..run.run_log import CONFIG_FILE, METRICS_FILE
from .layout import CHECKPOINTS_DIR
from .manager import CheckpointManager


class RunFolder:
    """The claim on ``out`` of one ``dler train``; ``say`` prints a line on the console."""

    def __init__(self, out: Path, say: Callable[[str], None]):
        self.out, self.say = out, say
        self.created = False  # whether the claim made the folder (on rank 0)
        self.lock = FolderLock(out, "train", name="run.out")  # taken on rank 0 only

    def claim(self, resume: bool) -> bool:
        """Take the folder's lock and check that run.out may be written (``fsutil.check_output``, the rule of
        every dler command); returns True when a fresh run takes over a failed start (a run folder with no
        complete checkpoint: nothing in it can be resumed, so starting it over is what its owner wants).
        Collective; the lock is held until :meth:`unlock` or the process ends."""
        # Rank 0 decides, claims and locks (the folder is shared); every rank gets its outcome, so that a refusal
        # (or any failure) stops them all instead of leaving the others waiting in the next collective.
        claim = self._lock if resume else self._claim
        return bool(collective.broadcast(collective.on_rank0("cannot create run.out", claim, path=self.out)))

    def release(self, resume: bool) -> None:
        """Give back a folder claimed by a start that failed before it wrote anything (a bad model path, a
        missing package): it holds only the marker and the lock, so it goes, and the user's view is as before
        the run. The lock is let go in every case."""
        if resume or collective.rank() != 0:
            self.unlock()
            return
        with contextlib.suppress(OSError):
            if {p.name for p in self.out.iterdir()} <= {OWNER_MARKER, LOCK_FILE}:
                for name in (OWNER_MARKER, LOCK_FILE):
                    (self.out / name).unlink(missing_ok=True)
                if self.created:
                    self.out.rmdir()
        self.unlock()

    def unlock(self) -> None:
        """Let go of the folder's lock (at the end of the run; the process's end would too)."""
        self.lock.release()

    def _lock(self) -> bool:
        if not self.lock.acquire():
            self.say(f"{self.out}: this file system has no file locks; nothing stops a second run on this folder")
        return False

    def _claim(self) -> bool:
        # A folder of ours may have a run in it now: name it (its pid) before judging what the folder holds.
        locked_first = self.out.is_dir() and owner(self.out) == "train"
        if locked_first:
            self._lock()
        try:
            return self._check_and_mark(locked_first)
        except BaseException:
            self.lock.release()
            raise

    def _check_and_mark(self, locked: bool) -> bool:
        resume_hint = f"continue it with `dler train --resume {self.out}`, or set run.out to another folder"
        if owner(self.out) is None and is_legacy_run(self.out):
            # Made by a dler from before the marker: ours, but without it nothing may be taken over.
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        state = check_output(self.out, "train", flag=None, name="run.out", ours_ok=True)
        if state == "ours" and CheckpointManager(self.out).latest() is not None:
            raise UserError(f"{self.out} already holds a run: {resume_hint}")
        # Claimed now, before the minutes of loading: a read-only or unusable run.out fails at once.
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        # The marker before the lock: a second run that starts meanwhile sees a folder of ours and asks for the
        # lock too, and one of the two gets it.
        mark_owner(self.out, "train")
        if not locked:
            self._lock()
        if state == "ours":
            self.say(f"{self.out} holds a run that stopped before its first checkpoint: starting it over")
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
