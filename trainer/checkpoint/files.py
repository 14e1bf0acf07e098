"""The files of one checkpoint folder, written and read by rank 0: the model as a Hugging Face folder
(safetensors shards, config, the source model's tokenizer files), the optimizer, scheduler, RNG and
trainer-state files, the manifest that seals them (with the fsyncs the write order needs, see
:mod:`trainer.checkpoint.manager`), and the checks that saved weights fit the model they are loaded into."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..chunking import chunks_by_size, nbytes
from ..dist import collective
from ..fsutil import COMPLETE_MARKER, UserError
from .layout import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_DIR,
    OPTIMIZER_FILE,
    RNG_FILE,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SCHEDULER_FILE,
    STATE_FILE,
)
from .verify import corrupt, sha256, verify_checkpoint

logger = logging.getLogger("trainer.checkpoint")

# Files of the source model folder that are weights (ours replace them) rather than tokenizer,
# chat template, generation config or remote code (which a loader of model/ needs as they are).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")


# ----------------------------------------------------------------------------------------------
# Writing
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


def hf_tensors(model, weights: dict) -> dict:
    """The gathered weights as a HF checkpoint stores them: each shared tensor once, contiguous."""
    aliases = _aliases(model)
    return {name: t.contiguous() for name, t in weights.items() if name not in aliases}


def write_safetensors(folder: Path, tensors: dict, max_bytes: int) -> None:
    """``model.safetensors``, or HF-style numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    shards = list(chunks_by_size(tensors, lambda name: nbytes(tensors[name]), max_bytes))
    total = sum(nbytes(t) for t in tensors.values())
    if len(shards) <= 1:
        logger.info("writing %s/%s (%d tensors, %s)", MODEL_DIR, SAFE_WEIGHTS, len(tensors), human_size(total))
        save_file(tensors, str(folder / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: tensors[name] for name in names}
        size = sum(nbytes(t) for t in shard.values())
        logger.info("writing %s/%s (%d tensors, %s)", MODEL_DIR, filename, len(shard), human_size(size))
        save_file(shard, str(folder / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    _write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _architecture(model) -> str:
    """The model's class name as transformers knows it (FSDP2 renames the class to ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    name = type(model).__name__
    return name.removeprefix("FSDP") if isinstance(model, FSDPModule) else name


def write_config(folder: Path, model) -> None:
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [_architecture(model)]
    config.save_pretrained(folder)


def copy_source_files(folder: Path, source: Path | None) -> None:
    """Tokenizer, chat template, generation config and any remote code of the source model: everything
    at its top level except weights, config.json (ours is written from the live config) and hidden files."""
    if source is None:
        logger.warning("no source model folder given: %s has no tokenizer files", folder)
        return
    for item in sorted(source.iterdir()):
        skip = item.name.startswith(".") or item.name == "config.json" or item.name.endswith(_WEIGHT_SUFFIXES)
        if item.is_file() and not skip:
            shutil.copyfile(item, folder / item.name)


def write_generation_config(folder: Path, model) -> None:
    """The model's generation config, unless the source folder's own was copied (it is the original)."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or (folder / "generation_config.json").exists():
        return
    try:
        generation_config.save_pretrained(folder)
    except ValueError as e:  # transformers refuses to save an inconsistent one; the weights matter more
        logger.warning("generation config not saved (%s)", e)


def write_optimizer(folder: Path, state_dict: dict, fresh: bool) -> None:
    import torch

    logger.info("writing %s", OPTIMIZER_FILE)
    torch.save({"format": FORMAT_VERSION, "fresh": fresh, "state_dict": state_dict}, folder / OPTIMIZER_FILE)


def write_small_files(folder: Path, step: int, scheduler, rng: list[dict], state: dict) -> None:
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


def seal(folder: Path, step: int) -> None:
    """Fsync every file, record sizes and checksums of what is now on disk, fsync the manifest too."""
    _fsync_tree(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    logger.info("checksumming %d files (%s)", len(files), human_size(sum(p.stat().st_size for p in files)))
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    _write_json(folder / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": entries})
    fsync_path(folder / MANIFEST)
    fsync_path(folder)


def commit(staging: contextlib.ExitStack, final: Path) -> None:
    """Marker, rename into place (by atomic_directory), then make the marker and the rename durable."""
    staging.close()
    fsync_path(final / COMPLETE_MARKER)
    fsync_path(final)
    fsync_path(final.parent)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_checked_weights(path: Path, model, verify: bool = True) -> dict:
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


def torch_load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_small_files(path: Path) -> dict:
    return {
        "scheduler": torch_load(path / SCHEDULER_FILE),
        "rng": torch_load(path / RNG_FILE),
        "state": read_state_json(path),
    }


def read_state_json(path: Path) -> dict:
    try:
        saved = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise corrupt(path, f"{STATE_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt(path, f"{STATE_FILE} is not valid JSON") from None
    if not isinstance(saved, dict) or "trainer" not in saved:
        raise corrupt(path, f"{STATE_FILE} has no trainer state")
    return saved


# ----------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def fsync_path(path: Path) -> None:
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
            fsync_path(path)
    for path in [p for p in paths if p.is_dir()] + [root]:
        fsync_path(path)


def human_size(nbytes: float) -> str:
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
