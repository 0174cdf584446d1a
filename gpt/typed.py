"""Typed dataclasses from plain data (YAML, command-line flags): each value checked against its field's
annotation, each problem appended to a list as one message naming the key, so that a config can
report every mistake at once (gpt/config.py)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import yaml


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` (from YAML) fits a field annotation such as `int`, `float`, `str | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # YAML reads `3e-4` as a string and `1` as an int; accept ints
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


class RawOverride(str):
    """A command-line override value, parsed once the field it sets (and so its type) is known."""


def _coerce(value: Any, annotation: Any) -> Any:
    """Fit YAML's readings to the field: `3e-4` (no dot) reads as a string, `no` as False."""
    if isinstance(value, RawOverride):
        parsed = yaml.safe_load(value) if value != "" else None
        # a string field takes the text as written (`--data.path=null` still clears an optional one)
        value = str(value) if "str" in _type_name(annotation) and parsed is not None else parsed
    if isinstance(value, bool) and _type_name(annotation).startswith("str"):
        return "yes" if value else "no"  # `mixed_precision: no` means the string
    if isinstance(value, str) and "float" in _type_name(annotation):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and _type_name(annotation).startswith("float"):
        return float(value)
    return value


def build(cls: type, data: dict[str, Any], section: str, problems: list[str], renamed: dict | None = None) -> Any:
    """Make a `cls` from `data`, appending a message to `problems` for each bad key or type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if (section, key) in (renamed or {}):
            problems.append(f"{section}.{key} was replaced: {renamed[section, key]}")
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown key {section}.{key}{hint}")
            continue
        value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            problems.append(f"{section}.{key}={value!r} should be {_type_name(hints[key])}")
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan slips through every comparison
            problems.append(f"{section}.{key}={value} must be a finite number")
            continue
        kwargs[key] = value
    return cls(**kwargs)
