"""What a fused worker pays before its first chunk: imports and model loads, stage by stage.

    python bench/bench_startup.py [--threads 1]

One fresh process, as a Ray worker: torch first, then each stage's prepare() (its imports and
model load) in chain order, wall and process-CPU seconds (CPU is the figure to trust on a shared
machine). Then the pyannote import chain from `python -X importtime` in another fresh process,
with what torchmetrics (imported by lightning, imported by pyannote) costs of it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

CHAIN_MODULES = ["pyannote.audio", "lightning", "torchmetrics", "torchmetrics.functional", "torchvision", "transformers"]


def pyannote_import_chain() -> list[list[str]]:
    """Cumulative import seconds of the heavy modules under `import pyannote.audio.pipelines`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pyannote.audio.pipelines"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    first: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
            if cum.isdigit():
                first.setdefault(name, int(cum) / 1e6)
    return [[m, f"{first[m]:.2f}"] for m in ["pyannote.audio.pipelines", *CHAIN_MODULES] if m in first]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as a 1-CPU worker")
    args = ap.parse_args()
    from stages.base import process_cpu_seconds

    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    t, c = time.perf_counter(), process_cpu_seconds()
    import torch

    torch.set_num_threads(args.threads)
    rows = [["import torch", f"{time.perf_counter() - t:.2f}", f"{process_cpu_seconds() - c:.2f}"]]
    from pipeline.config import load_config
    from stages.chain import build_stages

    out = Path(tempfile.mkdtemp(prefix="csm-startup-")) / "out"
    config = load_config([], ["tokenize.allow_unreleased=true"], {"write": {"output": str(out)}})
    for stage in build_stages(config):
        t, c = time.perf_counter(), process_cpu_seconds()
        stage.prepare()
        rows.append([stage.name, f"{time.perf_counter() - t:.2f}", f"{process_cpu_seconds() - c:.2f}"])
    total = sum(float(r[2]) for r in rows)
    rows.append(["total", f"{sum(float(r[1]) for r in rows):.2f}", f"{total:.2f}"])
    print(f"## Worker start-up, one fresh process, {args.threads} torch thread(s)\n")
    print(table(rows, ["step", "wall s", "CPU s"]))
    print("\n## pyannote's import chain, fresh process (cumulative wall seconds, first import of each)\n")
    print(table(pyannote_import_chain(), ["module", "s"]))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
