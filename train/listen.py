"""Listening during training: every `train.sample_every` steps, `train.sample_prompts` are spoken into
RUN/samples/step-NNNNNNN/prompt-K.wav (with a .json saying what made them); when an ASR model loads
(the pipeline's Whisper, packaged offline), their transcripts and word error rates go into the metrics.

The codec is the pipeline's Mimi: released weights, or the seeded random one when the run trains on
its codes (data.allow_unreleased_codec), marked in every sidecar. Without a codec the frames are kept
as .npy and a warning says why.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import torch

from train import generate
from train.config import Config

log = logging.getLogger("train")
_SPEAKER = re.compile(r"^\[[^\]]*\]\s*")


class Listener:
    def __init__(self, cfg: Config, run_dir: Path, tokenizer):
        self.cfg, self.run_dir, self.tokenizer = cfg, Path(run_dir), tokenizer
        self.codec = self.codec_id = self.asr = None
        self.loaded = False

    def _load(self) -> None:
        self.loaded = True
        try:
            self.codec, self.codec_id = generate.load_codec(self.cfg.model.num_codebooks, self.cfg.data.allow_unreleased_codec,
                                                            self.cfg.generate.mimi)
        except Exception as e:  # noqa: BLE001 - no codec: keep the frames, say so
            log.warning("!!! samples: no Mimi to decode with (%s) [trainer: set generate.mimi]; writing frames only", e)
        if self.codec is None:
            return
        try:
            from stages.asr import AsrConfig, AsrStage

            self.asr = AsrStage(AsrConfig())
            self.asr.setup()
        except Exception as e:  # noqa: BLE001 - ASR is optional here
            log.warning("samples: no ASR model (%s: %s); no transcripts or WER", type(e).__name__, e)
            self.asr = None

    def __call__(self, model, step: int) -> dict:
        """Speak the prompts with `model` (unwrapped, full weights); returns sample metrics."""
        if not self.loaded:
            self._load()
        loaded = generate.Loaded(model, self.tokenizer, {"model": str(self.run_dir), "kind": "run", "step": step})
        out_dir = self.run_dir / "samples" / f"step-{step:07d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        seconds, stopped, wers = [], [], []
        for i, prompt in enumerate(self.cfg.train.sample_prompts):
            g = dataclasses.replace(self.cfg.generate, seed=self.cfg.generate.seed + i)
            with torch.random.fork_rng(devices=[]):
                result = generate.synthesize(loaded, prompt, [], g, self.codec)
            seconds.append(result["seconds"])
            stopped.append(result["stopped"] == "end-of-audio")
            if self.codec is None:
                np.save(out_dir / f"prompt-{i}.frames.npy", result["frames"].numpy())
                continue
            if self.asr is not None and len(result["audio"]):
                result["transcript"] = self._transcribe(result["audio"])
                result["wer"] = self._wer(prompt, result["transcript"])
                wers.append(result["wer"])
            generate.write_wav(out_dir / f"prompt-{i}.wav", result, {"model": loaded.info, "codec": self.codec_id})
        model.train(was_training)
        metrics = {"sample_seconds": float(np.mean(seconds)), "sample_stopped": float(np.mean(stopped))}
        if wers:
            metrics["sample_wer"] = float(np.mean(wers))
        log.info("step %d: samples in %s %s", step, out_dir, metrics)
        return metrics

    def _transcribe(self, audio24k: np.ndarray) -> str:
        from scipy.signal import resample_poly

        audio16k = resample_poly(audio24k, 2, 3).astype(np.float32)
        return self.asr.transcribe_audio([audio16k])[0]["text"].strip()

    @staticmethod
    def _wer(prompt: str, hypothesis: str) -> float:
        from stages.asr import wer

        return wer(_SPEAKER.sub("", prompt), hypothesis)


def full_model(model, cfg: Config, d):
    """The whole model on rank 0 for generation: itself unless FSDP shards it (then a gathered copy;
    a collective: every rank calls this). Other ranks get None."""
    from train.parallel import mode_of, unwrap

    if mode_of(cfg, d) != "fsdp":
        return unwrap(model) if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from train.model import CSM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    copy = CSM(unwrap(model).cfg)  # the model's own (resolved) config
    copy.load_state_dict(state)
    return copy.to(d.device)
