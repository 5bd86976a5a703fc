"""`pipeline export RUN_DIR [--step N] --output DIR`: a checkpoint as a transformers-format CSM.

DIR holds config.json (with depth_decoder_config), safetensors, generation_config.json, and, when the
run's text tokenizer is a real one, the tokenizer and CsmProcessor files: what
`CsmForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` load.
The Mimi codec inside transformers' CSM is written only when the run started from a checkpoint that
had one (model.init_from, e.g. sesame/csm-1b); otherwise transformers initialises it at random and
says so, and so does EXPORT.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from train import checkpoint, data, hf

log = logging.getLogger(__name__)


def _codec_tensors(init_from: str | None) -> dict[str, torch.Tensor]:
    if not init_from:
        return {}
    from safetensors import safe_open

    try:
        path = hf.resolve(init_from)
    except RuntimeError as e:  # the run's starting point is gone or offline: export without its codec
        log.warning("!!! export: cannot read the codec of model.init_from (%s)", e)
        return {}
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if k.startswith(hf.CODEC_PREFIX)})
    return out


def _save_processor(tok, out: Path, init_from: str | None) -> bool:
    from transformers import CsmProcessor, EncodecFeatureExtractor

    template = None
    if init_from:
        src = hf.resolve(init_from) / "chat_template.jinja"
        template = src.read_text() if src.exists() else None
    try:
        CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), tok,
                     chat_template=template).save_pretrained(str(out))
        return True
    except Exception as e:  # noqa: BLE001 - the tokenizer files are still written
        log.warning("no CsmProcessor files written (%s: %s)", type(e).__name__, e)
        return False


def export(run_dir: str | Path, output: str | Path, step: int | None = None) -> dict:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    model, cfg, path = checkpoint.load_run_model(Path(run_dir), step)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tok = None if cfg.data.tokenizer == "bytes" else data.load_tokenizer(cfg.data.tokenizer)
    config = hf.hf_config(cfg.model, bos_token_id=tok.bos_token_id if tok is not None else None)
    config.save_pretrained(str(out))
    state = hf.to_hf_state_dict(model.state_dict())
    codec = _codec_tensors(cfg.model.init_from)
    save_torch_state_dict({**state, **codec}, str(out))
    g, frames = cfg.generate, round(cfg.generate.max_seconds * 12.5)
    sampling = {"do_sample": g.temperature > 0, "temperature": g.temperature or 1.0, "top_k": g.top_k}
    GenerationConfig(**sampling, max_new_tokens=frames, **{f"depth_decoder_{k}": v for k, v in sampling.items()},
                     bos_token_id=config.bos_token_id).save_pretrained(str(out))
    processor = False
    if tok is not None:
        tok.save_pretrained(str(out))
        processor = _save_processor(tok, out, cfg.model.init_from)
    summary = {"checkpoint": str(path), "step": json.loads((path / "meta.json").read_text())["step"],
               "init_from": cfg.model.init_from, "tokenizer": cfg.data.tokenizer if tok is not None else None,
               "processor": processor, "codec_weights": bool(codec),
               "codec_note": None if codec else "no Mimi weights in this export: transformers' codec_model is "
               "randomly initialised; decode codes with the released Mimi (kyutai/mimi) or `pipeline generate`"}
    (out / "EXPORT.json").write_text(json.dumps(summary, indent=1))
    if not codec:
        log.warning("!!! export: %s", summary["codec_note"])
    if tok is None:
        log.warning("!!! export: data.tokenizer=bytes is no real tokenizer: no tokenizer files written")
    return summary
