"""The corpus directory on disk: what is already done (resume), the config it was made with, the
lease of the one run writing it, and run.json. Reads the commit tables as columns, never the tars."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import threading
import time
import uuid
from importlib import metadata
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, to_dict
from stages.corpus_format import CONFIG_FILE, LAYOUT, RUN_FILE, ChunkRecord, OutputDir
from stages.corpus_parts import COMMITS, committed_parts, read_parts

VERSIONED = ["torch", "torchaudio", "whisperx", "faster-whisper", "ctranslate2", "pyannote.audio", "moshi", "ray", "webdataset", "silero-vad", "av", "numpy", "pyarrow", "transformers"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def committed_state(out: OutputDir) -> tuple[Any, dict[str, list[ChunkRecord]]]:
    """(the uris whose chunks 0..last are all committed, as a pyarrow array; the committed records of
    every other source that has some). The commit tables' columns are grouped by uri in Arrow part
    by part, then across parts: memory is one row per source, never a Python object per chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = committed_parts(out)
    groups = []
    for _, t in read_parts(out, COMMITS, parts, ["uri", "chunk", "last"]):
        last = pc.if_else(t["last"], t["chunk"], pa.scalar(None, pa.int64()))
        t = pa.table({"uri": t["uri"], "chunk": t["chunk"], "last_chunk": last})
        groups.append(t.group_by("uri").aggregate([("chunk", "count"), ("last_chunk", "max")]))
    if not groups:
        return pa.array([], pa.string()), {}
    j = pa.concat_tables(groups).group_by("uri").aggregate([("chunk_count", "sum"), ("last_chunk_max", "max")])
    done = pc.fill_null(pc.equal(j["chunk_count_sum"], pc.add(j["last_chunk_max_max"], 1)), False)
    partial = j.filter(pc.invert(done))["uri"]
    prior: dict[str, list[ChunkRecord]] = {}
    if len(partial):
        for _, part in read_parts(out, COMMITS, parts):
            for row in part.filter(pc.is_in(part["uri"], value_set=partial)).to_pylist():
                r = ChunkRecord.from_row(row)
                prior.setdefault(r.source_id, []).append(r)
    return j.filter(done)["uri"].combine_chunks(), prior


def not_done(uris: list[str], done) -> list[bool]:
    """For each of `uris`: is it missing from `done` (committed_state's array)?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.invert(pc.is_in(pa.array(uris, pa.string()), value_set=done)).to_pylist()


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
    out.write_bytes(CONFIG_FILE, json.dumps({"digest": config_digest(config), "layout": LAYOUT, "config": _producing_config(config)},
                                            indent=1, sort_keys=True).encode())


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


class Lease:
    """One writer per corpus: `lease.json` names the run holding the output and is renewed every
    `RENEW` seconds. A second run is refused while the lease is fresh; a lease left by a killed run is
    taken over once its process is gone (same host) or it is `STALE` seconds old (any host). Works on
    a local disk and on an object store (write, then read back: the last writer wins, and checks)."""

    FILE, RENEW, STALE = "lease.json", 15.0, 60.0

    def __init__(self, out: OutputDir):
        self.out, self.token = out, uuid.uuid4().hex
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.out.read_bytes(self.FILE)) if self.out.exists(self.FILE) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def alive(h: dict[str, Any]) -> bool:
        if h.get("host") == socket.gethostname():
            try:
                os.kill(int(h["pid"]), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return time.time() - float(h.get("renewed", 0)) < Lease.STALE

    def _write(self) -> None:
        self.out.write_bytes(self.FILE, json.dumps({"token": self.token, "host": self.host, "pid": self.pid,
                                                    "started": self.started, "renewed": time.time()}).encode())

    def acquire(self) -> Lease:
        h = self.holder()
        if h and self.alive(h):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
            raise ConfigError(f"{self.out.root} is being written by another run (host {h.get('host')}, pid {h.get('pid')}, "
                              f"since {since}); wait for it to finish, or remove {self.out.path(self.FILE)} if it is dead")
        self._write()
        if (self.holder() or {}).get("token") != self.token:
            raise ConfigError(f"{self.out.root}: another run took the lease at the same moment; try again")
        self.thread = threading.Thread(target=self._renew, daemon=True, name="csm-corpus-lease")
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(self.RENEW):
            try:
                self._write()
            except OSError:  # a full disk: the run stops on its own writes
                pass

    def release(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        if (self.holder() or {}).get("token") == self.token:
            self.out.delete(self.FILE)

    def __enter__(self) -> Lease:
        return self if self.thread else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
