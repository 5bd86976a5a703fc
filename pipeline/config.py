"""Pipeline configuration: a section per stage config of the chain (stages/chain.py), then `run`.
Defaults live once, in the stage dataclasses; YAML files and `--set` hold overrides only, and an
unknown key is an error. Configs are frozen: a change makes a new one."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.chain import CHAIN, Chain
from stages.overrides import ConfigError, parse_sets, read_yaml, require, with_overrides  # noqa: F401 (ConfigError re-exported)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class RunStopped(RuntimeError):
    """A failure no chunk can get past (a model that cannot load in a worker, a full disk): the run
    ends with this one reason instead of an error per input. What was committed stays; a rerun resumes."""


@dataclass(frozen=True)
class RunConfig:
    """How a run is scheduled; never part of what it produces (the config digest leaves it out)."""

    num_cpus: int | None = None  # local Ray only; None: cores + 1, or 2 x cores for a pool per stage (fuse_stages=false, num_gpus)
    # One actor pool running every stage after decode (None: when the cluster has no GPU), with
    # `workers` actors (None: the cluster's CPUs less one for decoding, over the stages' largest `cpus`).
    fuse_stages: bool | None = None
    workers: int | None = None
    num_gpus: int | None = None  # local Ray only; None: what Ray detects
    progress_seconds: float = 10.0
    max_task_retries: int = 3  # a worker that dies is retried this many times, then the input is an error
    # Run every Ray worker of the job with glibc malloc keeping its memory (ray_runner.MALLOC_ENV):
    # 6-9 % less model CPU. Off: the C library's defaults.
    tune_malloc: bool = True
    writers: int | None = None  # corpus writer actors, on the driver's node (None: one per 500 workers)

    def __post_init__(self):
        for key in ("num_cpus", "workers", "writers"):
            require(getattr(self, key) is None or getattr(self, key) >= 1, key, f"must be at least 1 or null, got {getattr(self, key)}")
        require(self.num_gpus is None or self.num_gpus >= 0, "num_gpus", f"must be >= 0 or null, got {self.num_gpus}")
        require(self.progress_seconds > 0, "progress_seconds", f"must be > 0, got {self.progress_seconds}")
        require(self.max_task_retries >= 0, "max_task_retries", f"must be >= 0, got {self.max_task_retries}")


@functools.cache
def config_class(chain: Chain = CHAIN) -> type:
    """The config dataclass of `chain`: its sections in chain order, then `run`; `.chain` is the chain."""
    sections = [(name, cls, field(default_factory=cls)) for name, cls in chain.sections().items()]
    return dataclasses.make_dataclass(
        "PipelineConfig", [*sections, ("run", RunConfig, field(default_factory=RunConfig))],
        frozen=True, namespace={"chain": chain, "__module__": __name__},
    )


PipelineConfig = config_class(CHAIN)


def load_config(files: list[str | Path] = (), sets: list[str] = (), overrides: dict[str, Any] | None = None,
                chain: Chain = CHAIN) -> Any:
    """Defaults, then each YAML file, then `--set` items, then `overrides` (a nested mapping)."""
    config = config_class(chain)()
    for f in files:
        config = with_overrides(config, read_yaml(f))
    return with_overrides(with_overrides(config, parse_sets(sets)), overrides or {})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
