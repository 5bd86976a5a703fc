"""The one place stages meet Ray: an adapter that turns any Stage into a Ray Data operator, and the
runner that wires decode -> ... -> write, streams chunk summaries back and reports progress.

Chunks travel between operators as pickled `Chunk` records in a single binary column: explicit,
so Ray never guesses an Arrow type for them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import ray

from pipeline.config import PipelineConfig
from pipeline.progress import Progress
from stages.asr import AsrStage
from stages.base import Stage
from stages.decode import DecodeStage
from stages.diarize import DiarizeStage
from stages.filters import FilterStage
from stages.records import Chunk, ErrorRecord, source_id
from stages.tokenize import TokenizeStage
from stages.utterances import UtterancesStage
from stages.vad import VadStage
from stages.windows import WindowsStage
from stages.write import OutputDir, WriteStage

log = logging.getLogger(__name__)


def build_stages(config: PipelineConfig) -> list[Stage]:
    """Every stage after decode, in order."""
    return [
        VadStage(config.vad),
        DiarizeStage(config.diarize),
        AsrStage(config.asr, config.utterances),
        UtterancesStage(config.utterances),
        FilterStage(config.filters, level="utterance"),  # before windows: no rejected utterance inside a kept window
        WindowsStage(config.windows),
        FilterStage(config.filters, level="window"),
        TokenizeStage(config.tokenize),
        WriteStage(config.write),
    ]


def _dumps(chunks: list[Chunk]) -> dict[str, list[bytes]]:
    return {"chunk": [pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL) for c in chunks]}


def _loads(batch: dict[str, np.ndarray]) -> list[Chunk]:
    return [pickle.loads(b) for b in batch["chunk"]]


class StageWorker:
    """Ray Data UDF around one stage: the actor (or task) calls setup() once, then batches."""

    def __init__(self, stage: Stage):
        # pyannote warns at import that torchcodec cannot load (no system FFmpeg): we never use it,
        # audio reaches every model in memory.
        warnings.filterwarnings("ignore", message=r"\s*torchcodec")
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        chunks = self.stage.process_batch(_loads(batch))
        node = ray.get_runtime_context().get_node_id()
        for chunk in chunks:
            chunk.custom.setdefault("nodes", {})[self.stage.name] = node
        return _dumps(chunks)


def apply_stage(ds: "ray.data.Dataset", stage: Stage, max_retries: int) -> "ray.data.Dataset":
    res = stage.resources()
    common = dict(batch_size=res.batch_size, batch_format="numpy", num_cpus=res.cpus, num_gpus=res.gpus or None)
    if res.uses_model:
        return ds.map_batches(
            StageWorker,
            fn_constructor_args=(stage,),
            compute=ray.data.ActorPoolStrategy(size=res.actors),
            max_restarts=-1,  # the pool always gets its actor back; the bound is per task:
            max_task_retries=max_retries,
            **common,
        )
    worker = StageWorker(stage)
    return ds.map_batches(lambda batch: worker(batch), max_retries=max_retries, **common)


def _decode(stage: DecodeStage):
    def decode(batch: dict[str, np.ndarray]) -> Iterator[dict[str, list[bytes]]]:
        # A generator: a long file's chunks stream out one by one instead of as one huge batch.
        for uri in batch["uri"]:
            for chunk in stage.chunks(str(uri)):
                yield _dumps([chunk])

    return decode


def init_ray(address: str | None, config: PipelineConfig) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cores = os.cpu_count() or 1
    gpus = config.run.num_gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    # Logical CPUs above the core count: model actors hold their slot while idle, and the decode
    # and write tasks must still get scheduled. Threads per worker are set by each stage.
    ray.init(num_cpus=config.run.num_cpus or 2 * cores, num_gpus=gpus, include_dashboard=False, log_to_driver=True)


def _use_gpus(config: PipelineConfig) -> None:
    """Put the model stages on GPUs when the cluster has some and the config left them on CPU."""
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return
    for stage_cfg in (config.asr, config.tokenize, config.diarize):
        if getattr(stage_cfg, "gpus", None) == 0.0:
            stage_cfg.gpus = 0.3


def run_pipeline(uris: list[str], sizes: list[int], config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """Process `uris` into config.write.output; returns this run's summary (counts, timings)."""
    init_ray(address, config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    # Per-item failures are caught inside the stages. What reaches Ray is a worker that died (killed,
    # out of memory, crashed in native code): Ray retries it `max_retries` times, then drops that
    # block instead of failing the run, and the source is recorded as an error (record_incomplete).
    # Set before the dataset is built: a dataset copies the context when it is created.
    ctx.max_errored_blocks = -1
    _use_gpus(config)
    decode = DecodeStage(config.decode)
    stages = build_stages(config)
    progress = Progress(len(uris), sum(sizes), dict(zip(uris, sizes)), config.run.progress_seconds)
    if not uris:
        return progress.summary()
    max_retries = config.run.max_task_retries
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    ds = ds.map_batches(_decode(decode), batch_size=1, num_cpus=decode.resources().cpus, max_retries=max_retries)
    for stage in stages:
        ds = apply_stage(ds, stage, max_retries)
    for row in ds.iter_rows():
        progress.update(pickle.loads(row["chunk"]))
    progress.finish()
    record_incomplete(OutputDir(config.write.output), uris, progress, max_retries)
    return progress.summary()


def record_incomplete(out: OutputDir, uris: list[str], progress: Progress, max_retries: int) -> None:
    """An error record for each source whose chunks did not all come back; cleared once it completes."""
    stale = set(out.list("errors", "-incomplete.jsonl"))  # one listing, not a lookup per input
    for uri in uris:
        name = f"{source_id(uri)}-incomplete.jsonl"
        rel = f"errors/{name}"
        if uri in progress.done_sources:
            if name in stale:
                out.fs.delete_file(out.path(rel))
            continue
        seen = sorted(progress.chunks_seen.get(uri, ()))
        record = ErrorRecord(uri, source_id(uri), "worker", "WorkerCrashed",
                             f"worker died {max_retries + 1} times; chunks completed: {seen}; rerun to retry")
        out.write_bytes(rel, (json.dumps(asdict(record), sort_keys=True) + "\n").encode())
        progress.errors["WorkerCrashed"] += 1
