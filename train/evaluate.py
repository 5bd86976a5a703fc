"""`pipeline evaluate MODEL --shards DIR --output report.json [--report report.html]`.

- Held-out loss per codebook (all of them), codebook-0 and decoder perplexity, on the sources the run
  never trained on (a packed corpus's val/, else the run's hash split at its data.eval_fraction);
  computed by the trainer's own eval (train.loop.evaluate: the decoder on every frame).
- A fixed prompt set (evaluate.prompts), each said after a held-out context turn of the same speaker:
  length and stopping (all-zero frame or the length limit), intelligibility (the pipeline's ASR, WER
  against the prompt), speaker similarity to the context speaker (resemblyzer cosine).
- The seed's pronunciation tests (train/pronounce.py) with evaluate.phoneme_model.

A metric that cannot be scored (no held-out sources, the seeded random Mimi, no ASR, no phoneme
model, no espeak-ng) is reported as {"scored": false, "reason": ...} and listed in `not_scored`:
never a zero or a guess.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import torch

from train import data, generate, pronounce
from train.config import Config, DataConfig, EvaluateConfig, GenerateConfig

log = logging.getLogger("train")


def skipped(reason: str) -> dict:
    return {"scored": False, "reason": reason}


def to16k(audio24k: np.ndarray) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(audio24k, 2, 3).astype(np.float32)


def run_config(spec: str, loaded: generate.Loaded, step: int | None) -> Config:
    """The run's own config (its split, loss weights, batch size); for other models the defaults."""
    from train import checkpoint
    from train.config import load_config

    if loaded.info["kind"] == "run":
        return load_config(None, json.loads((checkpoint.find(Path(spec), step) / "meta.json").read_text())["config"])
    return Config(model=loaded.model.cfg, data=DataConfig(tokenizer=loaded.info["tokenizer"]))


def held_out_shards(shards_dir: str, run_cfg: Config, is_run: bool) -> tuple[list[str], str]:
    """(held-out shards, how they were chosen); raises ValueError naming why there are none."""
    if (Path(shards_dir) / "train").is_dir():
        _, urls = data.list_shards(shards_dir, 1.0)
        how = "the packed corpus's val/ split (whole sources)"
    elif not run_cfg.data.eval_fraction:
        raise ValueError("the run held out no sources (data.eval_fraction=0): it trained on every source here")
    else:
        _, urls = data.list_shards(shards_dir, run_cfg.data.eval_fraction)
        how = f"sources held out by hash at data.eval_fraction={run_cfg.data.eval_fraction}"
    if not is_run:
        how += " (not a run of this trainer: whether it trained on these sources is unknown)"
    if not urls:
        raise ValueError(f"no held-out shards under {shards_dir}")
    return urls, how


def held_out_loss(loaded: generate.Loaded, run_cfg: Config, urls: list[str], how: str, batches: int) -> dict:
    from train import loop
    from train.parallel import Dist

    model, N = loaded.model, loaded.model.N
    try:
        data.preflight(urls, loaded.allow_unreleased_codec, N, model.V, run_cfg.data.speaker_ids)
    except ValueError as e:
        return skipped(str(e))
    device = next(model.parameters()).device
    decoder = data.SampleDecoder(loaded.tokenizer, dataclasses.replace(run_cfg.data, allow_unreleased_codec=True), N)
    held = data.eval_batches(urls, decoder, run_cfg.data.micro_batch_size, batches)
    if not held:
        return skipped(f"the held-out shards ({len(urls)}) have no usable samples")
    m = loop.evaluate(model, held, run_cfg, Dist(device=device))
    model.eval()  # loop.evaluate leaves the model in train mode
    per_cb = [m[f"eval_cb{k}_loss"] for k in range(N)]
    return {"scored": True, "split": how, "shards": len(urls), "samples": sum(len(b["keys"]) for b in held),
            "loss": m["eval_loss"], "c0_loss": m["eval_c0_loss"], "decoder_loss": m["eval_decoder_loss"],
            "c0_perplexity": math.exp(m["eval_c0_loss"]), "decoder_perplexity": math.exp(m["eval_decoder_loss"]),
            "codebook_loss": per_cb}


def context_turns(urls: list[str], n: int, tokenizer, N: int) -> list[dict]:
    """The first utterance of the first `n` held-out samples, as speaker 0: rows and its codes."""
    from stages.corpus_format import CODES, JSON, Sample

    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in sorted(m.name for m in tar.getmembers() if m.name.endswith(f".{JSON}")):
                if len(out) >= n:
                    return out
                key = member[: -len(JSON) - 1]
                sample = Sample.from_json(tar.extractfile(member).read())
                codes = np.load(io.BytesIO(tar.extractfile(f"{key}.{CODES}").read()), allow_pickle=False)
                utt = sample.utterances[0] if sample.utterances else None
                if utt is None or utt.frames[1] <= utt.frames[0]:
                    continue
                turn = codes[:N, utt.frames[0]:utt.frames[1]].astype(np.int64)
                out.append({"key": key, "text": utt.text, "codes": turn,
                            "rows": data.segment_rows(tokenizer, f"[0]{utt.text}", turn, N)})
    return out


class Scorers:
    """The audio models, loaded once; each attribute is the model or the reason it is missing."""

    def __init__(self, cfg: EvaluateConfig, codec_id: dict | None, codec_error: str | None):
        self.audio = None  # why audio cannot be scored, or None
        if codec_error:
            self.audio = f"no Mimi to decode generated frames ({codec_error}); set evaluate.mimi"
        elif not codec_id.get("released"):
            self.audio = (f"the codec is {codec_id.get('weights')}, not the released Mimi: decoded audio is noise; "
                          "set evaluate.mimi to the released weights")
        self.asr = self.encoder = self.phonemes = None
        self.asr_error = self.encoder_error = self.phoneme_error = self.audio
        if self.audio:
            return
        self.asr_error = "evaluate.asr is false" if not cfg.asr else self._try("asr", self._asr)
        self.encoder_error = self._try("encoder", lambda: self._encoder(cfg.speaker_encoder))
        if not cfg.phoneme_model:
            self.phoneme_error = ("no evaluate.phoneme_model configured (a wav2vec2 phoneme CTC model, "
                                  "e.g. facebook/wav2vec2-lv-60-espeak-cv-ft)")
        else:
            self.phoneme_error = self._try("phonemes", lambda: pronounce.PhonemeRecognizer(cfg.phoneme_model))
        if not self.phoneme_error:
            self.phoneme_error = self._try("_espeak", lambda: pronounce.espeak("test", cfg.espeak_voice))

    def _try(self, name: str, load) -> str | None:
        try:
            setattr(self, name, load())
            return None
        except Exception as e:  # noqa: BLE001 - reported as the reason the metric is missing
            log.warning("evaluate: %s not loaded: %s: %s", name, type(e).__name__, e)
            return f"{type(e).__name__}: {e}"

    @staticmethod
    def _asr():
        from stages.asr import AsrConfig, AsrStage

        asr = AsrStage(AsrConfig())
        asr.setup()
        return asr

    @staticmethod
    def _encoder(weights: str | None):
        from resemblyzer import VoiceEncoder

        from stages.diarizer import default_encoder_path

        return VoiceEncoder(device="cpu", verbose=False, weights_fpath=Path(weights or default_encoder_path()))

    def transcribe(self, audio16k: np.ndarray) -> str:
        return self.asr.transcribe_audio([audio16k])[0]["text"].strip() if len(audio16k) else ""

    def similarity(self, a16k: np.ndarray, b16k: np.ndarray) -> float:
        from resemblyzer import preprocess_wav

        ea, eb = (self.encoder.embed_utterance(preprocess_wav(x, source_sr=16000)) for x in (a16k, b16k))
        return float(np.dot(ea, eb) / (np.linalg.norm(ea) * np.linalg.norm(eb)))


def prompt_set(loaded, cfg: EvaluateConfig, g: GenerateConfig, codec, contexts: list[dict], scorers: Scorers) -> dict:
    from stages.asr import wer

    rows = []
    for i, text in enumerate(cfg.prompts):
        ctx = contexts[i % len(contexts)] if contexts else None
        gi = dataclasses.replace(g, seed=g.seed + i)
        with torch.random.fork_rng(devices=[]):
            result = generate.synthesize(loaded, f"[0]{text}", [ctx["rows"]] if ctx else [], gi,
                                         None if scorers.audio else codec)
        row = {"text": text, "context": ctx["key"] if ctx else None, "seconds": result["seconds"],
               "stopped": result["stopped"], "seconds_per_word": result["seconds"] / max(1, len(text.split()))}
        if not scorers.audio and not scorers.asr_error:
            row["transcript"] = scorers.transcribe(to16k(result["audio"]))
            row["wer"] = wer(text, row["transcript"])
        if not scorers.audio and not scorers.encoder_error and ctx and len(result["audio"]) >= 24000 // 2:
            reference = to16k(generate.decode_audio(codec, torch.from_numpy(ctx["codes"].T)))
            try:
                row["speaker_similarity"] = scorers.similarity(to16k(result["audio"]), reference)
            except Exception as e:  # noqa: BLE001 - e.g. no speech left after resemblyzer's trimming
                row["speaker_similarity_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    stopped = [r["stopped"] == "end-of-audio" for r in rows]
    out = {"prompts": rows, "length": {
        "scored": True, "stopped_at_end_of_audio": float(np.mean(stopped)), "hit_length_limit": float(1 - np.mean(stopped)),
        "max_seconds": g.max_seconds, "mean_seconds": float(np.mean([r["seconds"] for r in rows])),
        "mean_seconds_per_word": float(np.mean([r["seconds_per_word"] for r in rows]))}}
    wers = [r["wer"] for r in rows if "wer" in r]
    out["intelligibility"] = ({"scored": True, "wer": float(np.mean(wers)), "prompts": len(wers)} if wers
                              else skipped(scorers.asr_error or "no generated audio to transcribe"))
    sims = [r["speaker_similarity"] for r in rows if "speaker_similarity" in r]
    out["speaker_similarity"] = ({"scored": True, "cosine": float(np.mean(sims)), "prompts": len(sims)} if sims
                                 else skipped(scorers.encoder_error or ("no held-out context turn" if not contexts else
                                                                        "no generated clip of at least 0.5 s with speech")))
    return out


def pronunciation(loaded, cfg: EvaluateConfig, g: GenerateConfig, codec, scorers: Scorers) -> dict:
    if scorers.phoneme_error:
        return {t: skipped(scorers.phoneme_error) for t in cfg.pronunciation}
    from scipy.signal import resample_poly

    from stages.tokenize import encode_batch

    device = str(next(codec.parameters()).device)

    def speak(item: pronounce.Item) -> np.ndarray:
        contexts = []
        if item.context:  # the context turn in espeak-ng's voice, the word said as `expected`
            audio, rate = pronounce.espeak_audio(pronounce.respell(item.context, item.word, item.expected), cfg.espeak_voice)
            g_ = math.gcd(rate, generate.SAMPLE_RATE)
            audio = resample_poly(audio, generate.SAMPLE_RATE // g_, rate // g_).astype(np.float32)
            codes = encode_batch(codec, [audio], device)[0].astype(np.int64)
            contexts.append(data.segment_rows(loaded.tokenizer, f"[0]{item.context}", codes, loaded.model.N))
        with torch.random.fork_rng(devices=[]):
            return to16k(generate.synthesize(loaded, f"[0]{item.text}", contexts, g, codec)["audio"])

    result = pronounce.run(speak, scorers.phonemes, lambda t: pronounce.espeak(t, cfg.espeak_voice), cfg.pronunciation)
    return {**{t: {"scored": True, **result[t]} for t in cfg.pronunciation if t in result}, "items": result["results"]}


def evaluate(spec: str, shards_dir: str, cfg: EvaluateConfig, step: int | None = None, tokenizer: str | None = None) -> dict:
    loaded = generate.load(spec, step, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.model.to(device).eval()
    run_cfg = run_config(spec, loaded, step)
    report = {"model": loaded.info, "shards": str(shards_dir), "evaluate": dataclasses.asdict(cfg)}
    try:
        urls, how = held_out_shards(shards_dir, run_cfg, loaded.info["kind"] == "run")
    except (ValueError, FileNotFoundError) as e:
        urls, how, report["held_out"] = [], "", skipped(str(e))
    if urls:
        report["held_out"] = (held_out_loss(loaded, run_cfg, urls, how, cfg.loss_batches) if cfg.loss_batches
                              else skipped("evaluate.loss_batches is 0"))
    codec = codec_id = codec_error = None
    try:
        codec, codec_id = generate.load_codec(loaded.model.N, loaded.allow_unreleased_codec, cfg.mimi)
        report["codec"] = codec_id
    except RuntimeError as e:
        codec_error = str(e)
        report["codec"] = skipped(codec_error)
    scorers = Scorers(cfg, codec_id, codec_error)
    g = GenerateConfig(temperature=cfg.temperature, top_k=cfg.top_k, max_seconds=cfg.max_seconds, seed=cfg.seed)
    contexts = context_turns(urls, cfg.contexts, loaded.tokenizer, loaded.model.N) if urls else []
    report.update(prompt_set(loaded, cfg, g, codec, contexts, scorers))
    report["pronunciation"] = pronunciation(loaded, cfg, g, codec, scorers) if cfg.pronunciation else {}
    report["not_scored"] = not_scored(report)
    return report


def not_scored(report: dict, prefix: str = "") -> dict:
    """Every {"scored": false} entry of the report, by its path: metric -> reason."""
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            if v.get("scored") is False:
                out[prefix + k] = v["reason"]
            else:
                out.update(not_scored(v, f"{prefix}{k}."))
    return out


def write_html(report: dict, path: str | Path) -> None:
    """One page: headline numbers, what was not scored and why, each prompt."""
    h = lambda x: html.escape(str(x))  # noqa: E731
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else h(v)  # noqa: E731
    lines = [f"<html><head><meta charset='utf-8'><title>evaluate {h(report['model']['model'])}</title></head><body>",
             f"<h1>{h(report['model']['model'])}</h1><p>shards: {h(report['shards'])}</p>"]
    for section in ("held_out", "length", "intelligibility", "speaker_similarity"):
        v = report.get(section, {})
        if v.get("scored"):
            cells = "".join(f"<tr><td>{h(k)}</td><td>{fmt(x)}</td></tr>" for k, x in v.items()
                            if k != "scored" and not isinstance(x, list))
            lines.append(f"<h2>{section}</h2><table>{cells}</table>")
        if section == "held_out" and v.get("scored"):
            lines.append("<p>loss per codebook: " + ", ".join(f"{k}: {x:.3f}" for k, x in enumerate(v["codebook_loss"])) + "</p>")
    for test, v in report.get("pronunciation", {}).items():
        if isinstance(v, dict) and v.get("scored"):
            lines.append(f"<h2>pronunciation: {h(test)}</h2><p>accuracy {v['accuracy']:.3f} over {v['items']} items "
                         f"({v['undecided']} undecided)</p>")
    if report["not_scored"]:
        lines.append("<h2 style='color:#b00'>not scored</h2><ul>" + "".join(
            f"<li><b>{h(k)}</b>: {h(r)}</li>" for k, r in report["not_scored"].items()) + "</ul>")
    cols = ("text", "context", "seconds", "stopped", "transcript", "wer", "speaker_similarity")
    lines.append("<h2>prompts</h2><table border=1><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    lines += ["<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in report["prompts"]]
    lines.append("</table></body></html>")
    Path(path).write_text("\n".join(lines))
