"""The corpus directory on disk: what is already done (resume), the config it was made with, the
manifest and run.json. Reads the small files (chunk records, manifests), never the tars."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import defaultdict
from importlib import metadata
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, to_dict
from stages.corpus_format import CONFIG_FILE, RUN_FILE, ChunkRecord, OutputDir, read_error_table

VERSIONED = ["torch", "torchaudio", "whisperx", "faster-whisper", "ctranslate2", "pyannote.audio", "moshi", "ray", "webdataset", "silero-vad", "av", "numpy", "pyarrow", "transformers"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def chunk_records(out: OutputDir) -> list[ChunkRecord]:
    return [ChunkRecord.from_json(out.read_bytes(f"chunks/{n}")) for n in out.list("chunks", ".json")]


def completed_sources(out: OutputDir) -> set[str]:
    """URIs whose every chunk (0..last) has its commit record."""
    seen: dict[str, set[int]] = defaultdict(set)
    last: dict[str, int] = {}
    for rec in chunk_records(out):
        seen[rec.uri].add(rec.chunk)
        if rec.last:
            last[rec.uri] = rec.chunk
    return {uri for uri, idx in last.items() if seen[uri] == set(range(idx + 1))}


def _producing_config(config: PipelineConfig) -> dict[str, Any]:
    """What decides the corpus bytes: the config less `run` and each stage's runtime keys (stages/chain.py)."""
    d = to_dict(config)
    d.pop("run")
    for section, keys in config.chain.runtime_keys().items():
        for key in keys:
            d[section].pop(key)
    return d


def config_digest(config: PipelineConfig) -> str:
    return hashlib.sha1(json.dumps(_producing_config(config), sort_keys=True).encode()).hexdigest()[:16]


def check_config(out: OutputDir, config: PipelineConfig, allow_change: bool) -> None:
    """Refuse to mix samples made with different settings in one corpus, unless asked to."""
    if out.exists(CONFIG_FILE):
        previous = json.loads(out.read_bytes(CONFIG_FILE))
        if previous.get("digest") != config_digest(config) and not allow_change:
            old, new = previous["config"], _producing_config(config)
            diff = sorted(
                f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]
            )
            raise ConfigError(
                f"{out.root} was produced with a different config (changed: {', '.join(diff) or '?'}); "
                "use a new --output, or --allow-config-change to add to it anyway"
            )
    out.write_bytes(CONFIG_FILE, json.dumps({"digest": config_digest(config), "config": _producing_config(config)}, indent=1, sort_keys=True).encode())


def write_run_json(out: OutputDir, config: PipelineConfig, summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    run = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(config),
        "config_digest": config_digest(config),
        "versions": package_versions(),
        **extra,
        **summary,
    }
    out.write_bytes(RUN_FILE, json.dumps(run, indent=1, sort_keys=True, default=str).encode())
    return run


def read_errors(out: OutputDir) -> list[dict[str, Any]]:
    return [row for n in out.list("errors", ".parquet") for row in read_error_table(out.read_bytes(f"errors/{n}"))]
