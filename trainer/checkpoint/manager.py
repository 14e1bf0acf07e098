"""Checkpoints that lose nothing: a resumed run continues exactly where the saved one stopped.

This module is the manager: the collective save and load sequences (in the write order explained
below), finding, verifying and pruning a run's checkpoints. The files of one checkpoint are
:mod:`trainer.checkpoint.files`' (their names :mod:`trainer.checkpoint.layout`'s), the manifest check
:mod:`trainer.checkpoint.verify`'s, the gathering of the distributed state :mod:`trainer.checkpoint.state`'s.

One checkpoint is the folder ``RUN/checkpoints/step-00000042/``::

    model/                the policy as a Hugging Face folder: transformers and vLLM load it as is
      config.json, generation_config.json, tokenizer and chat-template files (copied from the
      source model), model.safetensors (or model-0000i-of-0000n.safetensors + index above 5 GB)
    optimizer.pt          the full (gathered) optimizer state, keyed by parameter name
    scheduler.pt          the LR scheduler's state
    rng.pt                python / numpy / torch / CUDA generator states of every rank
    state.json            the trainer's own state (data cursor, DA-DLER record, ...) and versions
    manifest.json         size and sha256 of every file above
    .dler-complete        written last: without it the folder does not count

The weights in ``model/`` are the parameters in their own dtype (the fp32 masters under mixed
precision), so the same files serve both to export the policy and to resume it bit for bit.

**Why the write order.** Everything is written into a hidden temporary sibling, every file and
folder is fsynced, the manifest is written over the synced bytes, then the marker, then one
``rename`` makes the folder appear whole, and the parent is fsynced so that the rename survives
a power cut. A process killed at any moment leaves either the previous state or a hidden
``.step-*.tmp-*`` folder that :meth:`CheckpointManager.latest` ignores and the next save removes.
The manifest turns silent damage (a flipped bit, a truncated copy) into a clear error at load, and lets
a resume pass over a damaged checkpoint to the newest one that verifies (:meth:`CheckpointManager.newest_good`).
A checkpoint of a timeline abandoned by such a resume (newer than, or of the same step as, the next save)
is moved aside as ``abandoned-step-*``, never deleted.

**Distributed contract.** :meth:`CheckpointManager.save` and :meth:`CheckpointManager.load` are
collective: every rank calls them, in the same order as every other collective. Full tensors are
gathered to rank 0's CPU memory (``torch.distributed.checkpoint.state_dict`` with
``full_state_dict`` and ``cpu_offload``) and only rank 0 touches the file system; at load rank 0
reads and broadcasts (``broadcast_from_rank0``), and every rank re-shards to its own layout, so a
run may resume on another number of ranks. Without a process group all of this runs in-process on
a plain module. A failure on rank 0 (full disk, corrupt file) is broadcast and raised on every
rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..dist import collective
from ..fsutil import UserError, atomic_directory, is_complete
from . import files
from .layout import CHECKPOINTS_DIR, MANIFEST, MODEL_DIR, OPTIMIZER_FILE, STEP_DIR, step_dirs
from .state import (
    gather_model,
    gather_optimizer,
    gather_rng,
    restore_rng,
    set_hyperparameters,
    set_model,
    set_optimizer,
)
from .verify import CorruptCheckpoint, verify_checkpoint

logger = logging.getLogger("trainer.checkpoint")

# Hugging Face's own default shard size: larger single files are slow to hash, copy and upload.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


class CheckpointManager:
    """Saves, finds, verifies and loads the checkpoints of one run (``run_dir/checkpoints``).

    ``keep``: how many complete checkpoints survive a save (the newest ones). ``source_model_dir``:
    the model folder the run started from; its tokenizer, chat template and generation config are
    copied into every checkpoint's ``model/`` so that the folder is a complete, servable model.
    ``max_shard_bytes``: above this, weights are split into HF-style shards with an index.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        keep: int = 2,
        source_model_dir: Path | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        if keep < 1:
            raise UserError(f"keep must be at least 1 (the checkpoint a resume needs), got {keep}")
        if max_shard_bytes < 1:
            raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if source_model_dir is not None and not Path(source_model_dir).is_dir():
            raise UserError(f"source model folder {source_model_dir} does not exist")
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep = keep
        self.source_model_dir = Path(source_model_dir) if source_model_dir is not None else None
        self.max_shard_bytes = max_shard_bytes

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first; temporary and interrupted ones are left out."""
        return [(step, path) for step, path in step_dirs(self.root) if is_complete(path)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Checks the marker only (cheap); ``load`` verifies."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def verify(self, path: Path) -> None:
        """Raise a UserError naming the first missing, truncated or altered file of checkpoint ``path``."""
        verify_checkpoint(path)

    def newest_good(self, step: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The checkpoint to resume (collective): the newest complete one whose every file matches its
        manifest, or with ``step`` that step's own. Returns it (None when none verifies) and the ones passed
        over on the way, newest first, each with what is wrong with it.

        Rank 0 reads and hashes; the outcome is broadcast, so every rank resumes the same checkpoint.
        """
        found = self.checkpoints()
        if step is not None:
            found = [(s, p) for s, p in found if s == step]
            if not found:
                steps = ", ".join(str(s) for s, _ in self.checkpoints()) or "none"
                raise UserError(
                    f"{self.run_dir} has no complete checkpoint of step {step} (complete ones: steps {steps}); "
                    "pass one of those to --from-step"
                )

        def scan() -> tuple[str | None, list[tuple[str, str]]]:
            skipped = []
            for _, path in reversed(found):
                try:
                    verify_checkpoint(path)
                except CorruptCheckpoint as e:
                    skipped.append((str(path), e.detail))
                    continue
                return str(path), skipped
            return None, skipped

        good, skipped = collective.broadcast(
            collective.on_rank0(f"cannot read the checkpoints of {self.run_dir}", scan)
        )
        return (Path(good) if good else None), [(Path(p), why) for p, why in skipped]

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, scheduler, state: dict) -> Path | None:
        """Write checkpoint ``step`` (collective). Returns its path on rank 0, None on the other ranks.

        Every rank returns only once the checkpoint is durable (rank 0 also prunes old ones first), and
        every rank raises if rank 0 could not write it. ``state`` must be the same on every rank (rank
        0's is written). Gathers and writes one part at a time (weights, then optimizer) so that rank 0
        never holds both full copies in memory at once.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        _check_json(state)  # on every rank, before any collective: a bad state fails everywhere at once
        started = time.monotonic()
        final = self.step_dir(step)
        cannot_write = f"cannot write checkpoint {final}"
        with contextlib.ExitStack() as staging:
            tmp = collective.on_rank0(cannot_write, self._begin, staging, final, path=final)
            weights = gather_model(model)
            collective.on_rank0(cannot_write, self._write_model, tmp, model, weights, path=final)
            del weights
            optim_state, fresh = gather_optimizer(model, optimizer)
            collective.on_rank0(cannot_write, files.write_optimizer, tmp, optim_state, fresh, path=final)
            del optim_state
            rng = gather_rng()
            collective.on_rank0(cannot_write, files.write_small_files, tmp, step, scheduler, rng, state, path=final)
            collective.on_rank0(cannot_write, files.seal, tmp, step, path=final)
            # Closing the stack runs atomic_directory's exit: marker, then the rename into place.
            collective.on_rank0(cannot_write, files.commit, staging, final, path=final)
        if collective.rank() != 0:
            return None
        self._prune(step)
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        logger.info("checkpoint %s saved (%s) in %.1f s", final, files.human_size(size), time.monotonic() - started)
        return final

    def _begin(self, staging: contextlib.ExitStack, final: Path) -> Path:
        logger.info("saving checkpoint %s", final)
        self._remove_leftovers()
        if is_complete(final):
            # The same step of a timeline abandoned by resuming an older checkpoint (--from-step, or a
            # damaged newer one skipped): set aside like the newer ones, never replaced.
            self._set_aside(final, int(final.name.removeprefix("step-")))
        return staging.enter_context(atomic_directory(final, overwrite=True))

    def _set_aside(self, path: Path, step: int) -> None:
        aside = path.with_name(f"abandoned-{path.name}-{int(time.time())}")
        os.rename(path, aside)
        logger.warning(
            "moved %s to %s: it is from the run that was resumed at an older checkpoint (now at step %d); "
            "delete it when it is no longer needed",
            path,
            aside,
            step,
        )

    def _write_model(self, tmp: Path, model, weights: dict) -> None:
        folder = tmp / MODEL_DIR
        folder.mkdir()
        files.write_safetensors(folder, files.hf_tensors(model, weights), self.max_shard_bytes)
        files.write_config(folder, model)
        files.copy_source_files(folder, self.source_model_dir)
        files.write_generation_config(folder, model)

    def _remove_leftovers(self) -> None:
        """Remove what killed saves left behind: hidden temporary folders, and step folders renamed
        into place whose marker never reached the disk (a crash between rename and fsync)."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            temporary = entry.name.startswith(".step-") and (".tmp-" in entry.name or ".old-" in entry.name)
            interrupted = STEP_DIR.fullmatch(entry.name) is not None and not is_complete(entry)
            if entry.is_dir() and (temporary or interrupted):
                logger.info("removing %s, left by an interrupted save", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` checkpoints up to ``step``; move aside those newer than ``step``.

        Checkpoints newer than the one just written belong to a timeline that was abandoned by
        resuming an older checkpoint: left in place, ``latest()`` would resume them instead of this
        run. They are renamed (not deleted: they may be the user's best models) and reported.
        """
        try:
            complete = self.checkpoints()
            for other_step, path in complete:
                if other_step > step:
                    self._set_aside(path, step)
            current = [(s, p) for s, p in complete if s <= step]
            for _, path in current[: max(0, len(current) - self.keep)]:
                logger.info("removing old checkpoint %s (keep=%d)", path, self.keep)
                shutil.rmtree(path)
            files.fsync_path(self.root)
        except OSError as e:  # the new checkpoint is safe; failing to tidy up must not fail the run
            logger.warning("could not prune old checkpoints in %s: %s", self.root, e)

    # -- load ----------------------------------------------------------------------------------

    def load(self, path: Path, model, optimizer, scheduler, *, verify: bool = True) -> dict:
        """Restore model, optimizer, scheduler and RNG from checkpoint ``path`` (collective); return the
        trainer state given to :meth:`save`.

        Rank 0 verifies every checksum first (unless ``verify`` is False: :meth:`newest_good` just did) and
        reads the files; the other ranks receive everything by broadcast (their ``path`` is not read). Call
        it after the model is wrapped with FSDP2 and the optimizer and scheduler are built, and before
        anything draws random numbers.
        """
        path = Path(path).expanduser().absolute()
        cannot_read = f"cannot read checkpoint {path}"
        weights = collective.on_rank0(cannot_read, files.read_checked_weights, path, model, verify, path=path) or {}
        set_model(model, weights)
        del weights
        payload = collective.on_rank0(cannot_read, files.torch_load, path / OPTIMIZER_FILE, path=path) or {}
        if collective.broadcast(payload.get("fresh")):  # saved before its first step: hyperparameters only
            set_hyperparameters(optimizer, collective.broadcast(payload.get("state_dict", {}).get("param_groups")))
        else:
            set_optimizer(model, optimizer, payload.get("state_dict", {}))
        del payload
        small = collective.broadcast(collective.on_rank0(cannot_read, files.read_small_files, path, path=path))
        scheduler.load_state_dict(small["scheduler"])
        restore_rng(small["rng"])
        saved = small["state"]
        if collective.rank() == 0:
            if saved["world_size"] != collective.world_size():
                logger.info(
                    "checkpoint %s was saved by %d ranks, loaded by %d",
                    path,
                    saved["world_size"],
                    collective.world_size(),
                )
            logger.info("resumed from checkpoint %s (step %d)", path, saved["step"])
        return saved["trainer"]


# ----------------------------------------------------------------------------------------------
# Module-level helpers for the CLI and tools
# ----------------------------------------------------------------------------------------------


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder given either itself or a run folder (then its newest complete checkpoint)."""
    path = Path(path).expanduser().absolute()
    if STEP_DIR.fullmatch(path.name) or (path / MANIFEST).is_file() or is_complete(path):
        return path
    found = CheckpointManager(path).latest()
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint (looked for {path / CHECKPOINTS_DIR / 'step-*'})")
    return found


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint (or of a run folder's newest one) without touching any tensor."""
    return files.read_state_json(find_checkpoint(path))["trainer"]


def export_hf(path_or_ckpt: Path) -> Path:
    """The verified Hugging Face folder of a checkpoint, or of a run folder's newest checkpoint."""
    ckpt = find_checkpoint(path_or_ckpt)
    verify_checkpoint(ckpt, only=f"{MODEL_DIR}/")
    return ckpt / MODEL_DIR


def _check_json(value: Any, where: str = "state") -> None:
    """Refuse trainer state that JSON would not give back unchanged (non-string keys, objects);
    tuples come back as lists, which is the one change allowed."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r} ({type(key).__name__}); JSON keys are strings, so it would come "
                    f"back as {str(key)!r}: convert it before saving"
                )
            _check_json(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold; the trainer state must be plain data"
    )
