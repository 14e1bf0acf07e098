"""Whether a checkpoint folder is whole: its marker, its manifest, and every file's size and sha256 against
it; a damaged one is a :class:`CorruptCheckpoint` whose message says where to go on from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fsutil import UserError, is_complete
from .layout import CHECKPOINTS_DIR, MANIFEST, MODEL_DIR, REQUIRED_FILES, SAFE_INDEX, SAFE_WEIGHTS, STEP_DIR

_HASH_CHUNK = 8 << 20


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
            f"checkpoint {path} is incomplete (its save was interrupted); {fallback_hint(path)}",
            "incomplete (its save was interrupted)",
        )
    files = _read_manifest(path)
    for rel, entry in files.items():
        if rel.startswith(only):
            problem = _file_problem(path / rel, entry)
            if problem:
                raise corrupt(path, f"{rel} {problem}")


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (or that was never finished). ``detail`` says
    what is wrong without the advice, for the one-line notes of a resume that passes it over."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def corrupt(path: Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {path} is corrupt: {detail}; {fallback_hint(path)}", f"corrupt: {detail}")


def fallback_hint(path: Path) -> str:
    """Where to go from a bad checkpoint. No older checkpoint is named here: it has not been checked;
    ``dler train --resume RUN`` checks them all, newest first, and resumes from the newest good one."""
    match = STEP_DIR.fullmatch(path.name)
    if match and path.parent.name == CHECKPOINTS_DIR:
        run = path.parent.parent
        return (
            f"`dler train --resume {run}` skips damaged checkpoints and resumes from the newest one that "
            f"verifies (`--from-step N` picks one)"
        )
    return "restore it from a copy, or use another checkpoint"


def _read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's file table, checked for shape and for every file a resume needs."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        well_formed = all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    except FileNotFoundError:
        raise corrupt(path, f"{MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise corrupt(path, f"{MANIFEST} is damaged")
    for rel in REQUIRED_FILES:
        if rel not in files:
            raise corrupt(path, f"{MANIFEST} does not list {rel}")
    if f"{MODEL_DIR}/{SAFE_WEIGHTS}" not in files and f"{MODEL_DIR}/{SAFE_INDEX}" not in files:
        raise corrupt(path, f"{MANIFEST} lists no model weights")
    return files


def _file_problem(path: Path, entry: Mapping[str, Any]) -> str | None:
    """What is wrong with one file against its manifest entry, or None. Size first: it is free."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    if sha256(path) != entry["sha256"]:
        return "sha256 mismatch (the file was altered or damaged on disk)"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
