"""Generated data sets named by a spec, ``builtin:NAME?key=value&...`` (:func:`load_builtin`): which
generators there are, and the parameters each takes from the spec."""

from __future__ import annotations

from urllib.parse import parse_qsl

from ..fsutil import UserError
from .arithmetic import parse_difficulty, toy_arith
from .examples import Example

BUILTIN_PREFIX = "builtin:"


def load_builtin(spec: str, seed: int) -> list[Example]:
    """``builtin:NAME?key=value&key=value``: a URL-query syntax, familiar and free of shell quoting."""
    name, _, query = spec[len(BUILTIN_PREFIX) :].partition("?")
    if name not in _BUILTINS:
        raise UserError(f"unknown builtin data set {name!r} in {spec!r}; available: {', '.join(sorted(_BUILTINS))}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise UserError(f"cannot parse the parameters of {spec!r}; write them as ?key=value&key=value") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise UserError(f"parameter {key!r} is given twice in {spec!r}")
        params[key] = value
    allowed = _BUILTIN_PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(f"unknown parameter {unknown[0]!r} in {spec!r}; {name} takes: {', '.join(allowed)}")
    try:
        kwargs = {"seed": seed, **{key: _BUILTIN_PARAMS[name][key](value) for key, value in params.items()}}
        return _BUILTINS[name](**kwargs)
    except ValueError as e:
        raise UserError(f"{spec}: {e}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


_BUILTINS = {"toy-arith": toy_arith}
# Per builtin: the parameters its spec string takes, and how each value is parsed from text.
_BUILTIN_PARAMS = {"toy-arith": {"size": _parse_int, "difficulty": parse_difficulty, "seed": _parse_int}}
