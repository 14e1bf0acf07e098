"""Where a config comes from: a preset (``configs/<name>.yaml``) or any YAML file, its ``inherit:`` chain,
then the command line's ``section.key=value`` overrides, in order (:func:`load_config`).

Everything a user wrote is reported as :class:`~trainer.fsutil.UserError`: a missing or unknown preset
(with the closest name), invalid YAML (with its line), a repeated key, an inheritance cycle, a malformed
override, and, through :mod:`trainer.config.coerce`, unknown keys and values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..fsutil import UserError
from .coerce import accepts_str, convert, instantiate, merge, normalise, show, unknown_key
from .schema import TrainConfig, field_types
from .yaml_text import DuplicateKey, load_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PRESET = "toy-cpu"
INHERIT_KEY = "inherit"


def list_presets() -> list[str]:
    """The names of the presets in ``configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _preset_path(ref: str, relative_to: Path | None) -> Path:
    """A preset name (``configs/<name>.yaml``) or a path to a YAML file (relative to the inheriting file)."""
    as_path = Path(ref).expanduser()
    if as_path.suffix in (".yaml", ".yml") or len(as_path.parts) > 1 or as_path.is_file():
        if not as_path.is_absolute() and relative_to is not None:
            as_path = relative_to / as_path
        if not as_path.is_file():
            raise UserError(f"config file {as_path} not found")
        return as_path
    path = CONFIG_DIR / f"{ref}.yaml"
    if not path.is_file():
        presets = list_presets()
        close = difflib.get_close_matches(ref, presets, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown preset {ref!r}{hint} (presets in {CONFIG_DIR}: {', '.join(presets)})")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys; got {show(data)}")
    return data


def _read_preset(ref: str, relative_to: Path | None = None, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The normalised tree of a preset, its ``inherit:`` chain applied first (base, then the file's keys)."""
    path = _preset_path(ref, relative_to).resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise UserError(f"presets inherit in a cycle: {chain}")
    raw = _read_yaml(path)
    parent = raw.pop(INHERIT_KEY, None)
    own = normalise(TrainConfig, raw, "", str(path))
    if parent is None:
        return own
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: {INHERIT_KEY} must name one preset or YAML file; got {show(parent)}")
    return merge(_read_preset(parent, path.parent, (*seen, path)), own)


def _apply_override(tree: dict[str, Any], text: str) -> dict[str, Any]:
    """``a.b.c=value``: the value read as YAML (``1e-6``, ``true``, ``null``, ``[4000, 2000]``, ``{...}``)
    and checked against the field's annotation; a string field keeps the raw text when YAML read it as
    something else (``model.path=yes``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} must look like key=value, e.g. optim.lr=1e-6")
    parts, cls = key.split("."), TrainConfig
    for i, name in enumerate(parts):
        if name not in field_types(cls):
            raise unknown_key(".".join(parts[: i + 1]), name, cls, "override")
        tp = field_types(cls)[name]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"override {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            cls = tp
    try:
        value = load_yaml(raw)
    except DuplicateKey as e:
        raise UserError(f"override {text!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    try:
        converted = convert(value, tp, key, f"override {text!r}")
    except UserError:
        if not (accepts_str(tp) and raw.strip()):
            raise
        converted = raw.strip()
    for name in reversed(parts):
        converted = {name: converted}
    return merge(tree, converted)


def load_config(preset_or_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of a preset name (``configs/<name>.yaml``; default ``toy-cpu``) or YAML file, with
    ``key=value`` overrides applied in order. Raises UserError for anything the user can fix."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    ref = str(preset_or_path) if preset_or_path is not None else DEFAULT_PRESET
    tree = _read_preset(ref)
    for text in overrides:
        tree = _apply_override(tree, text)
    origin = f"config {ref!r}" + (f" with {' '.join(overrides)}" if overrides else "")
    return instantiate(TrainConfig, tree, "", origin)
