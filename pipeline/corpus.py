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
from stages.corpus_format import CONFIG_FILE, RUN_FILE, ChunkRecord, OutputDir, read_error_lines

VERSIONED = ["torch", "torchaudio", "whisperx", "faster-whisper", "ctranslate2", "pyannote.audio", "moshi", "ray", "webdataset", "silero-vad", "av", "numpy", "pyarrow", "transformers"]
# Keys that may change between runs into the same corpus without changing what is produced.
_RUNTIME_KEYS = {"run", "write.output"}


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


# Settings that decide how many workers and how much they hold, never what they write (the Mimi
# codes do not depend on its batching, tests/test_models.py): a corpus may be resumed with others.
SCHEDULING_KEYS = ("actors", "memory_gb", "batch_seconds")


def _producing_config(config: PipelineConfig) -> dict[str, Any]:
    d = to_dict(config)
    d.pop("run")
    d["write"].pop("output")
    for section in d.values():
        for key in SCHEDULING_KEYS:
            section.pop(key, None)
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
    return [row for n in out.list("errors", ".jsonl") for row in read_error_lines(out.read_bytes(f"errors/{n}"))]
