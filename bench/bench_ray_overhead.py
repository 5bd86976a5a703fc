"""What Ray's own processes cost while the model workers work: the share of a core a run can never
give to its models.

    python bench/bench_ray_overhead.py [--seconds 40] [--runner fused|ray-data]

Starts Ray as `pipeline run` does (pipeline/ray_runner.py: `connected`), runs one actor per core
whose stage only sleeps, and after a settling period samples every process's CPU (utime + stime
from /proc) for `--seconds`: what is left is the driver's loop, raylet, GCS and the other daemons
(this process and every process under it). `--runner fused`: the fused chain's own runner on
Ray's task API (`fused_summaries`), as `pipeline run` runs on CPU; `ray-data`: the same pool as a
Ray Data actor pool, as the fused chain ran before, with Ray Data's scheduling loop and internal
actors.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from common import ROOT, table

TICK = os.sysconf("SC_CLK_TCK")


def processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, name) for every process on the machine."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, name_of(cmd))
    return out


def name_of(cmd: str) -> str:
    """ray::Name for Ray workers, the script for a Python process, else the executable."""
    tokens = cmd.split()
    if not tokens:
        return "(kernel)"
    if tokens[0].startswith("ray::"):
        return tokens[0]
    exe = os.path.basename(tokens[0])
    return os.path.basename(next((t for t in tokens[1:] if t.endswith(".py")), exe)) if exe.startswith("python") else exe


def descendants(procs: dict[int, tuple[int, float, str]], root: int) -> set[int]:
    """`root` and every process under it: the driver, and the Ray it started with its workers."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0, help="sampling period, after 20 s of settling")
    ap.add_argument("--runner", default="fused", choices=["fused", "ray-data"])
    args = ap.parse_args()
    import numpy as np

    from pipeline.config import load_config
    from pipeline.ray_runner import Operator, connected, fused_summaries, pool_summaries
    from stages.base import Resources, Stage
    from stages.records import Chunk, Recording

    workers = os.cpu_count() or 1  # one actor per core, as the fused chain runs
    nap = args.seconds + 40  # each actor sleeps through the whole sample

    class Sleep(Stage):
        name = "sleep"

        def resources(self) -> Resources:
            return Resources(cpus=1.0, uses_model=True)

        def process(self, chunk: Chunk) -> Chunk:
            time.sleep(nap)
            return chunk

    class Source(Stage):
        name = "decode"

        def chunks(self, uri: str):
            yield Chunk(Recording(uri, uri, 1.0, 16000, 1), 0, 0.0, True, audio16k=np.zeros((1, 16000), np.float32))

    sample: dict = {}

    def measure() -> None:
        time.sleep(20)
        a = processes()
        time.sleep(args.seconds)
        b = processes()
        ours = descendants(b, os.getpid())
        sample.update({pid: (cpu - a.get(pid, (0, 0.0, ""))[1], name) for pid, (_, cpu, name) in b.items() if pid in ours})

    uris = [f"sleep{i}" for i in range(workers)]
    op = Operator([Sleep(None)], Sleep(None).resources(), workers, workers)
    with connected(None, load_config([], [], {})):
        if args.runner == "fused":
            summaries = fused_summaries(uris, Source(None), op, max_retries=0)
        else:
            summaries = pool_summaries(uris, Source(None), [op], max_retries=0)
        sampler = threading.Thread(target=measure)
        sampler.start()
        for _ in summaries:
            pass
        sampler.join()
    by_name: dict[str, float] = {}
    for cpu, name in sample.values():
        by_name[name] = by_name.get(name, 0.0) + cpu
    rows = [[n, f"{c:.2f}", f"{100 * c / args.seconds:.1f}"] for n, c in sorted(by_name.items(), key=lambda x: -x[1]) if c >= 0.01]
    total = sum(by_name.values())
    print(f"## CPU of this driver and its Ray ({args.runner} runner) while {workers} actors sleep, "
          f"{args.seconds:.0f} s sampled ({workers} cores)\n")
    print(table(rows, ["process", "CPU s", "% of one core"]))
    print(f"\ntotal: {total:.2f} CPU-s, {100 * total / args.seconds:.1f} % of one core, "
          f"{100 * total / (args.seconds * workers):.1f} % of the machine")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
