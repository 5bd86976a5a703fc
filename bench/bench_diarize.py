"""Diarization quality and speed: DER / JER (pyannote.metrics, collar 0.25 s) of each diarizer
setting on pyannote's sample (real telephone speech) and on synthetic espeak-ng conversations,
plus the channel-attribution path on a two-channel call, with seconds per minute of audio.

    python bench/bench_diarize.py            # the grid used to pick the default
    python bench/bench_diarize.py --quick    # only the default setting
    python bench/bench_diarize.py --long [--chunk-seconds 120,300,600] [--reencode-chunk 60]
    python bench/bench_diarize.py --quick-long   # the 20-min recordings at 300 s, two re-encoded copies
    python bench/bench_diarize.py --steps 0.2,0.3,0.4   # the default clustering at each segmentation step
    python bench/bench_diarize.py --long --chunk-seconds 120 --steps 0.2,0.4   # the long protocol once per step
    python bench/bench_diarize.py --voices [V1,V2,...]   # resemblyzer distances between espeak-ng voices

--long: recordings of several chunks, diarized as the pipeline does (chunk by chunk, then the
chunks' speakers linked into one labelling per source, tests/diarize_chunks.py) and scored as whole
files: DER and JER with one label mapping per file, and the speaker-count error, with chunk labels
left unlinked for comparison (every chunk's speakers counted as new ones). Rows: 20-minute
three-voice (VOICE_A, VOICE_B, VOICE_D) and two-voice conversations at every --chunk-seconds;
pyannote's sample x4 and its copies re-encoded with PyAV (AAC in M4A 32 kb/s, MP3 32 kb/s, Opus 16
kb/s), 8 kHz mu-law, with 90 s of leading silence and clipped (12 dB over full scale), at
--reencode-chunk; and a 5-minute "close" three-voice row (VOICE_C for the third voice) reported
apart. Chunk diarizations are cached on disk (--cache, keyed by audio and diarizer identity), so a
rerun that changes only the linking re-scores in seconds.

Voices (--voices; mean resemblyzer cosine distance between utterance embeddings of different
sentences, 16 lines a voice): one voice with itself 0.09-0.12; VOICE_A (en-us+m3) - VOICE_B
(en+f4) 0.41; the old third voice VOICE_C (en-gb-scotland+m1) - VOICE_A only 0.17, like en-us,
en+m1, en-gb+m2 and en+grandpa (0.17-0.19): not a distinct person for the encoder. VOICE_D (en+m8)
is 0.35 from VOICE_A and 0.47 from VOICE_B: with en+Andy (0.36/0.39) the farthest from both of 35
English variants tried (en-us+Storm 0.30/0.43, en+boris 0.34/0.39, en+m7 0.28/0.42). Inside a 120 s
chunk the diarizer's centroids of the three voices are 0.26-0.39 apart.

Measured (2 cores shared with other jobs, default config: threshold 0.46, link_threshold 0.3,
min_speaker_seconds 10, min_speaker_share 0.2; `--long`, 13 scored rows, about 10 minutes; CPU
3-9 s per minute of audio):

    recording            chunk s  chunks  DER / JER     speakers  unlinked DER
    synth3-20min         120      13      0.019/0.020   3 (3)     0.886
    synth3-20min         300       6      0.018/0.018   3 (3)     0.740
    synth3-20min         600       2      0.018/0.018   3 (3)     0.472
    synth2-20min         120      13      0.022/0.022   2 (2)     0.904
    synth2-20min         300       7      0.021/0.021   2 (2)     0.754
    synth2-20min         600       2      0.020/0.020   2 (2)     0.504
    sample-x4             60       2      0.024/0.042   2 (2)     0.526
      aac-m4a / mp3 / opus         0.025 / 0.027 / 0.025          2 (2) each
      mulaw8k / lead90 / clipped   0.029 / 0.034 / 0.071          2 (2) each
    synth3-close-5min    120       3      0.342/0.506   2 (3)     0.605   (not counted)

exact speaker count 13/13; two-voice whole-file DER mean 0.030, worst 0.071 (the clipped copy);
three-voice 0.018-0.019. The chunks are cut by the decode stage itself, tapered end included (a
20-minute recording at 120 s: ..., 70, 35, 26, 14 s); with the test helper's own 2 s-search cut
rule, untapered, they were three-voice 0.017-0.019, two-voice mean 0.028 and worst 0.068 (the
`--reencode-three` figures below are from that rule). `--long --reencode-three` adds the 20-min three-voice recording's copies
at 300 s chunks (about 8 more minutes): 3 (3) speakers on every one, DER AAC 0.024, MP3 0.109,
Opus 0.027, mu-law 0.001, 90 s leading silence 0.018, clipped 0.014 (19/19 exact; the MP3 copy's
0.109 not looked into). The close row finds 2 speakers: VOICE_A and VOICE_C are joined by the
diarizer inside each chunk (0.17 apart, as close as sentences of one voice are to each other), so
linking cannot part them; no threshold change was made for it (the diarizer's 0.46 already sits
at the edge where pyannote's two telephone voices merge).

--steps (segmentation step, default clustering; short sets: sample / sample-x4 DER and speakers,
the five synthetic sets 0.001-0.015 at 0.2-0.4; long: `--long --chunk-seconds 120`, 9 rows):
step 0.2: 0.029 2 / 0.095 3, short mean 0.024; long 9/9 exact, two-voice mean 0.029 worst 0.068, 4.1 CPU-s/min;
step 0.3: 0.084 3 / 0.101 3, mean 0.032; long 9/9, 0.029 / 0.064, 2.8 CPU-s/min;
step 0.4: 0.289 5 / 0.289 5, mean 0.089; long 9/9, 0.037 / 0.064, 2.2 CPU-s/min;
step 0.5: 0.263 4 / 0.346 5 (synth 0.127 3), mean 0.129; long 9/9, 0.059 / 0.090, 1.8 CPU-s/min.
Linking (min_speaker_seconds) hides the extra clusters on the long rows, not on the short sets; step
0.25 is no better (0.161 3 / 0.240 4), nor is a threshold of 0.42-0.50 at 0.3 or 0.4 (the sample
keeps 3+ speakers). Diarized as the pipeline does (one 120 s chunk per short set, linked, small
speakers folded), 0.3 gives 2 speakers everywhere (sample 0.032, sample x4 0.018 against 0.029 and
0.012) at 35 % less CPU, but only the source's speaker map folds the sample's third cluster: the
utterances are formed on chunk labels, and are cut at its turns. 0.2 stays. Non-overlapping 1.6 s partials (PARTIAL_STEP 160) at 0.2: sample
0.101 3, about 10 % less CPU: kept at 80.
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
from conftest_audio import (CLOSE_VOICES, SCRIPT, SCRIPT_THREE, VOICE_A, VOICE_B, VOICE_C, VOICE_D, conversation,
                            energy_regions)
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


def long_script(voices: int, minutes: float, seed: int) -> list[tuple[int, str]]:
    """A conversation of about `minutes` from the test scripts' sentences (one-word backchannels
    left out): each line a random sentence, the next speaker another voice at random, or the same
    one again 30 % of the time (a turn of several sentences)."""
    from conftest_audio import RATE, SCRIPT_BACKCHANNEL, speak

    pool = sorted({t for _, t in SCRIPT + SCRIPT_THREE + SCRIPT_BACKCHANNEL if " " in t})
    rng = np.random.default_rng(seed)
    out, spk, seconds = [], 0, 0.0
    while seconds < minutes * 60:
        text = pool[int(rng.integers(len(pool)))]
        out.append((spk, text))
        seconds += len(speak(text, (VOICE_A, VOICE_B, VOICE_D)[spk])) / RATE + 0.4  # about: voices differ in pace
        if rng.random() > 0.3:
            spk = int((spk + rng.integers(1, voices)) % voices)
    return out


def pyannote_sample():
    import pyannote.audio

    sample = Path(pyannote.audio.__file__).parent / "sample"
    wav, _ = sf.read(sample / "sample.wav", dtype="float32")
    ref = [(float(r.split()[3]), float(r.split()[3]) + float(r.split()[4]), r.split()[7])
           for r in (sample / "sample.rttm").read_text().splitlines() if r.strip()]
    return wav, ref


def av_roundtrip(wav: np.ndarray, container: str, codec: str, rate: int, bit_rate: int) -> np.ndarray:
    """Encode 16 kHz mono with PyAV (its bundled FFmpeg) into `container` and decode it back to 16 kHz."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.bit_rate, stream.layout = bit_rate, "mono"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav, dtype=np.float32)[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = RATE16, 0
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    buf.seek(0)
    with av.open(buf) as src:
        back = av.AudioResampler(format="flt", layout="mono", rate=RATE16)
        parts = [f.to_ndarray().reshape(-1) for fr in src.decode(audio=0) for f in back.resample(fr)]
        parts += [f.to_ndarray().reshape(-1) for f in back.resample(None)]
    return np.concatenate(parts).astype(np.float32)


RATE16 = 16000


def reencoded(wav: np.ndarray, ref):
    """name suffix -> (copy of `wav`, its reference): lossy codecs, a telephone line, leading
    silence, clipping. Codec delay is measured by cross-correlation and taken out."""
    from scipy.signal import correlate

    def aligned(x):
        n = min(len(x), len(wav), 5 * RATE16)
        lag = int(np.argmax(correlate(x[: n + 4000], wav[:n], mode="valid", method="fft")))  # encoder delay >= 0
        x = x[lag:][: len(wav)]
        return np.pad(x, (0, len(wav) - len(x)))

    out = {"aac-m4a": (aligned(av_roundtrip(wav, "ipod", "aac", 16000, 32000)), ref),  # .m4a
           "mp3": (aligned(av_roundtrip(wav, "mp3", "libmp3lame", 16000, 32000)), ref),
           "opus": (aligned(av_roundtrip(wav, "ogg", "libopus", 16000, 16000)), ref),
           "mulaw8k": (mulaw_8k(wav), ref)}
    lead = 90.0  # leading silence (a faint noise floor), the reference shifted by it
    silence = (10 ** (-55 / 20) * np.random.default_rng(5).standard_normal(int(lead * RATE16))).astype(np.float32)
    out["lead90"] = (np.concatenate([silence, wav]), [(s + lead, e + lead, k) for s, e, k in ref])
    out["clipped"] = (np.clip(wav * 10 ** (12 / 20) / np.abs(wav).max(), -1, 1).astype(np.float32), ref)  # 12 dB over full scale
    return out


def long_rows(chunk_sizes: list[float], reencode_chunk: float, quick: bool, reencode_three: bool = False):
    """(name, group, mono 16 kHz, reference turns, chunk sizes): groups `two` and `three` count
    toward the targets; `close` (a third voice as near VOICE_A as one voice to itself) is reported
    on its own."""
    wav, ref = pyannote_sample()
    x4 = np.concatenate([wav] * 4)
    ref4 = [(s + 30.0 * i, e + 30.0 * i, k) for i in range(4) for s, e, k in ref]
    minutes = 20
    three = conversation(script=long_script(3, minutes, 43), voices=(VOICE_A, VOICE_B, VOICE_D), gap=0.4, seed=43)
    two = conversation(script=long_script(2, minutes, 42), voices=(VOICE_A, VOICE_B), gap=0.4, seed=42)
    rows = [(f"synth3-{minutes}min", "three", three.mono, three.turns, chunk_sizes),
            (f"synth2-{minutes}min", "two", two.mono, two.turns, chunk_sizes),
            ("sample-x4", "two", x4, ref4, [reencode_chunk])]
    copies = reencoded(x4, ref4)
    for suffix in (["aac-m4a", "mulaw8k"] if quick else list(copies)):
        rows.append((f"sample-x4-{suffix}", "two", *copies[suffix], [reencode_chunk]))
    if reencode_three:  # the 20-min three-voice recording re-encoded, at 300 s chunks
        for suffix, (x, r) in reencoded(three.mono, three.turns).items():
            rows.append((f"synth3-{minutes}min-{suffix}", "three", x, r, [300.0]))
    if not quick:
        close = conversation(script=long_script(3, 5, 44), voices=(VOICE_A, VOICE_B, VOICE_C), gap=0.4, seed=44)
        rows.append(("synth3-close-5min", "close", close.mono, close.turns, [120.0]))
    return rows


class CachedStage:
    """The diarize stage with its chunk outputs kept on disk, keyed by the chunk's audio and the
    diarizer's identity (not the linking settings): a rerun that only changes the linking, or
    re-scores, costs nothing. `--no-cache` to recompute."""

    def __init__(self, stage, directory: Path | None):
        self.stage, self.dir = stage, directory

    def process(self, chunk):
        import hashlib
        import json
        import pickle

        from stages.diarizer import pipeline_identity

        key = None
        if self.dir is not None:
            h = hashlib.sha1(np.ascontiguousarray(chunk.audio16k).tobytes())
            h.update(json.dumps([chunk.offset, pipeline_identity(self.stage.config)], sort_keys=True, default=str).encode())
            key = self.dir / f"{h.hexdigest()[:20]}.pkl"
            if key.exists():
                d = pickle.loads(key.read_bytes())
                chunk.turns, chunk.speaker_embeddings, chunk.speaker_mode, chunk.diarizer = d
                return chunk
        self.stage.process(chunk)
        if key is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            key.write_bytes(pickle.dumps((chunk.turns, chunk.speaker_embeddings, chunk.speaker_mode, chunk.diarizer)))
        return chunk


def main_long(chunk_sizes: list[float], reencode_chunk: float, quick: bool, cache: Path | None, reencode_three: bool = False,
              step: float | None = None):
    """Whole-file scores of chunked diarization, linked and unlinked, per chunk size (`step`: the
    segmentation step instead of the default; the cache key holds it)."""
    cfg = DiarizeConfig(cpus=min(2, os.cpu_count() or 1))
    stage = DiarizeStage(cfg if step is None else replace(cfg, segmentation_step=step))
    stage.setup()
    cfg = stage.config
    cached = CachedStage(stage, cache)
    print(f"whole-file DER / JER (collar 0.25 s), speakers found vs true; segmentation step {cfg.segmentation_step}, "
          f"diarizer threshold {cfg.threshold}, "
          f"link threshold {cfg.link_threshold}, min_speaker_seconds {cfg.min_speaker_seconds}, "
          f"min_speaker_share {cfg.min_speaker_share}")
    print(f"{'recording':24s} {'group':5s} {'min':>5s} {'chunk s':>7s} {'chunks':>6s} {'linked DER/JER':>15s} {'spk':>7s} "
          f"{'unlinked DER':>12s} {'spk':>4s} {'cpu s/min':>9s}")
    results, cpu_total, minutes_total = [], 0.0, 0.0
    for name, group, wav, ref, sizes in long_rows(chunk_sizes, reencode_chunk, quick, reencode_three):
        true_n = len({k for _, _, k in ref})
        for size in sizes:
            c = time.process_time()
            chunks = diarize_chunks(cached, wav, size, rid=name)
            cpu = (time.process_time() - c) / (len(wav) / 16000 / 60)
            cpu_total, minutes_total = cpu_total + cpu * len(wav) / 16000 / 60, minutes_total + len(wav) / 16000 / 60
            turns, speakers = linked_turns(chunks, cfg)
            der, jer, n = scores(ref, [(t.start, t.end, t.speaker) for t in turns])
            unlinked = [(t.start, t.end, f"{ch.index}:{t.speaker}") for ch in chunks for t in ch.turns]
            uder, _, un = scores(ref, unlinked)
            results.append((name, group, size, der, n, true_n))
            print(f"{name:24s} {group:5s} {len(wav) / 16000 / 60:5.1f} {size:7.0f} {len(chunks):6d} {der:7.3f}/{jer:.3f} "
                  f"{n:3d} ({true_n}) {uder:12.3f} {un:4d} {cpu:9.2f}", flush=True)
    scored = [r for r in results if r[1] != "close"]
    exact = sum(r[4] == r[5] for r in scored)
    two = [r[3] for r in scored if r[1] == "two"]
    three = [f"{r[3]:.3f} ({r[4]} spk, {r[2]:.0f} s)" for r in scored if r[1] == "three"]
    close = [f"{r[3]:.3f} ({r[4]} spk, {r[2]:.0f} s)" for r in results if r[1] == "close"]
    print(f"\nexact speaker count {exact}/{len(scored)} ({exact / max(len(scored), 1):.0%}); two-voice whole-file DER mean "
          f"{np.mean(two):.3f}, worst {max(two):.3f}; three-voice DER {', '.join(three)}"
          + (f"; close third voice (not counted): {', '.join(close)}" if close else "")
          + f"; cpu {cpu_total / minutes_total:.2f} s per minute of audio (cached chunks count 0)")


def voice_distances(voices: list[str]):
    """Mean cosine distance between resemblyzer utterance embeddings: a voice with itself on
    different sentences (diagonal), two voices on different sentences (off the diagonal)."""
    from conftest_audio import speak
    from resemblyzer import VoiceEncoder, preprocess_wav

    enc = VoiceEncoder(device="cpu", verbose=False)
    lines = [t for _, t in SCRIPT + SCRIPT_THREE]
    E = {v: np.stack([enc.embed_utterance(preprocess_wav(speak(t, v), 16000)) for t in lines]) for v in voices}
    h = len(lines) // 2

    def dist(a, b):
        if a == b:
            return float((1 - E[a] @ E[a].T)[np.triu_indices(len(lines), 1)].mean())
        return float(((1 - E[a][:h] @ E[b][h:].T).mean() + (1 - E[a][h:] @ E[b][:h].T).mean()) / 2)

    print("resemblyzer cosine distance, mean over sentence pairs (diagonal: one voice, different sentences)")
    print(" " * 24 + " ".join(f"{i:>5d}" for i in range(len(voices))))
    for i, a in enumerate(voices):
        print(f"{i:2d} {a:20s} " + " ".join(f"{dist(a, b):5.2f}" for b in voices))


VOICES = ("en-us+m3", "en+f4", "en-gb-scotland+m1", "en+m8", "en-us", "en-us+f2", "en+m1", "en+m7", "en-gb+m2", "en+klatt",
          "en+f2", "en+f3", "en-us+Storm", "en+Andy", "en+boris")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--long", action="store_true", help="chunked long recordings scored as whole files")
    ap.add_argument("--quick-long", action="store_true",
                    help="--long on fewer rows: the 20-min recordings at 300 s chunks, two re-encoded copies")
    ap.add_argument("--chunk-seconds", default="120,300,600", help="with --long: chunk sizes for the 20-min recordings")
    ap.add_argument("--reencode-chunk", type=float, default=60.0, help="with --long: chunk size for pyannote's sample x4 and its copies")
    ap.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "csm-bench-diarize"),
                    help="with --long: where chunk diarizations are kept between runs")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--reencode-three", action="store_true",
                    help="with --long: also the 20-min three-voice recording's six re-encoded copies at 300 s (2 h of audio)")
    ap.add_argument("--steps", help="segmentation steps, e.g. 0.2,0.3,0.4: the default clustering at each "
                    "(short sets), or with --long / --quick-long the long protocol once per step")
    ap.add_argument("--voices", nargs="?", const=",".join(VOICES), help="resemblyzer distances between espeak-ng voices")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.voices:
        return voice_distances(args.voices.split(","))
    steps = [float(x) for x in args.steps.split(",")] if args.steps else [None]
    if args.long or args.quick_long:
        sizes = [300.0] if args.quick_long else [float(x) for x in args.chunk_seconds.split(",")]
        for step in steps:
            main_long(sizes, args.reencode_chunk, args.quick_long, None if args.no_cache else Path(args.cache),
                      args.reencode_three, step)
        return
    data = datasets()
    base = DiarizeConfig()
    thresholds = [base.threshold] if args.quick else [0.35, 0.4, 0.44, 0.46, 0.48, 0.5, 0.52, 0.6]
    cluster_sizes = [base.min_cluster_size] if args.quick else [3, 8, 20]
    # (segmentation step, exclude overlap, segmentation threshold): each needs its own segmentation and
    # embedding pass; the clustering settings are then redone on pyannote's cached embeddings
    front_ends = [(base.segmentation_step, base.embedding_exclude_overlap, base.segmentation_threshold)]
    if not args.quick:
        front_ends = [(0.2, False, 0.5), (0.1, False, 0.5), (0.1, True, 0.5), (0.1, False, 0.4), (0.2, True, 0.5)]
    if args.steps:  # the default clustering and front end, at each segmentation step
        thresholds, cluster_sizes = [base.threshold], [base.min_cluster_size]
        front_ends = [(s, base.embedding_exclude_overlap, base.segmentation_threshold) for s in steps]

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
