"""Plain data (YAML, JSON, overrides) checked against the config schema and built into its dataclasses.

A value is converted by its field's annotation: numbers of the right kind (PyYAML reads ``1e-6`` as a
string), lists as tuples, a ``Literal`` as the type of its choices (whose membership the section checks
from the same annotation), nested sections as dicts. What does not fit is a
:class:`~trainer.fsutil.UserError` naming the dotted key, the value and what was expected; an unknown key
names the closest valid one (did you mean ...?), at its level or anywhere in the tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ..fsutil import UserError
from .schema import TrainConfig, field_types

# difflib ratios: a misspelling at the key's own level (``optim.lrr``) may be looser than a guess at a key
# moved to another section (``lr`` for ``optim.lr``), which must be nearly exact to be worth naming.
_SAME_LEVEL_CUTOFF = 0.6
_ANYWHERE_CUTOFF = 0.8


@functools.cache
def all_keys(cls: type = TrainConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of ``cls``, sections included: where a misplaced key is looked for."""
    keys: list[str] = []
    for name, tp in field_types(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, dotted + ".")
    return tuple(keys)


def join(key: str, name: str) -> str:
    """``name`` under the dotted ``key`` (the top level when ``key`` is empty)."""
    return f"{key}.{name}" if key else name


def show(value: object) -> str:
    """A value as the user wrote it (YAML/JSON spelling: null, true, "text")."""
    return json.dumps(value, default=str)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _value_type(tp: Any) -> Any:
    """The type a ``Literal``'s choices share (``Literal["a", "b"]``: str); any other annotation itself."""
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0])
    return tp


def accepts_str(tp: Any) -> bool:
    """Whether a field takes text (a string, an optional string, or string choices)."""
    return _value_type(tp) is str or (_is_union(tp) and str in map(_value_type, typing.get_args(tp)))


def _expected(tp: Any) -> str:
    """The English name of an annotation, for messages."""
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    args = typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(_expected(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[_value_type(tp)]


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[tp]


class _BadValue(Exception):
    """A value does not fit its annotation (turned into a UserError naming the key)."""


def _number(value: object) -> float | None:
    """A finite number from an int, a float, or a numeric string (PyYAML reads ``1e-6`` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _scalar(value: object, tp: type) -> object:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric name, e.g. run.out=2024
    else:
        raise TypeError(f"config annotation {tp!r} is not supported")
    raise _BadValue


def convert(value: object, tp: Any, key: str, origin: str) -> object:
    """``value`` checked against the annotation ``tp``: numbers of the right kind, lists as tuples, nested
    sections as normalised dicts. Raises UserError naming ``key``, the value and the expected type."""
    if dataclasses.is_dataclass(tp):
        return normalise(tp, value, key, origin)
    kind, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if _is_union(tp):
            if value is None and type(None) in args:
                return None
            (inner,) = (a for a in args if a is not type(None))  # only Optional[X] is used
            return convert(value, inner, key, origin)
        if kind is tuple:
            return _tuple(value, args, key, origin)
        return _scalar(value, _value_type(tp))
    except _BadValue:
        raise UserError(f"{origin}: {key} must be {_expected(tp)}; got {show(value)}") from None


def _tuple(value: object, args: tuple, key: str, origin: str) -> tuple:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif variadic and value is not None and not isinstance(value, Mapping):
        items = [value]  # a single threshold may be written without brackets
    else:
        raise _BadValue
    if not variadic and len(items) != len(args):
        raise _BadValue
    types_ = [args[0]] * len(items) if variadic else list(args)
    return tuple(convert(v, t, f"{key}[{i}]", origin) for i, (v, t) in enumerate(zip(items, types_)))


def unknown_key(key: str, name: str, cls: type, origin: str) -> UserError:
    """An error for ``key`` that names the closest valid key: at its level, else anywhere in the tree."""
    valid = list(field_types(cls))
    parent = key[: -len(name) - 1] if "." in key else ""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=_SAME_LEVEL_CUTOFF)
    if close:
        hint = f"; did you mean '{join(parent, close[0])}'?"
    else:
        tails = {k: k.rsplit(".", 1)[-1] for k in all_keys()}
        near = difflib.get_close_matches(name, sorted(set(tails.values())), n=1, cutoff=_ANYWHERE_CUTOFF)
        matches = [k for k, tail in tails.items() if near and tail == near[0]]
        hint = f"; did you mean {' or '.join(repr(k) for k in matches)}?" if matches else ""
    level = f"'{parent}'" if parent else "the top level"
    return UserError(f"{origin}: unknown config key '{key}'{hint} (valid keys at {level}: {', '.join(valid)})")


def normalise(cls: type, data: object, key: str, origin: str) -> dict[str, Any]:
    """Check the keys and value types of a (partial) section; return it as a dict of converted values."""
    if not isinstance(data, Mapping):
        raise UserError(f"{origin}: {key or 'the config'} must be a mapping of keys; got {show(data)}")
    hints, out = field_types(cls), {}
    for name, value in data.items():
        dotted = join(key, str(name))
        if name not in hints:
            raise unknown_key(dotted, str(name), cls, origin)
        out[name] = convert(value, hints[name], dotted, origin)
    return out


def instantiate(cls: type, data: Mapping[str, Any], key: str, origin: str) -> Any:
    """Build ``cls`` from a normalised dict (missing keys keep their defaults); validation errors name the
    section they come from."""
    hints, kwargs = field_types(cls), dict(data)
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = instantiate(hints[name], value, join(key, name), origin)
    try:
        return cls(**kwargs)
    except ValueError as e:
        where = f"{key}: " if key else ""
        raise UserError(f"{origin}: invalid config: {where}{e}") from None


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merge key by key, values (lists included) replace."""
    out = dict(base)
    for name, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), Mapping):
            out[name] = merge(out[name], value)
        else:
            out[name] = value
    return out


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The inverse of :func:`~trainer.config.to_dict`; a partial dict keeps the defaults of what it leaves out."""
    return instantiate(TrainConfig, normalise(TrainConfig, data, "", "config dict"), "", "config dict")
