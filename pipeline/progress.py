"""Progress on stderr (inputs and audio hours done, rate, ETA) and the run's running totals."""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import Any

from stages.records import Chunk


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

    def update(self, chunk: Chunk) -> None:
        w = chunk.written
        uri = chunk.recording.uri
        self.audio_seconds += chunk.duration
        self.counts["chunks"] += 1
        for key in ("samples", "utterances", "frames", "rejected"):
            self.counts[key] += w.get(key, 0)
        self.counts["kept_seconds"] += w.get("kept_seconds", 0.0)
        for e in w.get("errors", []):
            self.errors[e] += 1
        self.stage_seconds.update(chunk.timings)
        self.stage_cpu.update(chunk.cpu_times)
        for stage, where in chunk.placement.items():
            self.nodes.add(where["node"])
            if where["actor"]:
                self.stage_actors[stage].add(where["actor"])
        for name in ("codec", "diarizer"):
            if w.get(name) and name not in self.models:
                self.models[name] = w[name]
        self.chunks_seen[uri].add(chunk.index)
        if chunk.last:
            self.last_index[uri] = chunk.index
        if uri in self.last_index and len(self.chunks_seen[uri]) == self.last_index[uri] + 1:
            self.done_sources.add(uri)
            self.bytes_done += self.sizes.get(uri, 0)
            self.counts["failed_sources"] += int(chunk.failed and chunk.index == 0)
        if time.time() - self.last_print >= self.interval:
            self.print()

    def print(self) -> None:
        self.last_print = time.time()
        elapsed = self.last_print - self.start
        frac = self.bytes_done / self.total_bytes
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("inf")
        print(
            f"[csm-corpus] {len(self.done_sources)}/{self.total_inputs} inputs, "
            f"{self.audio_seconds / 3600:.3f} h audio, {self.audio_seconds / max(elapsed, 1e-9):.1f}x real time, "
            f"{self.counts['samples']} samples, {sum(self.errors.values())} errors, "
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
            "models": self.models,
            "nodes_used": len(self.nodes),
            "actors_used": {stage: len(ids) for stage, ids in sorted(self.stage_actors.items())},
        }
