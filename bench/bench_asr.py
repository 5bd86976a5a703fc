"""Word error rate of the corpus against a plain whisperx run, same model, same normalizer.

    python bench/bench_asr.py [--before REV] [--sets sample,two,three,backchannel,close]

For pyannote's sample conversation and synthetic conversations with exact references (espeak-ng
voices: two voices, three voices, one-word backchannels, a close-sounding pair, 2.5 minutes of three
voices that needs several Whisper windows), it prints:
- `pipeline`: WER of the kept transcripts (utterances in kept windows, after every filter), with
  the chain's own VAD, diarization, ASR, utterances, filters and windows, in this process;
- `whisperx`: WER of `whisperx.load_model(<same model>, "cpu", compute_type="int8",
  language="en").transcribe(audio, batch_size=8)` on the whole file, as a user would run it;
- `--before REV`: the same pipeline measurement for an earlier commit (checked out in a temporary
  git worktree and run in a subprocess);
- ASR CPU seconds of each (one thread), the share of kept utterances whose words are timed, in
  order and inside the utterance, and, on the synthetic sets, the share of kept words given to the
  right speaker (best one-to-one label mapping, by the reference turn at the word's middle).
Scored with Whisper's English normalizer (`stages.asr.word_errors`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ROOT, table  # noqa: E402

if os.environ.get("CSM_BENCH_ROOT"):  # --before: run the pipeline of another checkout
    sys.path.insert(0, os.environ["CSM_BENCH_ROOT"])

CACHE = Path(tempfile.gettempdir()) / "csm-bench" / "asr"
SETS = ("sample", "two", "three", "backchannel", "close", "long")


def make_sets(names: list[str]) -> dict[str, tuple[Path, str, list]]:
    """name -> (16 kHz wav, reference text, reference turns [(start, end, speaker)])."""
    import numpy as np
    import soundfile as sf

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest_audio import (CLOSE_VOICES, SCRIPT, SCRIPT_BACKCHANNEL, SCRIPT_THREE, VOICE_A, VOICE_B, VOICE_C,
                                conversation)

    CACHE.mkdir(parents=True, exist_ok=True)
    out = {}
    if "sample" in names:
        import pyannote.audio

        d = Path(pyannote.audio.__file__).parent / "sample"
        rows = [line.split(maxsplit=5) for line in (d / "sample.stm").read_text().splitlines()]
        rows = [r for r in rows if len(r) == 6]
        out["sample"] = (d / "sample.wav", " ".join(r[5] for r in rows), [(float(r[3]), float(r[4]), r[2]) for r in rows])
    specs = {
        "two": (SCRIPT + SCRIPT[:4], (VOICE_A, VOICE_B), 0.6),
        "three": (SCRIPT_THREE, (VOICE_A, VOICE_B, VOICE_C), 0.5),
        "backchannel": (SCRIPT_BACKCHANNEL, (VOICE_A, VOICE_B), 0.5),
        "close": (SCRIPT, CLOSE_VOICES, 0.35),
        # about 2.5 minutes, three voices: several Whisper windows, cut at pauses
        "long": ([(k % 3, t) for k, (_, t) in enumerate(SCRIPT + SCRIPT_THREE + SCRIPT_BACKCHANNEL[::2] + SCRIPT)],
                 (VOICE_A, VOICE_B, VOICE_C), 0.8),
    }
    for name in names:
        if name not in specs:
            continue
        script, voices, gap = specs[name]
        conv = conversation(script, voices, gap=gap, seed=len(name))
        path = CACHE / f"{name}.wav"
        sf.write(path, np.clip(conv.mono, -1, 1), 16000)
        out[name] = (path, " ".join(t for _, t in script), [(s, e, str(k)) for s, e, k in conv.turns])
    return out


def run_pipeline(paths: list[str]) -> list[dict]:
    """The chain up to the window filters, in this process, one thread: kept text, ASR CPU, words."""
    import torch

    torch.set_num_threads(1)
    from pipeline.config import PipelineConfig
    from stages.chain import build_stages
    from stages.decode import decode_chunks

    config = PipelineConfig()
    stages = [s for s in build_stages(config) if s.name not in ("tokenize", "write")]
    results = []
    for path in paths:
        batch = list(decode_chunks(path, config.decode))
        for stage in stages:
            batch = stage.process_batch(batch)
        utts = [u for c in batch for w in c.windows for u in w.utterances]
        timed = [u for u in utts if u.words and all(u.start <= w.start <= w.end <= u.end for w in u.words)
                 and all(a.start <= b.start for a, b in zip(u.words, u.words[1:]))]
        results.append({
            "text": " ".join(u.text for u in utts),
            "asr_cpu": sum(c.cpu_times.get("asr", 0.0) for c in batch),
            "utterances": len(utts),
            "timed": len(timed),
            "words": [((w.start + w.end) / 2, u.speaker) for u in utts for w in u.words],
            "errors": [e.message for c in batch for e in c.errors],
        })
    return results


def run_before(rev: str, paths: list[str]) -> list[dict]:
    """`run_pipeline` on the code of an earlier commit, in a subprocess."""
    tree = Path(tempfile.mkdtemp(prefix="csm-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
    try:
        env = {**os.environ, "CSM_BENCH_ROOT": str(tree)}
        out = subprocess.run([sys.executable, __file__, "--dump", *paths], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def run_whisperx(paths: list[str]) -> list[dict]:
    import resource

    import soundfile as sf
    import torch
    import whisperx

    from stages.asr import DEFAULT_MODEL, resolve_model

    torch.set_num_threads(1)
    model = whisperx.load_model(resolve_model(DEFAULT_MODEL), "cpu", compute_type="int8", language="en", threads=1)
    out = []
    for path in paths:
        audio, _ = sf.read(path, dtype="float32")
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        result = model.transcribe(audio, batch_size=8)
        after = resource.getrusage(resource.RUSAGE_SELF)
        out.append({"text": " ".join(s["text"] for s in result["segments"]),
                    "asr_cpu": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime})
    return out


def speaker_accuracy(words: list, turns: list) -> float | None:
    """Share of words whose speaker matches the reference turn at the word's middle, under the best
    one-to-one mapping of labels (None: no word falls inside a single reference turn)."""
    from itertools import permutations

    pairs = []
    for mid, spk in words:
        ref = {k for s, e, k in turns if s <= mid < e}
        if len(ref) == 1:
            pairs.append((spk, ref.pop()))
    if not pairs:
        return None
    ours, refs = sorted({p for p, _ in pairs}), sorted({r for _, r in pairs})
    best = 0
    for perm in permutations(refs, min(len(ours), len(refs))):
        mapping = dict(zip(ours, perm))
        best = max(best, sum(mapping.get(p) == r for p, r in pairs))
    return best / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--before", help="also run the pipeline of this git revision")
    ap.add_argument("--dump", nargs="*", help=argparse.SUPPRESS)  # internal: --before's subprocess
    args = ap.parse_args()
    if args.dump is not None:
        print(json.dumps(run_pipeline(args.dump)))
        return
    from stages.asr import normalize_text, word_errors

    sets = make_sets(args.sets.split(","))
    paths = [str(p) for p, _, _ in sets.values()]
    columns = {"pipeline": run_pipeline(paths), "whisperx": run_whisperx(paths)}
    if args.before:
        columns[f"before ({args.before})"] = run_before(args.before, paths)
    rows, totals = [], {k: [0, 0, 0.0] for k in columns}  # errors, reference words, CPU
    for i, (name, (path, ref, turns)) in enumerate(sets.items()):
        n = len(normalize_text(ref))
        row = [name]
        for k, res in columns.items():
            e = word_errors(ref, res[i]["text"])
            totals[k][0] += e
            totals[k][1] += n
            totals[k][2] += res[i]["asr_cpu"]
            row += [f"{e / n:.3f}", f"{res[i]['asr_cpu']:.1f}"]
        ours = columns["pipeline"][i]
        acc = speaker_accuracy(ours["words"], turns) if name != "sample" else None
        row += [f"{ours['timed']}/{ours['utterances']}", "-" if acc is None else f"{acc:.3f}"]
        rows.append(row)
    mean = ["mean (pooled)"]
    for k, (e, n, cpu) in totals.items():
        mean += [f"{e / n:.3f}", f"{cpu:.1f}"]
    rows.append(mean + ["", ""])
    header = ["set"] + [h for k in columns for h in (f"WER {k}", f"ASR cpu-s {k}")] + ["timed utts", "word speaker acc"]
    print(table(rows, header))
    for name, res in zip(sets, columns["pipeline"]):
        if res["errors"]:
            print(f"{name}: errors {res['errors']}")


if __name__ == "__main__":
    main()
