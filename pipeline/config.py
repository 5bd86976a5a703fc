"""Pipeline configuration: defaults live once, in the stage dataclasses; YAML files and `--set`
hold overrides only, and an unknown key is an error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from stages.overrides import ConfigError, parse_sets, read_yaml, with_overrides  # noqa: F401 (ConfigError re-exported)
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


@dataclass(frozen=True)
class RunConfig:
    num_cpus: int | None = None  # local Ray only; None: cores + 1, or 2 x cores for a pool per stage (fuse_stages=false, num_gpus)
    # One actor pool running every stage after decode (None: when the cluster has no GPU), with
    # `workers` actors (None: the cluster's CPUs less one for decoding, over the stages' largest `cpus`).
    fuse_stages: bool | None = None
    workers: int | None = None
    num_gpus: int | None = None  # local Ray only; None: what Ray detects
    progress_seconds: float = 10.0
    max_task_retries: int = 3  # a worker that dies is retried this many times, then the input is an error


@dataclass(frozen=True)
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


def load_config(files: list[str | Path] = (), sets: list[str] = (), overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults, then each YAML file, then `--set` items, then `overrides` (a nested mapping)."""
    config = PipelineConfig()
    for f in files:
        config = with_overrides(config, read_yaml(f))
    return with_overrides(with_overrides(config, parse_sets(sets)), overrides or {})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
