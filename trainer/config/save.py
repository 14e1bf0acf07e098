"""A config out of the program: as plain data (:func:`to_dict`, for JSON, YAML, loggers) and as the run
folder's YAML file (:func:`save_config`), which :func:`~trainer.config.load_config` reads back to the same
config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..fsutil import atomic_file
from .schema import TrainConfig
from .yaml_text import dump_yaml

_SAVED_HEADER = (
    "# The fully resolved training config of this run; trainer.config.load_config(<this file>) reads it back.\n"
)


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested dicts, lists and scalars: JSON and YAML serialisable."""
    return _plain(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML, atomically (a temporary sibling, fsync, ``os.replace``): a crash leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    with atomic_file(path) as f:
        f.write(_SAVED_HEADER + dump_yaml(to_dict(cfg)))
    return path
