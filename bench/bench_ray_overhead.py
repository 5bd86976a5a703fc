"""What Ray's own processes cost while the model workers work: the share of a core a run can never
give to its models.

    python bench/bench_ray_overhead.py [--seconds 40]

Starts Ray as `pipeline run` does (pipeline/ray_runner.py: `connected`), runs a Ray Data actor pool
of one actor per core, as the fused chain does, whose actors only sleep, and after a settling
period samples every process's CPU (utime + stime from /proc) for `--seconds`: what is left is
the driver's scheduling loop, Ray Data's internal actors, raylet, GCS and the other daemons
(this process and every process under it).
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
    args = ap.parse_args()
    import ray

    from pipeline.config import load_config
    from pipeline.ray_runner import connected

    workers = os.cpu_count() or 1  # one actor per core, as the fused chain runs
    nap = args.seconds + 40  # each actor sleeps through the whole sample

    class Sleeper:
        def __call__(self, batch):
            time.sleep(nap)
            return batch

    sample: dict = {}

    def measure() -> None:
        time.sleep(20)
        a = processes()
        time.sleep(args.seconds)
        b = processes()
        ours = descendants(b, os.getpid())
        sample.update({pid: (cpu - a.get(pid, (0, 0.0, ""))[1], name) for pid, (_, cpu, name) in b.items() if pid in ours})

    with connected(None, load_config([], [], {})):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"x": i} for i in range(workers)], override_num_blocks=workers)
        ds = ds.map_batches(Sleeper, batch_size=1, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1))
        sampler = threading.Thread(target=measure)
        sampler.start()
        for _ in ds.iter_rows():
            pass
        sampler.join()
    by_name: dict[str, float] = {}
    for cpu, name in sample.values():
        by_name[name] = by_name.get(name, 0.0) + cpu
    rows = [[n, f"{c:.2f}", f"{100 * c / args.seconds:.1f}"] for n, c in sorted(by_name.items(), key=lambda x: -x[1]) if c >= 0.01]
    total = sum(by_name.values())
    print(f"## CPU of this driver and its Ray while {workers} actors sleep, {args.seconds:.0f} s sampled ({workers} cores)\n")
    print(table(rows, ["process", "CPU s", "% of one core"]))
    print(f"\ntotal: {total:.2f} CPU-s, {100 * total / args.seconds:.1f} % of one core, "
          f"{100 * total / (args.seconds * workers):.1f} % of the machine")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
