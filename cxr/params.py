"""Typed access to params.yaml: a wrong or missing key is a clear error, not a KeyError later."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or has a wrong key or value."""


def non_negative_int(text: str) -> int:
    """argparse `type=` for counts such as --threads: an int >= 0, else a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def load_params(path: str | Path) -> dict[str, Any]:
    """Read params.yaml as a plain dict."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"params file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One top-level section of params.yaml."""
    if name not in params or not isinstance(params[name], dict):
        raise ParamsError(f"params.yaml has no section {name!r} (sections: {sorted(params)})")
    return params[name]


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently coerce int -> float) a value against a simple type annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ParamsError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where} has the wrong type: {value!r} (expected {annotation})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is not None:
            raise ParamsError(f"{where} must be null, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise ParamsError(f"{where} must be a number, got {value!r}")
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; say how to write it instead of failing later.
        raise ParamsError(f"{where} must be a number, got the string {value!r} (write 1.0e-3)")
    if not isinstance(value, annotation):
        raise ParamsError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def from_section(cls: type[T], values: dict[str, Any], name: str, source: str = "params.yaml") -> T:
    """Build a params dataclass from section `name` of the file `source`.

    Every field of the dataclass is required and no other key is allowed: the file is the one
    source of values, so a key left out (or renamed) is an error naming it, in one line, rather
    than a value the code makes up.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        keys = ", ".join(f"{name}.{k}" for k in unknown)
        raise ParamsError(f"{source}: {keys} unknown (known keys: {', '.join(fields)})")
    missing = [k for k in fields if k not in values]
    if missing:
        raise ParamsError(f"{source}: {', '.join(f'{name}.{k}' for k in missing)} missing")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _check_value(values[key], hints[key], f"{name}.{key}") for key in fields}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj
