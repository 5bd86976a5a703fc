"""The script a user would write instead of the pipeline: per file, whisperx transcribe (with its own
VAD), diarize, encode each segment with Mimi (moshi's own `encode`, as a user calls it; the pipeline
runs Mimi's encoder through WholeClipEncoder, same codes), write a WebDataset shard. Same models as
the pipeline, all cores to each model in turn. Used by bench_pipeline.py for the side-by-side figure.

    python bench/sequential_baseline.py OUT_DIR FILE...
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


def main(out_dir: str, files: list[str]) -> dict:
    import av
    import torch
    import webdataset as wds
    import whisperx

    from stages.asr import DEFAULT_MODEL, resolve_model
    from stages.diarize import DiarizeConfig
    from stages.diarizer import build_offline_pipeline, diarize_waveform
    from stages.tokenize import TokenizeConfig, encode_batch, load_mimi
    from stages.utterances import assign_speaker

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    t0 = time.time()
    asr = whisperx.load_model(resolve_model(DEFAULT_MODEL), "cpu", compute_type="int8", language="en", vad_method="pyannote", threads=cores)
    diarizer = build_offline_pipeline(DiarizeConfig())
    mimi, _ = load_mimi(TokenizeConfig(allow_unreleased=True), "cpu")
    load_seconds = time.time() - t0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    audio_seconds = 0.0
    t1 = time.time()
    for n, f in enumerate(files):
        # decode twice: whisperx.load_audio needs ffmpeg on PATH, so PyAV it is, at each rate.
        def load(rate: int) -> np.ndarray:
            with av.open(f) as c:
                r = av.AudioResampler(format="flt", layout="mono", rate=rate)
                return np.concatenate([fr.to_ndarray()[0] for frame in c.decode(audio=0) for fr in r.resample(frame)])

        a16, a24 = load(16000), load(24000)
        audio_seconds += len(a16) / 16000
        segments = asr.transcribe(a16, batch_size=8)["segments"]
        turns, _ = diarize_waveform(diarizer, a16, 0.0, DiarizeConfig())
        with wds.TarWriter(f"{out_dir}/shard-{n:06d}.tar") as sink:
            clips = [a24[int(s["start"] * 24000) : int(s["end"] * 24000)] for s in segments]
            codes = encode_batch(mimi, clips, "cpu") if clips else []
            for i, (s, c) in enumerate(zip(segments, codes)):
                speaker, _ = assign_speaker(s["start"], s["end"], turns)
                buf = io.BytesIO()
                np.save(buf, c)
                meta = {"speaker": speaker, "start": s["start"], "end": s["end"], "text": s["text"]}
                sink.write({"__key__": f"f{n:06d}_{i:04d}", "json": json.dumps(meta).encode(), "codes.npy": buf.getvalue()})
    process_seconds = time.time() - t1
    return {"files": len(files), "audio_seconds": audio_seconds, "load_seconds": load_seconds,
            "process_seconds": process_seconds, "wall_seconds": load_seconds + process_seconds}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
