"""End-to-end throughput, per-stage CPU, scaling, and the side-by-side with the sequential script.

    python bench/bench_pipeline.py [--sizes 4,8,16] [--baseline] [--workdir /tmp/csm-bench]
    python bench/bench_pipeline.py --shape podcasts --sizes 1,2 --minutes 10,20,30 --baseline
    python bench/bench_pipeline.py --shape mix --sizes 1 --minutes 12 --calls 4 --baseline --plain [--repeat 3]
    python bench/bench_pipeline.py --shape podcasts --sizes 1 --minutes 10 --set vad.cpus=2 --set asr.cpus=2 ...

Shapes: `calls` (default), each size N distinct 30 s conversations; `podcasts`, N recordings of
`--minutes` (cycled: 10, 20, 30 minutes), where one long recording has fewer chunks than cores;
`mix`, N such recordings plus `--calls` short calls. Each size is run by `pipeline run` in a fresh
process (a fresh local Ray, models loaded in their actors: the whole cost a user pays). Machine CPU
is read from /proc/stat, so Ray's own processes are counted; run it on an otherwise idle machine
(the load average is printed with the results).

--baseline runs bench/sequential_baseline.py, the same models in one process; --plain adds its
--plain mode (whisperx, a d-vector per segment clustered, Mimi: no diarizer, VAD or DNSMOS).
--repeat N runs it all N times, the scripts right after the pipeline each time, and prints each
repetition's ratio: on a 2-core VM one run's wall time varies by about 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, make_inputs, make_long_inputs, table

MODEL_STAGES = ("vad", "diarize", "asr", "filter_windows", "tokenize")  # filter_windows: DNSMOS, a model


def model_cpu_seconds(run: dict) -> float:
    return sum(run["stage_cpu_seconds"].get(s, 0.0) for s in MODEL_STAGES)


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the slower middle one of an even number)."""
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def worker_rss_gb() -> float:
    """The largest resident set among Ray's model workers right now (they are not our children)."""
    peak = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        # The fused chain's actors, or Ray Data's (pools per stage); Name is cut at 15 characters.
        if any(f"\nName:\tray::{w}" in "\n" + text for w in ("StageWork", "MapWorker")):
            peak = max(peak, int(text.split("VmRSS:")[1].split()[0]) if "VmRSS:" in text else 0)
    return peak / 2**20


def run_pipeline(inputs: list[Path], out: Path, sets: list[str] = ()) -> dict:
    busy, t0 = machine_busy_seconds(), time.time()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", *map(str, inputs), "--output", str(out),
           "--set", "tokenize.allow_unreleased=true", "--allow-config-change",
           "--set", "write.shard_size=1",  # a part per chunk: each commit's time is when its chunk was done
           *(x for s in sets for x in ("--set", s))]
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: nobody reads a pipe while it runs
    with open(log, "wb") as sink:
        proc, rss = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT), 0.0
        while proc.poll() is None:  # sampled each second: the peak of a worker's memory, near enough
            rss = max(rss, worker_rss_gb())
            time.sleep(1.0)
    if proc.returncode:
        raise RuntimeError(log.read_text()[-3000:])
    wall, busy = time.time() - t0, machine_busy_seconds() - busy
    run = json.loads((out / "run.json").read_text())
    # When each chunk's commit object was written, from the command's start: the first shows the
    # start-up (Ray, the workers' imports, one chunk's work), the gaps between the last ones the tail.
    commits = sorted(p.stat().st_mtime - t0 for p in (out / "commits").glob("*.parquet"))
    return {"wall": wall, "busy": busy, "run": run, "rss": rss, "commits": commits}


def run_baseline(inputs: list[Path], out: Path, plain: bool = False) -> dict:
    busy, t0 = machine_busy_seconds(), time.time()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sequential_baseline.py"), *["--plain"] * plain, str(out),
                          *map(str, inputs)],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    wall, busy = time.time() - t0, machine_busy_seconds() - busy
    return {"wall": wall, "busy": busy, **json.loads(res.stdout.strip().splitlines()[-1])}


def select_inputs(args, work: Path, largest: int):
    """n -> the first n inputs of the chosen shape (files cached under `work`)."""
    calls = make_inputs(work / "inputs", {"calls": largest, "mix": args.calls}.get(args.shape, 0))
    if args.shape == "calls":
        return lambda n: calls[:n]
    minutes = [float(m) for m in args.minutes.split(",")]
    long = make_long_inputs(work / "podcasts", [minutes[i % len(minutes)] for i in range(largest)])
    if args.shape == "podcasts":
        return lambda n: long[:n]
    return lambda n: long[:n] + calls[: args.calls]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,8,16")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--plain", action="store_true", help="with --baseline: also the plain script (no diarizer)")
    ap.add_argument("--workdir", default="/tmp/csm-bench")
    ap.add_argument("--shape", default="calls", choices=["calls", "podcasts", "mix"])
    ap.add_argument("--minutes", default="10,20,30", help="podcast lengths, cycled over the recordings")
    ap.add_argument("--calls", type=int, default=4, help="short calls added to each size of the mix")
    ap.add_argument("--set", action="append", default=[], help="pipeline config override, e.g. tokenize.cpus=2")
    ap.add_argument("--repeat", type=int, default=1, help="run everything this many times; the tables show median runs")
    args = ap.parse_args()
    work, cores = Path(args.workdir), os.cpu_count() or 1
    sizes = [int(s) for s in args.sizes.split(",")]
    inputs = select_inputs(args, work, max(sizes))
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {cores} cores", file=sys.stderr)
    # Each repetition runs every size, then the scripts, back to back: a slow spell of the machine
    # then hits both sides of a ratio. The tables show the median run of each.
    runs: dict[tuple[str, int], list[dict]] = {}
    compared = sorted({sizes[0], sizes[-1]}) if args.baseline else []  # smallest (start-up weighs most), largest
    for rep in range(args.repeat):
        for n in sizes:
            out = work / f"out-{args.shape}-{n}"
            subprocess.run(["rm", "-rf", str(out)])
            res = run_pipeline(inputs(n), out, args.set)
            runs.setdefault(("pipeline", n), []).append(res)
            r, commits = res["run"], res["commits"]
            print(f"[{n} inputs, run {rep + 1}] {r['audio_hours'] * 3600:.0f} s audio in {res['wall']:.1f} s; chunk commits at "
                  f"{commits[0]:.1f} s (first) ... {', '.join(f'{t:.1f}' for t in commits[-cores:])} s (last {cores})",
                  file=sys.stderr)
        for n in compared:
            runs.setdefault(("script", n), []).append(run_baseline(inputs(n), work / f"baseline-{args.shape}-{n}"))
            if args.plain:
                runs.setdefault(("plain", n), []).append(run_baseline(inputs(n), work / f"plain-{args.shape}-{n}", plain=True))
    results = {n: median_run(runs["pipeline", n]) for n in sizes}

    rows = []
    for n, res in results.items():
        r = res["run"]
        audio = r["audio_hours"] * 3600
        model_cpu = model_cpu_seconds(r)
        rows.append([n, f"{audio:.0f}", f"{res['wall']:.1f}", f"{r['wall_seconds']:.1f}", f"{audio / res['wall']:.2f}",
                     f"{audio / res['wall']:.0f}", f"{res['busy'] / (cores * res['wall']):.2f}",
                     f"{model_cpu / (cores * res['wall']):.2f}", f"{1 - model_cpu / max(res['busy'], 1e-9):.2f}",
                     f"{res['rss']:.2f}"])
    print("\n## End to end (audio hours per wall hour = x real time)\n")
    print(table(rows, ["inputs", "audio s", "wall s", "pipeline s", "x real time", "h/h", "machine busy", "model CPU eff.", "CPU outside models",
                       "worker RSS GB"]))
    first, last = sizes[0], sizes[-1]
    print(f"\nscaling: {last / first:.0f}x input -> {results[last]['wall'] / results[first]['wall']:.2f}x wall time")
    if len(sizes) > 1:  # the added inputs alone: start-up (Ray, model loading) is paid once by both runs
        a, b = results[sizes[-2]], results[last]
        dw = b["wall"] - a["wall"]
        print(f"steady state, inputs {sizes[-2]} -> {last}: "
              f"{(b['run']['audio_hours'] - a['run']['audio_hours']) * 3600 / dw:.2f}x real time, "
              f"model CPU efficiency {(model_cpu_seconds(b['run']) - model_cpu_seconds(a['run'])) / (cores * dw):.2f}")

    largest = results[last]["run"]
    stage_rows = [[s, f"{largest['stage_seconds'].get(s, 0):.1f}", f"{largest['stage_cpu_seconds'].get(s, 0):.1f}",
                   f"{largest['audio_hours'] * 3600 / max(largest['stage_seconds'].get(s, 0), 1e-9):.1f}"]
                  for s in ["decode", *MODEL_STAGES, "utterances", "windows", "write"] if s in largest["stage_seconds"] or s == "decode"]
    print(f"\n## Per stage, {last} inputs (wall and CPU seconds inside the stage, summed over chunks)\n")
    print(table(stage_rows, ["stage", "wall s", "CPU s", "x real time"]))

    if args.baseline:  # at the smallest size (start-up weighs most) and the largest (closest to steady state)
        rows = []
        for n in compared:
            base, ours = median_run(runs["script", n]), results[n]
            audio = base["audio_seconds"]
            model_cpu = model_cpu_seconds(ours["run"])
            rows += [
                [n, "sequential script", f"{base['wall']:.1f}", f"{base['load_seconds']:.1f}", f"{audio / base['wall']:.2f}",
                 f"{base['busy'] / (cores * base['wall']):.2f}", "", ""],
                [n, "csm-corpus pipeline", f"{ours['wall']:.1f}", f"{ours['wall'] - ours['run']['wall_seconds']:.1f}",
                 f"{audio / ours['wall']:.2f}", f"{ours['busy'] / (cores * ours['wall']):.2f}", f"{base['wall'] / ours['wall']:.2f}x",
                 # What the pipeline would give if start-up and plumbing cost nothing: its model CPU spread
                 # over every core, against the script's processing (model load excluded) on the same cores.
                 f"{base['process_seconds'] / (model_cpu / cores):.2f}x"],
            ]
            if args.plain:
                plain = median_run(runs["plain", n])
                rows.append([n, "plain script", f"{plain['wall']:.1f}", f"{plain['load_seconds']:.1f}",
                             f"{audio / plain['wall']:.2f}", f"{plain['busy'] / (cores * plain['wall']):.2f}",
                             f"{plain['wall'] / ours['wall']:.2f}x", ""])
        ours = results[sizes[-1]]  # `base` is the largest size's, the loop's last
        print(f"\n## Side by side, same inputs (load average now {os.getloadavg()[0]:.2f})\n")
        print(table(rows, ["inputs", "", "wall s", "start-up s", "x real time", "machine busy", "throughput vs script",
                           "ceiling: models only"]))
        print(f"\n{args.shape}, {len(inputs(sizes[-1]))} files ({base['audio_seconds'] / 60:.0f} min of audio): "
              f"{base['wall'] / ours['wall']:.2f}x the same-model sequential script"
              + (f", {plain['wall'] / ours['wall']:.2f}x the plain script" if args.plain else "")
              + f"; model CPU efficiency over the whole run {model_cpu_seconds(ours['run']) / (cores * ours['wall']):.2f}")
        print("script wall seconds per model (all cores to each in turn): "
              + ", ".join(f"{k} {v:.1f}" for k, v in base.get("model_seconds", {}).items())
              + ("; plain: " + ", ".join(f"{k} {v:.1f}" for k, v in plain["model_seconds"].items() if v) if args.plain else ""))
        if args.repeat > 1:
            n = sizes[-1]
            for side in ("script", "plain") if args.plain else ("script",):
                ratios = [b["wall"] / p["wall"] for b, p in zip(runs[side, n], runs["pipeline", n])]
                walls = {k: ", ".join(f"{r['wall']:.1f}" for r in runs[k, n]) for k in ("pipeline", side)}
                print(f"{dict(script='same-model', plain='plain')[side]} script / pipeline, each repetition (run back to back): "
                      + ", ".join(f"{x:.2f}x" for x in ratios) + f"; walls: pipeline {walls['pipeline']} s, {side} {walls[side]} s")
        print("\nstart-up: the script's model loading; the pipeline's process start, Ray start and stop (its workers "
              "load their models inside the run, in parallel).")

if __name__ == "__main__":
    main()
