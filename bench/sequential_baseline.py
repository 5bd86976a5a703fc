"""The script a user would write instead of the pipeline: per file, whisperx transcribe (with its own
VAD), diarize, score each segment with DNSMOS (the pipeline's quality model), encode each segment with Mimi (moshi's own `encode`, as a user calls it; the pipeline
runs Mimi's encoder through WholeClipEncoder, in 1 s tiles on CPU: moshi's codes to float rounding), write a WebDataset shard. Same models as
the pipeline, all cores to each model in turn. Used by bench_pipeline.py for the side-by-side figure.

--plain: the script most users would write, without a diarization model: a resemblyzer d-vector per
whisperx segment, clustered (agglomerative, cosine, average linkage), Mimi per segment. Lighter than
the pipeline's work (no VAD, diarizer, word times or DNSMOS), so the harder comparison for throughput.

    python bench/sequential_baseline.py [--plain] OUT_DIR FILE...
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def plain_speakers(encoder, a16: np.ndarray, segments: list[dict], threshold: float = 0.5) -> list[str]:
    """A d-vector per segment, clustered: the diarization of a script with no diarizer."""
    from resemblyzer import preprocess_wav
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(segments) < 2:
        return ["SPEAKER_00"] * len(segments)
    embeds = np.stack([encoder.embed_utterance(preprocess_wav(a16[int(s["start"] * 16000): int(s["end"] * 16000)], 16000))
                       for s in segments])
    labels = fcluster(linkage(embeds, "average", metric="cosine"), threshold, "distance")
    return [f"SPEAKER_{k - 1:02d}" for k in labels]


def main(out_dir: str, files: list[str], plain: bool = False) -> dict:
    import av
    import torch
    import webdataset as wds
    import whisperx

    from stages.asr import DEFAULT_MODEL, resolve_model
    from stages.diarize import DiarizeConfig
    from stages.diarizer import build_offline_pipeline, diarize_waveform
    from stages.dnsmos import Dnsmos, score_spans
    from stages.tokenize import TokenizeConfig, encode_batch, load_mimi
    from stages.utterances import assign_speaker

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    t0 = time.time()
    asr = whisperx.load_model(resolve_model(DEFAULT_MODEL), "cpu", compute_type="int8", language="en", vad_method="pyannote", threads=cores)
    if plain:
        from resemblyzer import VoiceEncoder

        encoder = VoiceEncoder(device="cpu", verbose=False)
    else:
        diarizer = build_offline_pipeline(DiarizeConfig())
        dnsmos = Dnsmos(threads=cores)
    mimi, _ = load_mimi(TokenizeConfig(allow_unreleased=True), "cpu")
    load_seconds = time.time() - t0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    audio_seconds, seconds = 0.0, {"asr": 0.0, "speakers": 0.0, "dnsmos": 0.0, "mimi": 0.0}
    clock = [time.time()]

    def lap(name: str) -> None:  # wall seconds of each model, summed over files
        now = time.time()
        seconds[name] += now - clock[0]
        clock[0] = now

    t1 = time.time()
    for n, f in enumerate(files):
        # decode twice: whisperx.load_audio needs ffmpeg on PATH, so PyAV it is, at each rate.
        def load(rate: int) -> np.ndarray:
            with av.open(f) as c:
                r = av.AudioResampler(format="flt", layout="mono", rate=rate)
                return np.concatenate([fr.to_ndarray()[0] for frame in c.decode(audio=0) for fr in r.resample(frame)])

        a16, a24 = load(16000), load(24000)
        audio_seconds += len(a16) / 16000
        clock[0] = time.time()
        segments = asr.transcribe(a16, batch_size=8)["segments"]
        lap("asr")
        if plain:
            speakers = plain_speakers(encoder, a16, segments)
        else:
            turns, _ = diarize_waveform(diarizer, a16, 0.0, DiarizeConfig())
            speakers = [assign_speaker(s["start"], s["end"], turns)[0] for s in segments]
        lap("speakers")
        quality = [{}] * len(segments)
        if not plain and segments:
            quality = score_spans(dnsmos, [a16[int(s["start"] * 16000) : int(s["end"] * 16000)] for s in segments])
        lap("dnsmos")
        with wds.TarWriter(f"{out_dir}/shard-{n:06d}.tar") as sink:
            clips = [a24[int(s["start"] * 24000) : int(s["end"] * 24000)] for s in segments]
            # One segment per call: all of a long file's segments in one padded batch took 24 GB (OOM)
            codes = [encode_batch(mimi, [c], "cpu")[0] for c in clips]
            lap("mimi")
            for i, (s, c, speaker, q) in enumerate(zip(segments, codes, speakers, quality)):
                buf = io.BytesIO()
                np.save(buf, c)
                meta = {"speaker": speaker, "start": s["start"], "end": s["end"], "text": s["text"], **q}
                sink.write({"__key__": f"f{n:06d}_{i:04d}", "json": json.dumps(meta).encode(), "codes.npy": buf.getvalue()})
    process_seconds = time.time() - t1
    return {"files": len(files), "audio_seconds": audio_seconds, "load_seconds": load_seconds,
            "process_seconds": process_seconds, "wall_seconds": load_seconds + process_seconds, "model_seconds": seconds}


if __name__ == "__main__":
    plain = "--plain" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--plain"]
    print(json.dumps(main(args[0], args[1:], plain)))
