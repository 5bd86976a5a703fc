"""The stage contract. The base class owns batching, per-item error capture, timing and counters,
so a stage only implements `setup()` (load models, heavy imports) and `process(chunk)`.

Nothing here knows about Ray: `pipeline/ray_runner.py` turns any stage into Ray work, and a stage
can be run directly (tests, notebooks, bench/bench_stages.py) with `process_batch`. Which stages
run, in which order, is stages/chain.py's.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from stages.records import Chunk


# What every model worker holds before any stage's share: Python, torch and its libraries, one
# decoded 600 s chunk at both rates (0.8 GB measured here).
WORKER_BASE_GB = 1.0


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Ray adapter turns this into actor-pool options."""

    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = 1  # pool size (model stages load their model once per actor); None: autoscaled
    batch_size: int = 1  # chunks per call
    memory_gb: float = 0.0  # host memory the stage's models and buffers add to a worker (see WORKER_BASE_GB)
    uses_model: bool = False  # actor pool (True) or stateless tasks (False)
    threads: int | None = None  # torch intra-op threads while the stage works; None: from `cpus`


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Wall and process-CPU seconds since creation, charged to a chunk under a stage name."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), process_cpu_seconds()

    def charge(self, chunk: Chunk, stage: str) -> None:
        chunk.timings[stage] = chunk.timings.get(stage, 0.0) + time.perf_counter() - self.wall
        chunk.cpu_times[stage] = chunk.cpu_times.get(stage, 0.0) + process_cpu_seconds() - self.cpu


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a worker declared with `cpus`, so workers don't oversubscribe cores."""
    return max(1, min(int(round(cpus)), os.cpu_count() or 1))


class Stage:
    name: ClassVar[str]
    handles_done: ClassVar[bool] = False  # also called for failed/rejected chunks (the writer)

    def __init__(self, config: Any):
        self.config = config
        self.counters: Counter[str] = Counter()
        self._ready = False

    def resources(self) -> Resources:
        return Resources(cpus=0.25, uses_model=False)

    def setup(self) -> None:
        """Load models. Called once per worker, before the first batch."""

    def preflight(self) -> None:
        """Called in the driver before any worker starts: check that what setup() will load can be
        had (a path exists, a hub file is cached or the hub reachable, a token is set) and raise
        ConfigError naming the config key if not. Loads nothing: a wrong path costs seconds, not a
        cluster's worth of failed workers."""

    def describe(self) -> dict[str, Any]:
        """Identity of what this stage runs (model, weights, device), for run.json and samples."""
        return {}

    def process(self, chunk: Chunk) -> Chunk:
        raise NotImplementedError

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """torch's intra-op threads set for this stage while it works, then put back: in a fused
        worker every stage runs on its own count, not on whichever setup() came last. Stages
        without a model do no torch work and leave it alone."""
        res = self.resources()
        if not res.uses_model:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(res.threads or torch_threads(res.cpus))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def prepare(self) -> None:
        """setup(), once, under the stage's thread count; the first process_batch calls it."""
        if not self._ready:
            with self.threads():
                self.setup()
            self._ready = True

    def process_batch(self, chunks: list[Chunk]) -> list[Chunk]:
        try:
            self.prepare()
        except Exception as exc:  # a model that cannot load is the run's problem, not these chunks'
            reason = f"{self.name} could not start: {type(exc).__name__}: {str(exc)[:1000]}"
            for chunk in chunks:
                chunk.fatal = chunk.fatal or reason
            return chunks
        with self.threads():
            return [self._process_one(chunk) for chunk in chunks]

    def _process_one(self, chunk: Chunk) -> Chunk:
        if chunk.fatal or (chunk.done and not self.handles_done):  # failed or rejected upstream: pass through
            return chunk
        clock = Clock()
        try:
            chunk = self.process(chunk)
            self.counters["ok"] += 1
        except Exception as exc:  # recorded, never lost: the writer turns it into errors/
            chunk.fail(self.name, exc)
            self.counters[f"error:{type(exc).__name__}"] += 1
        clock.charge(chunk, self.name)
        return chunk
