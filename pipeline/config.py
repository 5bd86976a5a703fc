"""Pipeline configuration: defaults live once, in the stage dataclasses; YAML files and `--set`
hold overrides only, and an unknown key is an error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.asr import AsrConfig
from stages.decode import DecodeConfig
from stages.diarize import DiarizeConfig
from stages.filters import FiltersConfig
from stages.tokenize import TokenizeConfig
from stages.utterances import UtterancesConfig
from stages.vad import VadConfig
from stages.windows import WindowsConfig
from stages.write import WriteConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    num_cpus: int | None = None  # local Ray only; None: 2 x cores (model actors must not starve decode/write tasks)
    num_gpus: int | None = None  # local Ray only; None: what torch sees
    progress_seconds: float = 10.0
    max_task_retries: int = 3  # a worker that dies is retried this many times, then the input is an error


@dataclass
class PipelineConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    diarize: DiarizeConfig = field(default_factory=DiarizeConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    utterances: UtterancesConfig = field(default_factory=UtterancesConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (int, float, str)) and current is not None and value is not None:
        if not isinstance(value, type(current)):
            raise ConfigError(f"{key}: expected {type(current).__name__}, got {value!r}")
    return value


def apply_overrides(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Set dataclass fields from a nested mapping, refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping")
            apply_overrides(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(value, current, path))


def parse_set(item: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, booleans, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(files: list[str | Path] = (), sets: list[str] = ()) -> PipelineConfig:
    config = PipelineConfig()
    for f in files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: top level must be a mapping")
        apply_overrides(config, data)
    for item in sets:
        apply_overrides(config, parse_set(item))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
