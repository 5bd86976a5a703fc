"""Real-time factor of each stage alone (one process, all cores), so the bottleneck is visible.

    python bench/bench_stages.py [--inputs 4] [--threads N] [--set key=value ...]

Each stage runs over the chunks the previous stages produced; only the stage itself is timed,
model loading reported apart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import make_inputs, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--set", action="append", default=[], help="config override, as for `pipeline run`")
    args = ap.parse_args()
    # A Ray worker gets OMP_NUM_THREADS = its CPUs, which also caps numpy's BLAS (diarization's
    # clustering): the same cap here, or a 1-thread stage would use more than one core.
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)

    from pipeline.config import load_config
    from stages.base import process_cpu_seconds
    from stages.chain import build_source, build_stages

    work = Path(tempfile.mkdtemp(prefix="csm-stages-"))
    config = load_config([], [f"{s}.cpus={args.threads}" for s in ("vad", "diarize", "asr", "tokenize")] + ["tokenize.allow_unreleased=true", *args.set],
                         {"write": {"output": str(work / "out")}})
    inputs = make_inputs(Path(tempfile.gettempdir()) / "csm-bench" / "inputs", args.inputs)

    source = build_source(config)
    t, cpu = time.perf_counter(), process_cpu_seconds()
    chunks = [c for p in inputs for c in source.chunks(str(p))]
    rows = [[source.name, "-", f"{time.perf_counter() - t:.2f}", f"{process_cpu_seconds() - cpu:.2f}"]]
    audio = sum(c.duration for c in chunks)
    from stages.corpus_format import OutputDir

    OutputDir(config.write.output).makedirs()
    for stage in build_stages(config):
        t = time.perf_counter()
        stage.prepare()
        load = time.perf_counter() - t
        t, cpu = time.perf_counter(), process_cpu_seconds()
        chunks = stage.process_batch(chunks)
        getattr(stage, "close", lambda: None)()  # the writer's last part
        rows.append([stage.name, f"{load:.2f}", f"{time.perf_counter() - t:.2f}", f"{process_cpu_seconds() - cpu:.2f}"])
    rows = [r + [f"{audio / float(r[2]):.1f}" if float(r[2]) >= 0.01 else ">10000"] for r in rows]
    print(f"## Each stage alone: {len(inputs)} inputs, {audio:.0f} s of audio, {args.threads} threads\n")
    print(table(rows, ["stage", "load s", "wall s", "CPU s", "x real time"]))
    bottleneck = min((r for r in rows if r[4][0] != ">"), key=lambda r: float(r[4]))
    print(f"\nbottleneck: {bottleneck[0]} ({bottleneck[4]}x real time)")


if __name__ == "__main__":
    main()
