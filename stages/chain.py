"""The chain, defined once: every stage in order, with its config section, the rejection reasons it
records and whether it can use a GPU. Everything else is derived from `CHAIN`:

- the pipeline config's sections (pipeline/config.py: `config_class`);
- the source that turns inputs into chunks and the stages after it (`build_source`, `build_stages`),
  which the Ray adapter (pipeline/ray_runner.py) runs without knowing any of them by name;
- the funnel's order in `pipeline stats` (stage order, then each stage's reasons in order);
- GPU placement (`place_on_gpus`), decided before the config is digested;
- the keys the config digest leaves out (`runtime_keys`): they schedule the work, the corpus
  bytes do not depend on them.

To add a stage: write its Stage subclass and config dataclass under stages/, then add a StageSpec
below, where it runs. Stage names are unique: they key timings, placement, run.json and the
`stage` of rejection and error records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stages.asr import AsrConfig, AsrStage
from stages.base import Stage
from stages.decode import DecodeConfig, DecodeStage
from stages.diarize import DiarizeConfig, DiarizeStage
from stages.filtering import UtteranceFilterStage, WindowFilterStage
from stages.filters import UTTERANCE_FILTERS, WINDOW_FILTERS, FiltersConfig
from stages.tokenize import TokenizeConfig, TokenizeStage
from stages.utterances import UtterancesConfig, UtterancesStage
from stages.vad import VadConfig, VadStage
from stages.windows import WindowsConfig, WindowsStage
from stages.write import WriteConfig, WriteStage

# Share of one GPU per actor of a GPU stage when the config leaves it at 0 and the cluster has GPUs:
# three model actors fit on each GPU.
GPU_SHARE = 0.3
POOL_KEYS = ("actors", "memory_gb")  # how many workers, and how much memory Ray reserves for each


@dataclass(frozen=True)
class StageSpec:
    stage: type[Stage]
    section: str  # the pipeline config's attribute that holds its config (two stages may share one)
    config: type  # that section's dataclass
    reasons: tuple[str, ...] = ()  # rejection reasons recorded under this stage's name, in funnel order
    gpu: bool = False  # can run on a GPU: its config has `gpus`, set to GPU_SHARE on a GPU cluster when 0
    runtime_keys: tuple[str, ...] = ()  # its config keys that schedule the work and never change a byte written

    @property
    def name(self) -> str:
        return self.stage.name

    def build(self, config: Any) -> Stage:
        return self.stage(getattr(config, self.section))


@dataclass(frozen=True)
class Chain:
    source: StageSpec  # turns an input URI into chunks (`stage.chunks(uri)`): run as tasks, one input each
    stages: tuple[StageSpec, ...]  # then every chunk goes through these, in order

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        for s in self.specs:
            keys = {f.name for f in dataclasses.fields(s.config)}
            if self.sections()[s.section] is not s.config:
                raise ValueError(f"section {s.section!r} holds two config classes")
            if not set(s.runtime_keys) | ({"gpus"} if s.gpu else set()) <= keys:
                raise ValueError(f"{s.name}: its runtime keys and `gpus` (gpu=True) must be fields of {s.config.__name__}")

    @property
    def specs(self) -> tuple[StageSpec, ...]:
        return (self.source, *self.stages)

    def sections(self) -> dict[str, type]:
        """Config section -> dataclass, in chain order (a shared section once)."""
        out: dict[str, type] = {}
        for s in self.specs:
            out.setdefault(s.section, s.config)
        return out

    def funnel_order(self) -> list[tuple[str, tuple[str, ...]]]:
        """(stage, its reasons) in pipeline order: the order in which the funnel attributes time."""
        return [(s.name, s.reasons) for s in self.specs]

    def runtime_keys(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for s in self.specs:
            out.setdefault(s.section, set()).update(s.runtime_keys)
        return out

    def inserted(self, spec: StageSpec, after: str) -> Chain:
        """This chain with `spec` placed right after the stage named `after`."""
        i = [s.name for s in self.stages].index(after) + 1 if after != self.source.name else 0
        return dataclasses.replace(self, stages=(*self.stages[:i], spec, *self.stages[i:]))


def _filter_names(filters) -> tuple[str, ...]:
    return tuple(f.name for f in filters)


CHAIN = Chain(
    source=StageSpec(DecodeStage, "decode", DecodeConfig),
    stages=(
        StageSpec(VadStage, "vad", VadConfig, reasons=("no_speech", "non_speech"), runtime_keys=POOL_KEYS),
        StageSpec(DiarizeStage, "diarize", DiarizeConfig, gpu=True, runtime_keys=POOL_KEYS),
        StageSpec(AsrStage, "asr", AsrConfig, gpu=True, runtime_keys=POOL_KEYS),
        StageSpec(UtterancesStage, "utterances", UtterancesConfig, reasons=("empty_transcript", "untranscribed")),
        # Before windows: no rejected utterance inside a kept window.
        StageSpec(UtteranceFilterStage, "filters", FiltersConfig, reasons=_filter_names(UTTERANCE_FILTERS)),
        StageSpec(WindowsStage, "windows", WindowsConfig,
                  reasons=("utterance_over_budget", "too_few_utterances", "window_too_short", "single_speaker", "no_windows")),
        StageSpec(WindowFilterStage, "filters", FiltersConfig, reasons=(*_filter_names(WINDOW_FILTERS), "no_windows")),
        # The codes do not depend on Mimi's batching (causal encoder, end padding): tests/test_models.py.
        StageSpec(TokenizeStage, "tokenize", TokenizeConfig, gpu=True, runtime_keys=(*POOL_KEYS, "batch_seconds")),
        StageSpec(WriteStage, "write", WriteConfig, runtime_keys=("output", "shard_size", "commit_seconds")),  # where, not what
    ),
)


def build_source(config: Any) -> Stage:
    """The stage that makes chunks from inputs, for a config made by pipeline/config.py."""
    return config.chain.source.build(config)


def build_stages(config: Any) -> list[Stage]:
    """Every stage after the source, in order."""
    return [s.build(config) for s in config.chain.stages]


def place_on_gpus(config: Any, cluster_gpus: float) -> Any:
    """The config with each GPU-capable stage left at 0 GPUs given GPU_SHARE, when the cluster has
    GPUs. A new config: decided before the config is digested, never after."""
    if cluster_gpus <= 0:
        return config
    chain = config.chain
    changes = {s.section: dataclasses.replace(getattr(config, s.section), gpus=GPU_SHARE)
               for s in chain.specs if s.gpu and getattr(config, s.section).gpus == 0.0}
    return dataclasses.replace(config, **changes)
