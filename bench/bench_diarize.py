"""Diarization quality and speed: DER / JER (pyannote.metrics, collar 0.25 s) of each diarizer
setting on pyannote's sample (real telephone speech) and on synthetic espeak-ng conversations,
plus the channel-attribution path on a two-channel call, with seconds per minute of audio.

    python bench/bench_diarize.py            # the grid used to pick the default
    python bench/bench_diarize.py --quick    # only the default setting
    python bench/bench_diarize.py --long [--chunk-seconds 30,60,120]

--long: recordings of several chunks, diarized as the pipeline does (chunk by chunk, then the
chunks' speakers linked into one labelling per source, tests/diarize_chunks.py) and scored as whole
files: DER and JER with one label mapping per file, and the speaker-count error, with chunk labels
left unlinked for comparison (every chunk's speakers counted as new ones).
Measured (2 cores, default config, --chunk-seconds 30,90; 12 rows): exact speaker count on 10 of
12; two-voice whole-file DER 0.003-0.043 (mean 0.018), against 0.48-0.89 unlinked; pyannote's
sample x8 0.033 / 0.014 (30 / 90 s chunks), its 8 kHz mu-law copy 0.037 / 0.017, with 60 s of
leading silence 0.043 / 0.015. The three-voice conversation finds 2 speakers (DER 0.39 at both
sizes): VOICE_A and VOICE_C are as close for the resemblyzer encoder as two lines of one voice, so
the diarizer joins them inside a chunk already; linking cannot part them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")
warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np
import soundfile as sf
from conftest_audio import CLOSE_VOICES, SCRIPT, SCRIPT_THREE, VOICE_A, VOICE_B, VOICE_C, conversation, energy_regions
from diarize_chunks import diarize_chunks, linked_turns

from stages.diarize import DiarizeConfig, DiarizeStage
from stages.diarizer import build_offline_pipeline
from stages.records import Chunk, Recording, Region


def annotation(turns):
    from pyannote.core import Annotation, Segment

    a = Annotation()
    for i, t in enumerate(turns):
        a[Segment(t[0], t[1]), i] = str(t[2])
    return a


def scores(ref_turns, hyp_turns):
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    ref, hyp = annotation(ref_turns), annotation(hyp_turns)
    return DiarizationErrorRate(collar=0.25)(ref, hyp), JaccardErrorRate(collar=0.25)(ref, hyp), len(hyp.labels())


def datasets():
    """name -> (mono 16 kHz, reference turns (start, end, speaker))."""
    import pyannote.audio

    sample = Path(pyannote.audio.__file__).parent / "sample"
    wav, _ = sf.read(sample / "sample.wav", dtype="float32")
    ref = [(float(r.split()[3]), float(r.split()[3]) + float(r.split()[4]), r.split()[7])
           for r in (sample / "sample.rttm").read_text().splitlines() if r.strip()]
    out = {"sample": (wav, ref)}
    c = conversation()
    out["synth"] = (c.mono, c.turns)
    c = conversation(gap=0.15, overlap_last=0.0, seed=1)
    out["synth-fast"] = (c.mono, c.turns)
    c = conversation(overlap_last=0.4, seed=2)
    out["synth-overlap"] = (c.mono, c.turns)
    c = conversation(voices=CLOSE_VOICES, gap=0.3, seed=3)
    out["synth-close"] = (c.mono, c.turns)
    # longer audio: more embeddings, more chances of a spurious cluster
    out["sample-x4"] = (np.concatenate([wav] * 4), [(s + 30.0 * i, e + 30.0 * i, k) for i in range(4) for s, e, k in ref])
    c = conversation(script=SCRIPT * 4, gap=0.4, seed=9)
    out["synth-2min"] = (c.mono, c.turns)
    return out


def channel_call():
    """DER of channel attribution through the stage (auto mode) on a two-channel call."""
    c = conversation(gap=0.2, overlap_last=0.0, seed=4)
    chunk = Chunk(Recording("call", "call.wav", c.duration, 16000, 2), 0, 0.0, True,
                  audio16k=c.channels, audio24k=np.zeros(1, np.float32))
    chunk.channel_speech = [[Region(s, e) for s, e in energy_regions(ch)] for ch in c.channels]
    chunk.speech = [Region(s, e) for s, e in energy_regions(c.mono)]
    stage = DiarizeStage(DiarizeConfig())
    t = time.perf_counter()
    stage.process(chunk)  # channel mode needs no model: setup() not required
    el = time.perf_counter() - t
    return chunk.speaker_mode, scores(c.turns, [(x.start, x.end, x.speaker) for x in chunk.turns]), el, c.duration


def run(pipeline, wav, file=None):
    """Diarize; `file` (a dict reused across calls) lets pyannote's training-mode cache keep the
    segmentation and embeddings, so only the clustering is redone when only its threshold moves."""
    import torch

    file = file if file is not None else {}
    file.update(waveform=torch.from_numpy(wav)[None], sample_rate=16000, uri="bench")
    out = pipeline(file)
    return [(float(s.start), float(s.end), k) for s, _, k in out.speaker_diarization.itertracks(yield_label=True)]


def mulaw_8k(wav: np.ndarray) -> np.ndarray:
    """A telephone copy: 8 kHz, 8-bit mu-law, back to 16 kHz."""
    from scipy.signal import resample_poly

    x = np.clip(resample_poly(wav, 1, 2), -1, 1)
    q = np.round(np.sign(x) * np.log1p(255 * np.abs(x)) / np.log1p(255) * 127) / 127
    return resample_poly(np.sign(q) * np.expm1(np.abs(q) * np.log1p(255)) / 255, 2, 1).astype(np.float32)


def long_recordings():
    """name -> (mono 16 kHz, reference turns): 2.5 to 4 minutes each, two and three voices."""
    import pyannote.audio

    sample = Path(pyannote.audio.__file__).parent / "sample"
    wav, _ = sf.read(sample / "sample.wav", dtype="float32")
    ref = [(float(r.split()[3]), float(r.split()[3]) + float(r.split()[4]), r.split()[7])
           for r in (sample / "sample.rttm").read_text().splitlines() if r.strip()]
    x8 = np.concatenate([wav] * 8)
    ref8 = [(s + 30.0 * i, e + 30.0 * i, k) for i in range(8) for s, e, k in ref]
    out = {"sample-x8": (x8, ref8), "sample-x8-mulaw8k": (mulaw_8k(x8), ref8)}
    lead = 60.0  # leading silence (a faint noise floor), the reference shifted by it
    silence = (10 ** (-55 / 20) * np.random.default_rng(5).standard_normal(int(lead * 16000))).astype(np.float32)
    out["sample-x8-lead60"] = (np.concatenate([silence, x8]), [(s + lead, e + lead, k) for s, e, k in ref8])
    for name, conv in [("synth2-4min", conversation(script=SCRIPT * 8, gap=0.4, seed=31)),
                       ("synth2-close-3min", conversation(script=SCRIPT * 6, voices=CLOSE_VOICES, gap=0.3, seed=32)),
                       ("synth3-3min", conversation(script=SCRIPT_THREE * 6, voices=(VOICE_A, VOICE_B, VOICE_C), gap=0.4, seed=33))]:
        out[name] = (conv.mono, conv.turns)
    return out


def main_long(chunk_sizes: list[float]):
    """Whole-file scores of chunked diarization, linked and unlinked, per chunk size."""
    stage = DiarizeStage(DiarizeConfig(cpus=min(2, os.cpu_count() or 1)))
    stage.setup()
    cfg = stage.config
    data = long_recordings()
    print(f"whole-file DER / JER (collar 0.25 s), speakers found vs true; link threshold {cfg.link_threshold}, "
          f"min_speaker_seconds {cfg.min_speaker_seconds}, min_speaker_share {cfg.min_speaker_share}")
    print(f"{'recording':20s} {'min':>5s} {'chunk s':>7s} {'chunks':>6s} {'linked DER/JER':>15s} {'spk':>7s} "
          f"{'unlinked DER':>12s} {'spk':>4s} {'cpu s/min':>9s}")
    rows = []
    for name, (wav, ref) in data.items():
        true_n = len({k for _, _, k in ref})
        for size in chunk_sizes:
            c = time.process_time()
            chunks = diarize_chunks(stage, wav, size, rid=name)
            cpu = (time.process_time() - c) / (len(wav) / 16000 / 60)
            turns, speakers = linked_turns(chunks, cfg)
            der, jer, n = scores(ref, [(t.start, t.end, t.speaker) for t in turns])
            unlinked = [(t.start, t.end, f"{ch.index}:{t.speaker}") for ch in chunks for t in ch.turns]
            uder, _, un = scores(ref, unlinked)
            rows.append((name, size, der, n == true_n))
            print(f"{name:20s} {len(wav) / 16000 / 60:5.1f} {size:7.0f} {len(chunks):6d} {der:7.3f}/{jer:.3f} "
                  f"{n:3d} ({true_n}) {uder:12.3f} {un:4d} {cpu:9.2f}", flush=True)
    exact = sum(r[3] for r in rows)
    two = [r[2] for r in rows if not r[0].startswith("synth3")]
    print(f"\nexact speaker count {exact}/{len(rows)}; two-voice whole-file DER mean {np.mean(two):.3f}, worst {max(two):.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--long", action="store_true", help="chunked long recordings scored as whole files")
    ap.add_argument("--chunk-seconds", default="30,60,120", help="with --long: chunk sizes to compare")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.long:
        return main_long([float(x) for x in args.chunk_seconds.split(",")])
    data = datasets()
    base = DiarizeConfig()
    thresholds = [base.threshold] if args.quick else [0.35, 0.4, 0.44, 0.46, 0.48, 0.5, 0.52, 0.6]
    cluster_sizes = [base.min_cluster_size] if args.quick else [3, 8, 20]
    # (segmentation step, exclude overlap, segmentation threshold): each needs its own segmentation and
    # embedding pass; the clustering settings are then redone on pyannote's cached embeddings
    front_ends = [(base.segmentation_step, base.embedding_exclude_overlap, base.segmentation_threshold)]
    if not args.quick:
        front_ends = [(0.2, False, 0.5), (0.1, False, 0.5), (0.1, True, 0.5), (0.1, False, 0.4), (0.2, True, 0.5)]

    mode, (der, jer, n), el, dur = channel_call()
    print(f"channel attribution (auto -> {mode}) on a two-channel call: DER {der:.3f} JER {jer:.3f} "
          f"speakers {n}, {60 * el / dur:.3f} s/min\n")
    names = list(data)
    print("DER / JER (collar 0.25 s) and speakers found; offline diarizer, centroid linkage")
    print(f"{'setting':40s} " + " ".join(f"{d:>16s}" for d in names) + "  mean DER  worst")
    speed, summary = [], []
    for step, excl, seg_thr in front_ends:
        cfg = replace(base, segmentation_step=step, embedding_exclude_overlap=excl, segmentation_threshold=seg_thr)
        pipeline = build_offline_pipeline(cfg)
        pipeline.training = True  # cache segmentation + embeddings in each file dict
        files = {name: {} for name in data}
        front = f"seg>{seg_thr} step={step}{' excl-ovl' if excl else ''}"
        for mcs in cluster_sizes:
            for thr in thresholds:
                pipeline.instantiate({"clustering": {"threshold": thr, "min_cluster_size": mcs}})
                cells, ders = [], []
                for dname, (wav, ref) in data.items():
                    first = not files[dname]
                    t, c = time.perf_counter(), time.process_time()
                    hyp = run(pipeline, wav, files[dname])
                    if first:
                        minutes = len(wav) / 16000 / 60
                        speed.append((front, dname, (time.perf_counter() - t) / minutes, (time.process_time() - c) / minutes))
                    der, jer, n = scores(ref, hyp)
                    ders.append(der)
                    cells.append(f"{der:.3f}/{jer:.3f} {n:d}")
                name = f"{front} mcs={mcs} thr={thr}"
                print(f"{name:40s} " + " ".join(f"{x:>16s}" for x in cells) + f"  {np.mean(ders):8.3f}  {max(ders):.3f}", flush=True)
                summary.append((max(ders), float(np.mean(ders)), name))
    print("\nspeed (first pass: segmentation + embeddings + clustering), seconds per minute of audio;")
    print("wall is noisy on a shared machine, cpu is process CPU seconds over all threads")
    for front, dname, wall, cpu in speed:
        print(f"{front:28s} {dname:14s} wall {wall:6.2f}  cpu {cpu:6.2f}")
    print("\nbest by worst-case DER over the data sets")
    for worst, mean, name in sorted(summary)[:8]:
        print(f"{name:40s} worst {worst:.3f} mean {mean:.3f}")


if __name__ == "__main__":
    main()
