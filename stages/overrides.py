"""Config overrides shared by the pipeline and the trainer (both import it here, neither from the
other): defaults live in frozen dataclasses; YAML files and `--set key=value` only override them,
each override making a new config, and an unknown key or a wrong type is an error."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml


T = TypeVar("T")


class ConfigError(ValueError):
    pass


def require(ok: bool, key: str, message: str) -> None:
    """A config dataclass's `__post_init__` check: fails naming the field (with_overrides adds its section)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def require_resources(config: Any) -> None:
    """The worker fields a model stage's config shares: cpus, gpus, actors, memory_gb."""
    require(config.cpus > 0, "cpus", f"must be > 0, got {config.cpus}")
    require(getattr(config, "gpus", 0.0) >= 0, "gpus", f"must be >= 0, got {getattr(config, 'gpus', 0.0)}")
    require(config.actors is None or config.actors >= 1, "actors", f"must be at least 1 or null, got {config.actors}")
    require(config.memory_gb >= 0, "memory_gb", f"must be >= 0, got {config.memory_gb}")


def require_between(config: Any, lo: float, hi: float, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        require(lo <= value <= hi, key, f"must be in [{lo:g}, {hi:g}], got {value}")


class UnknownConfigKey(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def coerce(path: str, current: Any, value: Any) -> Any:
    """Match the default's type: YAML reads `1e-4` as a string, and a mistyped value must fail here."""
    if current is None or value is None or isinstance(current, dict):
        return value
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    try:
        if isinstance(current, float) and not isinstance(value, bool):
            return float(value)
        if isinstance(current, int) and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
    except ValueError as e:
        raise ConfigError(f"{path}: expected {type(current).__name__}, got {value!r}") from e
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{path}: expected str, got {value!r}")
    return value


def _exemplar(obj: Any, key: str) -> Any:
    """For a field whose default is None (`int | None`, ...): a value of its declared type, so an
    override is checked like any other (`asr.actors=two` fails here, not deep inside a run)."""
    hint = typing.get_type_hints(type(obj)).get(key)
    kinds = [k for k in typing.get_args(hint) if k is not type(None)]
    return kinds[0]() if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else None


def with_overrides(obj: T, overrides: dict[str, Any], prefix: str = "") -> T:
    """A copy of dataclass `obj` with fields set from a nested mapping, refusing unknown keys.
    Never changes `obj`: configs are frozen dataclasses."""
    names = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise UnknownConfigKey(f"unknown config key {path!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: is a section, give a mapping")
            changes[key] = with_overrides(current, value, f"{path}.")
        else:
            changes[key] = coerce(path, current if current is not None else _exemplar(obj, key), value)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError as e:  # raised by this section's own __post_init__: name its section
        raise ConfigError(f"{prefix}{e}") from None


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`a.b=value` items -> one nested dict; values parsed as YAML (numbers, booleans, null)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data
