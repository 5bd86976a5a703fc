"""The stage contract (stages/base.py): each stage works on its own torch thread count, and a
failure is recorded on the chunk, never raised."""

from __future__ import annotations

import numpy as np
import torch

from stages.base import Resources, Stage, torch_threads
from stages.records import Chunk, Recording


def _chunk() -> Chunk:
    return Chunk(Recording("src", "mem://src", 1.0, 16000, 1), 0, 0.0, True, np.zeros((1, 16000), np.float32))


class Model(Stage):
    """Notes the threads torch has while it loads and while it works."""

    name = "model"

    def __init__(self, threads: int | None, cpus: float = 1.0):
        super().__init__(None)
        self.res, self.seen = Resources(cpus=cpus, uses_model=True, threads=threads), []

    def resources(self) -> Resources:
        return self.res

    def setup(self) -> None:
        self.seen.append(("setup", torch.get_num_threads()))

    def process(self, chunk: Chunk) -> Chunk:
        self.seen.append(("process", torch.get_num_threads()))
        if chunk.index < 0:
            raise RuntimeError("bad chunk")
        return chunk


def test_each_stage_works_on_its_own_thread_count_and_puts_it_back():
    before = torch.get_num_threads()
    one, two = Model(threads=1), Model(threads=None, cpus=2.0)
    for _ in range(2):  # as a fused worker runs them: one after the other, chunk after chunk
        [chunk] = one.process_batch([_chunk()])
        [chunk] = two.process_batch([chunk])
    assert one.seen == [("setup", 1), ("process", 1), ("process", 1)]
    n = torch_threads(2.0)  # its cpus, capped by the machine's cores
    assert two.seen == [("setup", n), ("process", n), ("process", n)]
    assert torch.get_num_threads() == before


def test_a_failing_stage_records_the_error_and_passes_the_chunk_on():
    stage = Model(threads=1)
    bad = _chunk()
    bad.index = -1
    [out] = stage.process_batch([bad])
    assert out.failed and out.errors[0].stage == "model" and out.errors[0].error_type == "RuntimeError"
    assert out.audio16k is None and out.duration == 1.0  # the audio is dropped, its duration kept
    assert stage.counters["error:RuntimeError"] == 1
