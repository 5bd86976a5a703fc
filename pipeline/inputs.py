"""Turn command-line inputs (files, directories, globs, .txt lists, URIs) into a sorted list of
input URIs, through pyarrow.fs so object stores work when their filesystem is installed."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {
    ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".webm", ".mp4", ".mkv",
    ".mov", ".aif", ".aiff", ".au", ".amr", ".sph", ".caf",
}


@dataclass(frozen=True)
class Input:
    uri: str
    size: int  # bytes, for progress and ETA


def embedded_default() -> list[str]:
    """The embedded corpus: pyannote's two-speaker telephone conversation, installed with pyannote.audio."""
    import importlib.util

    # Located without importing pyannote.audio, whose import (lightning, torchmetrics) takes ~8 s.
    spec = importlib.util.find_spec("pyannote.audio")
    return [str(Path(spec.origin).parent / "sample" / "sample.wav")]


def _is_audio_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def _remote(uri: str) -> list[Input]:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.Directory:
        scheme = uri.split("://", 1)[0]
        infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
        return [Input(f"{scheme}://{i.path}", i.size or 0) for i in infos if i.type == fs.FileType.File and _is_audio_name(i.path)]
    return [Input(uri, info.size or 0)]


def _local(path: str) -> list[Input]:
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [os.path.join(root, f) for f in files if _is_audio_name(f)]
        return [_local_file(f) for f in found]
    return [_local_file(path)]


def _local_file(path: str) -> Input:
    p = os.path.abspath(path)
    try:
        size = os.path.getsize(p)
    except OSError:
        size = 0  # unreadable or vanished: decode records the error
    return Input(p, size)


def _expand(item: str) -> list[Input]:
    if "://" in item:
        return _remote(item)
    if item.endswith(".txt") and os.path.isfile(item):
        lines = [ln.strip() for ln in Path(item).read_text().splitlines()]
        return expand_inputs([ln for ln in lines if ln and not ln.startswith("#")])
    if any(ch in item for ch in "*?["):
        return [i for match in sorted(glob.glob(item, recursive=True)) for i in _local(match)]
    if os.path.exists(item) or os.path.islink(item):
        return _local(item)
    raise FileNotFoundError(f"input not found: {item}")


def expand_inputs(items: list[str]) -> list[Input]:
    """Explicit files are always attempted (a bad one becomes a recorded error); directories
    contribute only files with audio/video extensions. Duplicates are removed; order is sorted.

    A directory, glob or list that yields no audio file is an error when nothing else does, and a
    warning when other inputs do (a typo in one of several globs should not go unnoticed)."""
    found: list[Input] = []
    empty = []
    for item in items:
        got = _expand(item)
        if not got:
            empty.append(item)
        found += got
    if empty and not found:
        raise FileNotFoundError(f"no audio files in {', '.join(empty)} (extensions: {', '.join(sorted(AUDIO_EXTENSIONS))})")
    for item in empty:
        log.warning("no audio files in %s; going on with the other inputs", item)
    unique = {i.uri: i for i in found}
    return [unique[u] for u in sorted(unique)]
