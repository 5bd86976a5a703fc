"""Progress on stderr (inputs and audio hours done, rate, ETA) and the run's running totals."""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import Any

from stages.corpus_format import ChunkRecord
from stages.records import ChunkSummary


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total_inputs: int, total_bytes: int, sizes: dict[str, int], interval: float):
        self.total_inputs, self.total_bytes, self.sizes = total_inputs, max(total_bytes, 1), sizes
        self.interval = interval
        self.start = self.last_print = time.time()
        self.done_sources: set[str] = set()
        self.chunks_seen: dict[str, set[int]] = defaultdict(set)
        self.last_index: dict[str, int] = {}
        self.audio_seconds = 0.0
        self.bytes_done = 0
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.stage_cpu: Counter[str] = Counter()
        self.models: dict[str, Any] = {}
        self.nodes: set[str] = set()
        self.stage_actors: defaultdict[str, set[str]] = defaultdict(set)  # the actors that ran each stage

    def update(self, s: ChunkSummary) -> None:
        r = s.record
        self.audio_seconds += r.duration
        self.counts["chunks"] += 1
        for key in ("samples", "utterances", "frames", "rejected"):
            self.counts[key] += getattr(r, key)
        self.counts["kept_seconds"] += r.kept_seconds
        self.errors.update(r.errors)
        self.stage_seconds.update(s.timings)
        self.stage_cpu.update(s.cpu_times)
        for stage, where in s.placement.items():
            self.nodes.add(where["node"])
            if where["actor"]:
                self.stage_actors[stage].add(where["actor"])
        for name in ("codec", "diarizer"):
            if getattr(r, name) and name not in self.models:
                self.models[name] = getattr(r, name)
        if s.committed:  # else nothing is on disk: the source stays incomplete and a rerun retries it
            self.chunk_done(r)
        elif not s.fatal:
            self.counts["not_written"] += 1  # the writer failed: its error is counted above
        if time.time() - self.last_print >= self.interval:
            self.print()

    def chunk_done(self, r: ChunkRecord) -> None:
        self.chunks_seen[r.uri].add(r.chunk)
        if r.last:
            self.last_index[r.uri] = r.chunk
        if r.uri in self.last_index and len(self.chunks_seen[r.uri]) == self.last_index[r.uri] + 1:
            self.done_sources.add(r.uri)
            self.bytes_done += self.sizes.get(r.uri, 0)
            self.counts["failed_sources"] += int(r.failed and r.chunk == 0)
            del self.chunks_seen[r.uri], self.last_index[r.uri]  # memory: the sources in flight

    def print(self) -> None:
        self.last_print = time.time()
        elapsed = self.last_print - self.start
        frac = self.bytes_done / self.total_bytes
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("inf")
        print(
            f"[csm-corpus] {len(self.done_sources)}/{self.total_inputs} inputs, "
            f"{self.audio_seconds / 3600:.3f} h audio, {self.audio_seconds / max(elapsed, 1e-9):.1f}x real time, "
            f"{self.counts['samples']} samples, {sum(self.errors.values())} errors"
            f"{f' ({n} chunks not written)' if (n := self.counts['not_written']) else ''}, "
            f"elapsed {_fmt_eta(elapsed)}, ETA {_fmt_eta(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        if self.last_print < time.time() - 1:
            self.print()

    def summary(self) -> dict[str, Any]:
        wall = time.time() - self.start
        return {
            "inputs": self.total_inputs,
            "inputs_done": len(self.done_sources),
            "audio_hours": self.audio_seconds / 3600,
            "wall_seconds": wall,
            "real_time_factor": self.audio_seconds / wall if wall > 0 else 0.0,
            "counts": dict(self.counts),
            "errors_by_type": dict(self.errors),
            "stage_seconds": dict(self.stage_seconds),
            "stage_cpu_seconds": dict(self.stage_cpu),
            "nodes_used": len(self.nodes),
            "actors_used": {stage: len(ids) for stage, ids in sorted(self.stage_actors.items())},
        }
