"""Dataclass <-> plain-dict conversion with field-level errors, shared by every YAML config."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from autocomp.errors import ConfigError, did_you_mean

C = TypeVar("C")


def check_keys(data: Any, allowed: list[str], path: str) -> None:
    """A ConfigError naming the field unless ``data`` is a mapping whose keys are all ``allowed``."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, but got {type(data).__name__} {data!r}.", path)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"is not a known field; expected one of {allowed}.{did_you_mean(key, allowed)}",
                              f"{path}.{key}")


def from_dict(cls: type[C], data: Any, path: str) -> C:
    """Build dataclass ``cls`` from ``data``; every error names the dotted field ``path``."""
    check_keys(data, [f.name for f in dataclasses.fields(cls) if f.init], path)
    for f in dataclasses.fields(cls):
        required = f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError("is required, but missing.", f"{path}.{f.name}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by the dataclass's own validation
        raise err.located(path) from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"is incomplete: {err}.", path) from err


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping, but got {value!r}.", path)
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"must be a list, but got {value!r}.", path)
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, path)
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"must be of type {hint.__name__}, but got {value!r}.", path)


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe dict of a dataclass (recursively)."""
    return dataclasses.asdict(obj)


def read_yaml(path: str | Path, what: str) -> dict:
    """Load a YAML mapping, turning I/O and syntax errors into one-line ConfigErrors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"The {what} file {str(path)!r} cannot be read: {err.strerror}.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"The {what} file {str(path)!r} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ConfigError(f"The {what} file {str(path)!r} must hold a mapping, but holds {type(data).__name__}.")
    return data


@contextlib.contextmanager
def in_file(path: str | Path | None) -> Iterator[None]:
    """Name the file ``path`` (if any) in a ConfigError raised inside that names no file yet: a field's error says
    which file holds the field (the innermost file: a study's space names the space file)."""
    try:
        yield
    except ConfigError as err:
        if path is None or err.file is not None:
            raise
        named = ConfigError(err.message, err.field)  # the same field, for whoever reads it
        named.file, named.args = str(path), (f"{path}: {err}",)
        raise named from None


def write_yaml(data: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def check_schema_version(data: dict, expected: int, what: str) -> None:
    """Refuse another format's version; a file without one is read as this version, with a note on stderr."""
    if "schema_version" not in data:
        print(f"autocomp: note: the {what} has no `schema_version`; read as version {expected} (write "
              f"`schema_version: {expected}` to say so).", file=sys.stderr)
        return
    version = data["schema_version"]
    if version != expected:
        message = f"must be {expected} (the format this autocomp reads), but got {version!r}."
        raise ConfigError(message, f"{what}.schema_version")
