"""What reading a corpus costs as it grows: synthetic corpora of 10^3, 10^4 and 10^5 chunks written
through the pipeline's own PartWriter, then `pipeline stats --json`, resume start-up, `pipeline pack`
and `pipeline link-speakers`, each in a fresh process (CPU seconds and peak RSS of that process),
and the extrapolation to a million hours.

A synthetic chunk looks like a real 120 s chunk of conversation: three windows of 8 utterances with
their codes (32 x 25 s of frames each), quality metrics and per-utterance facts, 20 rejection
records, two chunk speakers with 256-d centroids near their source's two voices; sources of 10
chunks (20 minutes) in 97 shows (link-speakers groups by show). A second,
small corpus of 30 s calls (a chunk per source) gives the objects per hour for short sources.

    python bench/bench_corpus_scale.py                 # 10^3, 10^4, 10^5 chunks (about 10 minutes here)
    python bench/bench_corpus_scale.py --chunks 1000   # one size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK_SECONDS, WINDOWS, UTTERANCES, FRAMES = 120.0, 3, 8, 312  # 312 frames = 25 s of codes per window
MILLION_HOURS_CHUNKS = 1_000_000 * 3600 / CHUNK_SECONDS


def voice(source: str, k: int) -> np.ndarray:
    """Speaker k of a source: the same vector in each of its chunks, before the chunk's noise."""
    v = np.random.default_rng(zlib.crc32(f"{source}/{k}".encode())).normal(size=256)
    return v / np.linalg.norm(v)


def synthetic_output(rng: np.random.Generator, source: str, uri: str, chunk: int, last: bool, seconds: float):
    """A ChunkOutput shaped like a real chunk's (stages/write.py builds the same from a Chunk)."""
    from stages.corpus_format import CODES, JSON, ChunkRecord, Sample, SampleUtterance, SourceInfo, chunk_name, manifest_row, sample_key
    from stages.write import ChunkOutput, tar_members

    offset = chunk * CHUNK_SECONDS
    members, rows, rejected = [], [], []
    windows = WINDOWS if seconds >= CHUNK_SECONDS else 1
    for w in range(windows):
        start = offset + w * seconds / windows
        utts, quality = [], []
        for u in range(UTTERANCES):
            a = start + u * 3.2
            utts.append(SampleUtterance(f"S{u % 2}", a, a + 3.0, "so what do you think about that one then", 0,
                                        (u * 39, (u + 1) * 39), -0.3, 0.02, 0.1))
            quality.append({"start": a, "end": a + 3.0, "speaker": f"S{u % 2}", "text_chars": 41, "chars_per_second": 13.6,
                            "avg_logprob": float(rng.normal(-0.3, 0.1)), "no_speech_prob": 0.02, "overlap_ratio": 0.03,
                            "vad_coverage": 0.97, "repeat_ratio": 0.0, "language": "en", "language_prob": 0.99})
        key = sample_key(source, chunk, w)
        sample = Sample(key, SourceInfo(uri, source, 1200.0, 16000, 1), chunk, start, start + 25.6, "en", utts,
                        {"name": "mimi", "num_codebooks": 32, "released": True}, {"name": "synthetic"},
                        {"utterances": UTTERANCES, "speakers": 2, "turns": UTTERANCES, "speech_seconds": 24.0,
                         "overlap_seconds": 0.8, "mean_gap": 0.2, "avg_logprob": -0.3, "no_speech_prob": 0.02, "text_chars": 328,
                         "speech_ratio": 0.9, "snr_db": float(rng.normal(25, 5)), "clipping_ratio": 0.0,
                         "utterance_quality": quality})
        codes = rng.integers(0, 2048, size=(32, FRAMES), dtype=np.int16)
        import io

        buf = io.BytesIO()
        np.save(buf, codes, allow_pickle=False)
        members += [(f"{key}.{JSON}", sample.to_json()), (f"{key}.{CODES}", buf.getvalue())]
        rows.append(manifest_row(sample, FRAMES))
    for r in range(20):
        a = offset + r * seconds / 20
        rejected.append({"source_id": source, "stage": "vad", "reason": "non_speech", "start": a, "end": a + 0.5, "metric": None,
                         "key": None, "level": "region", "duration": 0.5, "uri": uri})
    speakers = {f"S{k}": {"seconds": 40.0, "embedding": [float(x) for x in voice(source, k) + 0.01 * rng.normal(size=256)],
                          "channel": None} for k in range(2)}
    record = ChunkRecord(source, uri, chunk, last, offset, seconds, seconds, None, len(rows), UTTERANCES * len(rows),
                         FRAMES * len(rows), 25.6 * len(rows), len(rejected), [], False, {"name": "mimi"}, {"name": "synthetic"},
                         speakers)
    return ChunkOutput(chunk_name(source, chunk), tar_members(members), rows, rejected, [], record)


def write_corpus(root: Path, chunks: int, per_source: int, seconds: float) -> float:
    """The corpus through a PartWriter with linking, as the writer actors do; wall seconds."""
    import functools

    from stages.corpus_format import OutputDir
    from stages.speakers import link_source
    from stages.write import PartWriter

    out = OutputDir(str(root))
    out.makedirs()
    root.joinpath("config.json").write_text(json.dumps({"digest": "synthetic", "layout": 2, "config": {"diarize": {"link_threshold": 0.3}}}))
    writer = PartWriter(out, 1_000_000_000, float("inf"), functools.partial(link_source, threshold=0.3, min_seconds=10.0))
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(chunks):
        s, c = divmod(i, per_source)
        sid = f"show{s % 97:02d}-ep{s:07d}-{s:010x}"
        writer.add(synthetic_output(rng, sid, f"s3://podcasts/show{s % 97:02d}/ep{s:07d}.mp3", c, c == per_source - 1, seconds))
    writer.close()
    return time.perf_counter() - t


# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a child across exec.
PROBE = """
import atexit, resource, sys
def _report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write("RUSAGE %f %d\\n" % (r.ru_utime + r.ru_stime, hwm))
atexit.register(_report)
"""


def measured(code: str) -> dict:
    """Run `code` in a fresh Python; its own CPU seconds, peak RSS and wall time."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE + code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    line = [x for x in done.stderr.splitlines() if x.startswith("RUSAGE ")]
    if done.returncode or not line:
        raise RuntimeError(done.stderr[-2000:])
    cpu, rss_kb = line[-1].split()[1:]
    return {"wall": wall, "cpu": float(cpu), "rss_mb": int(rss_kb) / 1024}


def baseline() -> dict:
    """The same measurement of a process that only imports the command line and the readers."""
    return measured("import pipeline.cli, pipeline.stats, pipeline.pack, pipeline.corpus, stages.speakers")


def objects(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def bench(n: int, work: Path, base: dict) -> dict:
    root = work / f"corpus-{n}"
    write_s = write_corpus(root, n, per_source=10, seconds=CHUNK_SECONDS)
    hours = n * CHUNK_SECONDS / 3600
    res = {"chunks": n, "hours": hours, "objects": objects(root), "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
           "write_s": write_s}
    res["stats"] = measured(f"from pipeline.cli import main; main(['stats', '--json', '{root}'], standalone_mode=False)")
    res["resume"] = measured("from stages.corpus_format import OutputDir; from stages.corpus_parts import remove_uncommitted, layout_problem;"
                             "from pipeline.corpus import committed_state; o = OutputDir('%s'); layout_problem(o); remove_uncommitted(o);"
                             "d, p = committed_state(o); print(len(d), len(p))" % root)
    res["pack"] = measured(f"from pipeline.cli import main; main(['pack', '{root}', '-o', '{work}/packed-{n}', '--val-fraction', '0.01'], standalone_mode=False)")
    res["link"] = measured(f"from pipeline.cli import main; main(['link-speakers', '{root}', '--group-by', 'source_dir'], standalone_mode=False)")
    for k in ("stats", "resume", "pack", "link"):
        res[k]["cpu_ms_per_chunk"] = 1000 * max(0.0, res[k]["cpu"] - base["cpu"]) / n
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="*", default=[1000, 10_000, 100_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corpus-scale-") as tmp:
        work = Path(tmp)
        base = baseline()
        print(f"baseline process (imports only): {base['cpu']:.2f} CPU-s, {base['rss_mb']:.0f} MB; figures below less its CPU")
        calls = work / "calls"
        write_corpus(calls, 2000, per_source=1, seconds=30.0)
        print(f"short calls: 2000 sources of 30 s ({2000 * 30 / 3600:.1f} h) -> {objects(calls)} objects "
              f"({objects(calls) / (2000 * 30 / 3600):.2f} per hour of audio)")
        header = ("chunks", "hours", "objects", "GB", "obj/h", "stats ms/chunk", "stats MB", "resume s", "resume MB",
                  "pack ms/chunk", "pack MB", "link ms/chunk", "link MB")
        print(" | ".join(header))
        last = None
        for n in args.chunks:
            r = bench(n, work, base)
            last = r
            print(" | ".join([f"{n}", f"{r['hours']:.0f}", f"{r['objects']}", f"{r['bytes'] / 1e9:.2f}",
                              f"{r['objects'] / r['hours']:.3f}",
                              f"{r['stats']['cpu_ms_per_chunk']:.3f}", f"{r['stats']['rss_mb']:.0f}",
                              f"{r['resume']['wall']:.2f}", f"{r['resume']['rss_mb']:.0f}",
                              f"{r['pack']['cpu_ms_per_chunk']:.3f}", f"{r['pack']['rss_mb']:.0f}",
                              f"{r['link']['cpu_ms_per_chunk']:.3f}", f"{r['link']['rss_mb']:.0f}"]), flush=True)
        m = MILLION_HOURS_CHUNKS
        print(f"\nat 1M hours ({m:.0f} chunks of {CHUNK_SECONDS:.0f} s), from the largest corpus: "
              f"objects ~{last['objects'] / last['hours'] * 1e6:,.0f} ({last['bytes'] / last['hours'] * 1e6 / 1e12:.0f} TB of samples); "
              f"stats {last['stats']['cpu_ms_per_chunk'] * m / 3.6e6:.1f} CPU-h; pack {last['pack']['cpu_ms_per_chunk'] * m / 3.6e6:.1f} CPU-h "
              f"(split over --address tasks); resume start-up reads {m / last['chunks']:.0f}x the commit columns")
        print(f"stats_ms_per_chunk={last['stats']['cpu_ms_per_chunk']:.3f} stats_rss_mb={last['stats']['rss_mb']:.0f} "
              f"resume_s={last['resume']['wall']:.2f} pack_ms_per_chunk={last['pack']['cpu_ms_per_chunk']:.3f} chunks={last['chunks']}")


if __name__ == "__main__":
    main()
