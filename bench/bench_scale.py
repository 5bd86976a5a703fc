"""How far the fused runner scales: many workers, short chunks, on a small machine.

    python bench/bench_scale.py [--workers 8,16,32,64] [--chunk-seconds 0.4,0.1] [--seconds 10]
                                [--chunks-per-source 8] [--real-write] [--breakdown]

The real runner (`run_pipeline` inside `connected`) on a local Ray with workers + 2 logical CPUs,
the chain built from CHAIN through its own extension point: a synthetic source in place of decode
(`--chunks-per-source` tiny chunks per made-up URI, no file read) and one stub stage in place of
every stage up to write, which sleeps `--chunk-seconds` per chunk and uses no CPU. The workers wait,
the machine's cores go to the runner and Ray: what is measured is what a chunk costs them.
Without --real-write a stub write marks each chunk committed; with it, the chain's own write stage
writes to a temporary corpus.

Per setting: time to the first chunk and to every worker's first; in the steady state (from
SETTLE_S after every worker has returned a chunk, or when a tenth of the chunks are back if later,
to when fewer chunks are left than workers) chunks/s, the workers' busy share (stage seconds of the
chunks back in it / (workers x wall); over a short one it can read a little over 1), the driver's
CPU per chunk (this process, Ray's threads in it included; over the steady state and its second
half, which shows whether it grows), that of the run's whole process tree (the driver and its Ray:
other work on the machine left out) and the machine's (/proc/stat). --breakdown adds the steady
state's CPU per chunk by process. The last line is the last setting's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, table

TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 3.0  # the steady state starts this long after every worker has returned a chunk


def machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def bench_chain(real_write: bool):
    """CHAIN with a synthetic source and one sleeping stage before write (the real write, or a stub).
    Made in a function: Ray ships classes defined here by value."""
    import numpy as np

    from stages.base import Resources, Stage
    from stages.chain import CHAIN, StageSpec
    from stages.records import Chunk, Recording, source_id

    @dataclass(frozen=True)
    class BenchConfig:
        chunks: int = 8  # per source
        chunk_seconds: float = 0.1  # each worker sleeps this long per chunk

    class SyntheticSource(Stage):
        name = "decode"

        def resources(self) -> Resources:
            return Resources(cpus=0.5)  # as decode's

        def chunks(self, uri: str):
            n = self.config.chunks
            rec = Recording(source_id(uri), uri, float(n), 16000, 1)
            for i in range(n):
                yield Chunk(rec, i, float(i), i == n - 1, audio16k=np.zeros((1, 160), np.float32))

    class Sleep(Stage):
        name = "sleep"

        def resources(self) -> Resources:
            return Resources(cpus=1.0, uses_model=True)

        @contextlib.contextmanager
        def threads(self):  # the base imports torch for a model stage: 64 of them would not fit here
            yield

        def process(self, chunk: Chunk) -> Chunk:
            time.sleep(self.config.chunk_seconds)
            return chunk

    class StubWrite(Stage):
        name = "write"
        handles_done = True

        def process(self, chunk: Chunk) -> Chunk:
            from stages.corpus_format import ChunkRecord

            chunk.committed = ChunkRecord.of(chunk)
            chunk.drop_audio()
            return chunk

    write = CHAIN.stages[-1]
    assert write.name == "write", "the chain no longer ends with write"
    if not real_write:
        write = StageSpec(StubWrite, write.section, write.config)
    return dataclasses.replace(CHAIN, source=StageSpec(SyntheticSource, "bench", BenchConfig),
                               stages=(StageSpec(Sleep, "bench", BenchConfig), write))


def start_ray(num_cpus: int, workers: int) -> None:
    """A local Ray as `connected` starts one, with memory declared for every worker: each asks Ray
    for WORKER_BASE_GB, more than this machine holds for 64 of them (the stubs use ~0.1 GB)."""
    import ray

    from pipeline.ray_runner import MALLOC_ENV
    from stages.base import WORKER_BASE_GB

    # "local": a new Ray even where a `ray start` cluster runs on this machine (ray.init would join it).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": MALLOC_ENV}, _memory=int((workers * WORKER_BASE_GB + 4) * 2**30))


def stop_ray() -> None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)  # as `connected`: not the 1.9 s exit hook
    ray.shutdown()


def tree_cpu() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, name) for this process and every one under it (its Ray)."""
    from bench_ray_overhead import descendants, processes

    procs = processes()
    return {pid: (procs[pid][1], procs[pid][2]) for pid in descendants(procs, os.getpid()) if pid in procs}


def run_setting(chain, workers: int, chunk_seconds: float, chunks: int, per_source: int, breakdown: bool) -> dict:
    import pipeline.ray_runner as runner
    from pipeline.config import load_config

    marks: dict[str, tuple] = {}
    arrivals: list[float] = []
    busy: list[float] = []
    actors: set = set()
    stage_names = [s.name for s in chain.stages]
    start_at = max(chunks // 10, 1)
    end_at = chunks - workers

    class TimedProgress(runner.Progress):
        """Progress that notes when each summary reaches the driver, and the steady state's edges."""

        def update(self, s) -> None:
            now = time.perf_counter()
            arrivals.append(now)
            busy.append(sum(s.timings.get(n, 0.0) for n in stage_names))
            if len(actors) < workers:
                actors.add(s.placement.get("sleep", {}).get("actor"))
                if len(actors) == workers:
                    marks["all"] = (now,)
            n = len(arrivals)
            if "start" not in marks and "all" in marks and now >= marks["all"][0] + SETTLE_S and n >= start_at:
                procs, machine = tree_cpu(), machine_busy_seconds()
                marks["start"] = (n, time.perf_counter(), time.process_time(), machine, procs)
                marks["mid_at"] = ((n + end_at) // 2,)
            elif "start" in marks and "mid" not in marks and n >= marks["mid_at"][0]:
                marks["mid"] = (n, time.process_time())
            elif "start" in marks and "end" not in marks and n >= end_at:
                cpu, machine = time.process_time(), machine_busy_seconds()
                marks["end"] = (n, time.perf_counter(), cpu, machine, tree_cpu())
            super().update(s)

    sources = -(-chunks // per_source)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as out:
        config = load_config([], [], {"bench": {"chunks": per_source, "chunk_seconds": chunk_seconds},
                                      "write": {"output": out},
                                      "run": {"workers": workers, "fuse_stages": True, "progress_seconds": 1e9}},
                             chain=chain)
        saved, runner.Progress = runner.Progress, TimedProgress
        try:
            with runner.connected(None, config):
                t0 = time.perf_counter()
                summary = runner.run_pipeline([f"synthetic://s{i:05d}.wav" for i in range(sources)], [1] * sources, config)
                wall = time.perf_counter() - t0
        finally:
            runner.Progress = saved
    total = sources * per_source
    row = {"workers": workers, "chunk_s": chunk_seconds, "chunks": len(arrivals), "expected": total,
           "committed": summary["counts"].get("chunks", 0) - summary["counts"].get("not_written", 0),
           "first_chunk_s": arrivals[0] - t0 if arrivals else float("nan"), "wall_s": wall, "actors_seen": len(actors),
           "all_workers_s": marks["all"][0] - t0 if "all" in marks else float("nan")}
    if "start" in marks and "end" in marks:
        (n0, t_0, c0, m0, p0), (n1, t_1, c1, m1, p1) = marks["start"], marks["end"]
        done, span = n1 - n0, t_1 - t_0
        by_name: dict[str, float] = {}
        for pid, (cpu, name) in p1.items():
            by_name[name] = by_name.get(name, 0.0) + cpu - p0.get(pid, (0.0, ""))[0]
        nm, cm = marks.get("mid", (n0, c0))
        row.update(steady_chunks=done, steady_s=span, chunks_per_s=done / span,
                   busy=sum(busy[n0:n1]) / (workers * span), driver_ms=1000 * (c1 - c0) / done,
                   driver_ms_2nd=1000 * (c1 - cm) / max(n1 - nm, 1),
                   ray_ms=1000 * sum(by_name.values()) / done, machine_ms=1000 * (m1 - m0) / done)
        if breakdown:
            row["breakdown"] = {k: 1000 * v / done for k, v in sorted(by_name.items(), key=lambda x: -x[1]) if v > 0.005}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="8,16,32,64")
    ap.add_argument("--chunk-seconds", default="0.4,0.1")
    ap.add_argument("--seconds", type=float, default=10.0, help="chunks per setting: what the workers would do in this long")
    ap.add_argument("--chunks-per-source", type=int, default=8)
    ap.add_argument("--real-write", action="store_true", help="the chain's own write stage instead of a stub")
    ap.add_argument("--breakdown", action="store_true", help="steady-state CPU per chunk by process")
    args = ap.parse_args()
    chain = bench_chain(args.real_write)
    rows = []
    for workers in [int(x) for x in args.workers.split(",")]:
        start_ray(workers + 2, workers)
        try:
            for chunk_seconds in [float(x) for x in args.chunk_seconds.split(",")]:
                # Enough for `--seconds` of steady state after the workers have started (up to ~1 s each
                # on 2 cores, the first ones working meanwhile).
                chunks = int(workers / chunk_seconds * (args.seconds + 0.4 * workers))
                row = run_setting(chain, workers, chunk_seconds, chunks, args.chunks_per_source, args.breakdown)
                rows.append(row)
                print(f"# {row}", file=sys.stderr, flush=True)
        finally:
            stop_ray()
    header = ["workers", "chunk s", "chunks", "first chunk s", "all workers s", "wall s", "steady chunks", "chunks/s",
              "busy", "driver ms/chunk", "(2nd half)", "run ms/chunk", "machine ms/chunk"]
    print(f"\n## fused runner, {'real' if args.real_write else 'stub'} write, {os.cpu_count()} cores, "
          f"{args.chunks_per_source} chunks per source; load average {os.getloadavg()[0]:.1f} at the end\n")
    nan = float("nan")
    print(table([[r["workers"], r["chunk_s"], f"{r['chunks']}/{r['expected']}", f"{r['first_chunk_s']:.1f}",
                  f"{r['all_workers_s']:.1f}", f"{r['wall_s']:.1f}", r.get("steady_chunks", "-"),
                  f"{r.get('chunks_per_s', nan):.0f}", f"{r.get('busy', nan):.2f}", f"{r.get('driver_ms', nan):.2f}",
                  f"{r.get('driver_ms_2nd', nan):.2f}", f"{r.get('ray_ms', nan):.2f}", f"{r.get('machine_ms', nan):.2f}"]
                 for r in rows], header))
    for r in rows:
        if "breakdown" in r:
            print(f"\nCPU ms per chunk by process, {r['workers']} workers, {r['chunk_s']} s chunks:")
            print(table([[k, f"{v:.3f}"] for k, v in r["breakdown"].items()], ["process", "ms/chunk"]))
    r = rows[-1]
    print(f"chunks_per_s={r.get('chunks_per_s', 0.0):.1f} busy={r.get('busy', 0.0):.3f} "
          f"driver_ms_per_chunk={r.get('driver_ms', float('nan')):.3f} workers={r['workers']}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
