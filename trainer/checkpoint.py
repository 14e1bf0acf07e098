"""Checkpoints that lose nothing: a resumed run continues exactly where the saved one stopped.

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
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from . import collective
from .chunking import chunks_by_size, nbytes
from .fsutil import COMPLETE_MARKER, UserError, atomic_directory, is_complete

logger = logging.getLogger("trainer.checkpoint")

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Hugging Face's own default shard size: larger single files are slow to hash, copy and upload.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_STEP_DIR = re.compile(r"step-(\d{8,})")
# Files of the source model folder that are weights (ours replace them) rather than tokenizer,
# chat template, generation config or remote code (which a loader of model/ needs as they are).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")
_HASH_CHUNK = 8 << 20

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------


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
        return [(step, path) for step, path in _step_dirs(self.root) if is_complete(path)]

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
            weights = _gather_model(model)
            collective.on_rank0(cannot_write, self._write_model, tmp, model, weights, path=final)
            del weights
            optim_state, fresh = _gather_optimizer(model, optimizer)
            collective.on_rank0(cannot_write, _write_optimizer, tmp, optim_state, fresh, path=final)
            del optim_state
            rng = _gather_rng()
            collective.on_rank0(cannot_write, _write_small_files, tmp, step, scheduler, rng, state, path=final)
            collective.on_rank0(cannot_write, _seal, tmp, step, path=final)
            # Closing the stack runs atomic_directory's exit: marker, then the rename into place.
            collective.on_rank0(cannot_write, _commit, staging, final, path=final)
        if collective.rank() != 0:
            return None
        self._prune(step)
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        logger.info("checkpoint %s saved (%s) in %.1f s", final, _human(size), time.monotonic() - started)
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
        _write_safetensors(folder, _hf_tensors(model, weights), self.max_shard_bytes)
        _write_config(folder, model)
        _copy_source_files(folder, self.source_model_dir)
        _write_generation_config(folder, model)

    def _remove_leftovers(self) -> None:
        """Remove what killed saves left behind: hidden temporary folders, and step folders renamed
        into place whose marker never reached the disk (a crash between rename and fsync)."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            temporary = entry.name.startswith(".step-") and (".tmp-" in entry.name or ".old-" in entry.name)
            interrupted = _STEP_DIR.fullmatch(entry.name) is not None and not is_complete(entry)
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
            _fsync_path(self.root)
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
        weights = collective.on_rank0(cannot_read, _read_checked_weights, path, model, verify, path=path) or {}
        _set_model(model, weights)
        del weights
        payload = collective.on_rank0(cannot_read, _torch_load, path / OPTIMIZER_FILE, path=path) or {}
        if collective.broadcast(payload.get("fresh")):  # saved before its first step: hyperparameters only
            _set_hyperparameters(optimizer, collective.broadcast(payload.get("state_dict", {}).get("param_groups")))
        else:
            _set_optimizer(model, optimizer, payload.get("state_dict", {}))
        del payload
        small = collective.broadcast(collective.on_rank0(cannot_read, _read_small_files, path, path=path))
        scheduler.load_state_dict(small["scheduler"])
        _restore_rng(small["rng"])
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
    if _STEP_DIR.fullmatch(path.name) or (path / MANIFEST).is_file() or is_complete(path):
        return path
    found = CheckpointManager(path).latest()
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint (looked for {path / CHECKPOINTS_DIR / 'step-*'})")
    return found


def verify_checkpoint(path: Path, *, only: str = "") -> None:
    """Check that checkpoint ``path`` is complete and every file has its recorded size and sha256.

    ``only``: check just the files whose relative path starts with it (``"model/"`` for an export).
    Raises a UserError that names the bad file and the checkpoint to fall back to.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CorruptCheckpoint(
            f"checkpoint {path} is incomplete (its save was interrupted); {_fallback_hint(path)}",
            "incomplete (its save was interrupted)",
        )
    files = _read_manifest(path)
    for rel, entry in files.items():
        if rel.startswith(only):
            problem = _file_problem(path / rel, entry)
            if problem:
                raise _corrupt(path, f"{rel} {problem}")


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint (or of a run folder's newest one) without touching any tensor."""
    return _read_state_json(find_checkpoint(path))["trainer"]


def export_hf(path_or_ckpt: Path) -> Path:
    """The verified Hugging Face folder of a checkpoint, or of a run folder's newest checkpoint."""
    ckpt = find_checkpoint(path_or_ckpt)
    verify_checkpoint(ckpt, only=f"{MODEL_DIR}/")
    return ckpt / MODEL_DIR


# ----------------------------------------------------------------------------------------------
# Gathering (save) and scattering (load)
# ----------------------------------------------------------------------------------------------


def _gather_model(model) -> dict:
    """Full, unsharded weights on rank 0's CPU ({} on the other ranks). Works for FSDP2 (DTensor
    parameters, collective) and for plain modules without a process group alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if collective.rank() == 0:
        logger.info("gathering model weights")
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gather_optimizer(model, optimizer) -> tuple[dict, bool]:
    """Full optimizer state keyed by parameter name on rank 0, and whether the optimizer is fresh.

    A fresh optimizer (no step taken yet) has no state to gather, only hyperparameters; it is not
    passed to ``get_optimizer_state_dict``, which would initialise it by running a step with lr 0 and
    leave a step count of 1 behind, changing the bias correction of every later update.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if len(optimizer.state) == 0:
        return {"param_groups": [_hyperparameters(group) for group in optimizer.param_groups]}, True
    if collective.rank() == 0:
        logger.info("gathering optimizer state")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options), False


def _hyperparameters(group: Mapping) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def _set_hyperparameters(optimizer, groups: list[dict]) -> None:
    """Restore the hyperparameters of a checkpoint saved before the optimizer's first step."""
    if len(groups) != len(optimizer.param_groups):
        raise UserError(
            f"the checkpoint's optimizer has {len(groups)} parameter groups, this one {len(optimizer.param_groups)}; "
            "resume with the optimizer configuration it was saved with"
        )
    optimizer.state.clear()
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(_hyperparameters(saved))


def _set_model(model, weights: dict) -> None:
    """Load full weights (rank 0's) into ``model``, re-sharding them to its FSDP2 layout if it has one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=collective.is_distributed())
    set_model_state_dict(model, weights, options=options)


def _set_optimizer(model, optimizer, state_dict: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=collective.is_distributed())
    set_optimizer_state_dict(model, optimizer, state_dict, options=options)


def _rng_state() -> dict:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` accepts."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # The current device's only: each rank owns one device, and touching the others would
        # create a CUDA context on every GPU from every rank.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def _gather_rng() -> list[dict] | None:
    """Every rank's generator states, on rank 0 (ranks draw differently, e.g. dropout on other data)."""
    state = _rng_state()
    if not collective.is_distributed():
        return [state]
    import torch.distributed as dist

    states = [None] * collective.world_size() if collective.rank() == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def _restore_rng(states: list[dict]) -> None:
    import numpy as np
    import torch

    rank = collective.rank()
    if rank >= len(states):
        logger.warning("checkpoint has RNG states for %d ranks; rank %d keeps its own generators", len(states), rank)
        return
    state = states[rank]
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing (rank 0)
# ----------------------------------------------------------------------------------------------


def _state_name(name: str) -> str:
    """A parameter name as in the state dict: without the ``_orig_mod.`` of a ``torch.compile`` wrapper."""
    return name.replace("_orig_mod.", "")


def _aliases(model) -> dict[str, str]:
    """{alias: source} for tensors registered under several names (tied embeddings: lm_head.weight ->
    model.embed_tokens.weight). The first name is the source, as in transformers' save_pretrained."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        source = first.setdefault(id(tensor), _state_name(name))
        if source != _state_name(name):
            aliases[_state_name(name)] = source
    return aliases


def _hf_tensors(model, weights: dict) -> dict:
    """The gathered weights as a HF checkpoint stores them: each shared tensor once, contiguous."""
    aliases = _aliases(model)
    return {name: t.contiguous() for name, t in weights.items() if name not in aliases}


def _write_safetensors(folder: Path, tensors: dict, max_bytes: int) -> None:
    """``model.safetensors``, or HF-style numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    shards = list(chunks_by_size(tensors, lambda name: nbytes(tensors[name]), max_bytes))
    total = sum(nbytes(t) for t in tensors.values())
    if len(shards) <= 1:
        logger.info("writing %s/%s (%d tensors, %s)", MODEL_DIR, SAFE_WEIGHTS, len(tensors), _human(total))
        save_file(tensors, str(folder / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: tensors[name] for name in names}
        size = sum(nbytes(t) for t in shard.values())
        logger.info("writing %s/%s (%d tensors, %s)", MODEL_DIR, filename, len(shard), _human(size))
        save_file(shard, str(folder / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    _write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _architecture(model) -> str:
    """The model's class name as transformers knows it (FSDP2 renames the class to ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    name = type(model).__name__
    return name.removeprefix("FSDP") if isinstance(model, FSDPModule) else name


def _write_config(folder: Path, model) -> None:
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [_architecture(model)]
    config.save_pretrained(folder)


def _copy_source_files(folder: Path, source: Path | None) -> None:
    """Tokenizer, chat template, generation config and any remote code of the source model: everything
    at its top level except weights, config.json (ours is written from the live config) and hidden files."""
    if source is None:
        logger.warning("no source model folder given: %s has no tokenizer files", folder)
        return
    for item in sorted(source.iterdir()):
        skip = item.name.startswith(".") or item.name == "config.json" or item.name.endswith(_WEIGHT_SUFFIXES)
        if item.is_file() and not skip:
            shutil.copyfile(item, folder / item.name)


def _write_generation_config(folder: Path, model) -> None:
    """The model's generation config, unless the source folder's own was copied (it is the original)."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or (folder / "generation_config.json").exists():
        return
    try:
        generation_config.save_pretrained(folder)
    except ValueError as e:  # transformers refuses to save an inconsistent one; the weights matter more
        logger.warning("generation config not saved (%s)", e)


def _write_optimizer(folder: Path, state_dict: dict, fresh: bool) -> None:
    import torch

    logger.info("writing %s", OPTIMIZER_FILE)
    torch.save({"format": FORMAT_VERSION, "fresh": fresh, "state_dict": state_dict}, folder / OPTIMIZER_FILE)


def _write_small_files(folder: Path, step: int, scheduler, rng: list[dict], state: dict) -> None:
    import torch
    import transformers

    torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    torch.save(rng, folder / RNG_FILE)
    _write_json(
        folder / STATE_FILE,
        {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": collective.world_size(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "trainer": state,
        },
    )


def _seal(folder: Path, step: int) -> None:
    """Fsync every file, record sizes and checksums of what is now on disk, fsync the manifest too."""
    _fsync_tree(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    logger.info("checksumming %d files (%s)", len(files), _human(sum(p.stat().st_size for p in files)))
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_json(folder / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": entries})
    _fsync_path(folder / MANIFEST)
    _fsync_path(folder)


def _commit(staging: contextlib.ExitStack, final: Path) -> None:
    """Marker, rename into place (by atomic_directory), then make the marker and the rename durable."""
    staging.close()
    _fsync_path(final / COMPLETE_MARKER)
    _fsync_path(final)
    _fsync_path(final.parent)


# ----------------------------------------------------------------------------------------------
# Reading and verifying (rank 0)
# ----------------------------------------------------------------------------------------------


def _read_checked_weights(path: Path, model, verify: bool = True) -> dict:
    """Verify the whole checkpoint, then read its weights and check they fit ``model``."""
    if verify:
        logger.info("verifying checkpoint %s", path)
        verify_checkpoint(path)
    weights = _read_weights(path / MODEL_DIR)
    for alias, source in _aliases(model).items():
        if alias not in weights and source in weights:
            weights[alias] = weights[source]
    _check_fits(model, weights, path)
    return weights


def _read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    index = folder / SAFE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SAFE_WEIGHTS]
    weights = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return weights


def _check_fits(model, weights: dict, path: Path) -> None:
    """Names and shapes of the saved weights against the model's, before any collective load: a
    mismatch deep inside a broadcast would give an obscure error on some rank instead of this one."""
    live = model.state_dict()
    expected = {_state_name(name): tensor for name, tensor in live.items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit this model (missing {_few(missing)}, unexpected {_few(unexpected)}); "
            "resume with the model configuration it was saved with"
        )
    for name, tensor in expected.items():
        saved = weights[name]
        if tuple(saved.shape) != tuple(tensor.shape):
            raise UserError(
                f"checkpoint {path} does not fit this model: {name} has shape {tuple(saved.shape)} there, "
                f"{tuple(tensor.shape)} in the model; resume with the model configuration it was saved with"
            )
        if saved.dtype != tensor.dtype:
            logger.warning(
                "%s is %s in the checkpoint and %s in the model: it is cast", name, saved.dtype, tensor.dtype
            )


def _torch_load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _read_small_files(path: Path) -> dict:
    return {
        "scheduler": _torch_load(path / SCHEDULER_FILE),
        "rng": _torch_load(path / RNG_FILE),
        "state": _read_state_json(path),
    }


def _read_state_json(path: Path) -> dict:
    try:
        saved = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise _corrupt(path, f"{STATE_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(path, f"{STATE_FILE} is not valid JSON") from None
    if not isinstance(saved, dict) or "trainer" not in saved:
        raise _corrupt(path, f"{STATE_FILE} has no trainer state")
    return saved


def _read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's file table, checked for shape and for every file a resume needs."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        well_formed = all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    except FileNotFoundError:
        raise _corrupt(path, f"{MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise _corrupt(path, f"{MANIFEST} is damaged")
    required = (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, f"{MODEL_DIR}/config.json")
    for rel in required:
        if rel not in files:
            raise _corrupt(path, f"{MANIFEST} does not list {rel}")
    if f"{MODEL_DIR}/{SAFE_WEIGHTS}" not in files and f"{MODEL_DIR}/{SAFE_INDEX}" not in files:
        raise _corrupt(path, f"{MANIFEST} lists no model weights")
    return files


def _file_problem(path: Path, entry: Mapping[str, Any]) -> str | None:
    """What is wrong with one file against its manifest entry, or None. Size first: it is free."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    if _sha256(path) != entry["sha256"]:
        return "sha256 mismatch (the file was altered or damaged on disk)"
    return None


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (or that was never finished). ``detail`` says
    what is wrong without the advice, for the one-line notes of a resume that passes it over."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def _corrupt(path: Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {path} is corrupt: {detail}; {_fallback_hint(path)}", f"corrupt: {detail}")


def _fallback_hint(path: Path) -> str:
    """Where to go from a bad checkpoint. No older checkpoint is named here: it has not been checked;
    ``dler train --resume RUN`` checks them all, newest first, and resumes from the newest good one."""
    match = _STEP_DIR.fullmatch(path.name)
    if match and path.parent.name == CHECKPOINTS_DIR:
        run = path.parent.parent
        return (
            f"`dler train --resume {run}` skips damaged checkpoints and resumes from the newest one that "
            f"verifies (`--from-step N` picks one)"
        )
    return "restore it from a copy, or use another checkpoint"


# ----------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (both open read-only on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file, then every folder deepest first, so that no entry points at unsynced data."""
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if path.is_file():
            _fsync_path(path)
    for path in [p for p in paths if p.is_dir()] + [root]:
        _fsync_path(path)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
