"""decode: any container/codec PyAV can read -> bounded chunks at 16 kHz (all channels) and 24 kHz (mono).

The file is decoded once and each decoded frame is fed to one resampler per rate, so no
whole-file array exists at either rate: memory is bounded by `chunk_seconds`. Chunks are cut at
the quietest point near the boundary so an utterance is rarely split. Toward the end of a long
recording chunks get shorter (`taper_chunks`), so that a run does not end with one core working
through a full chunk while the others wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from stages.base import Clock, Resources, Stage
from stages.overrides import require
from stages.records import ANALYSIS_RATE, CODEC_RATE, Chunk, ErrorRecord, Recording, source_id

# Cut positions are multiples of this many 16 kHz samples so that the matching 24 kHz index
# (x 3/2) is an integer.
_ALIGN = 2


class DecodeError(Exception):
    pass


@dataclass(frozen=True)
class DecodeConfig:
    # The unit of parallel work (a chunk runs on one worker) and the bound on worker memory; a
    # window never spans two chunks, and speakers are linked across them (stages/speakers.py).
    # 120 s: a 30-minute podcast is 14 chunks and 4 tapered ones, so every core works until near
    # the end (8.8x real time, model CPU efficiency 0.86 on 2 cores; 60 s chunks were no faster).
    # bench/bench_pipeline.py --shape podcasts; speaker DER by chunk size: bench/bench_diarize.py --long.
    chunk_seconds: float = 120.0
    cut_search_seconds: float = 5.0  # look back this far from the boundary for a quiet point
    # In the last taper_chunks x chunk_seconds of a recording at least twice that long (by its
    # header's duration), each chunk is half of what remains, down to a quarter chunk, and the
    # final one is the rest, at least min(cut_search_seconds, chunk_seconds / 8) (120 s chunks:
    # ..., 120, 60, 30, then 5-35 s). A run's last chunks are then short, and the cores finish
    # close together. 0: every chunk full length.
    taper_chunks: int = 2
    max_channels: int = 8  # more than this is not a conversation recording
    max_duration_hours: float = 24.0  # larger inputs are refused (almost certainly a broken stream)

    def __post_init__(self):
        require(self.chunk_seconds >= 1, "chunk_seconds", f"must be at least 1 s, got {self.chunk_seconds}")
        require(0 <= self.cut_search_seconds < self.chunk_seconds / 2, "cut_search_seconds",
                f"must be in [0, chunk_seconds / 2), got {self.cut_search_seconds}")
        require(self.taper_chunks >= 0, "taper_chunks", f"must be 0 or more, got {self.taper_chunks}")
        require(self.max_channels >= 1, "max_channels", f"must be at least 1, got {self.max_channels}")
        require(self.max_duration_hours > 0, "max_duration_hours", f"must be > 0, got {self.max_duration_hours}")


def open_input(uri: str):
    """A seekable binary file for a local path or any URI pyarrow.fs understands (s3://, gs://, ...)."""
    from pyarrow import fs

    if "://" not in uri:
        return open(uri, "rb")
    filesystem, path = fs.FileSystem.from_uri(uri)
    return filesystem.open_input_file(path)


def _quiet_cut(mono: np.ndarray, lo: int, hi: int, frame: int = 800) -> int:
    """Index in [lo, hi) at the start of the lowest-energy `frame` (50 ms at 16 kHz)."""
    if hi - lo < 2 * frame:
        return hi - hi % _ALIGN
    seg = mono[lo:hi]
    n = len(seg) // frame
    energy = np.square(seg[: n * frame].reshape(n, frame)).mean(axis=1)
    cut = lo + int(np.argmin(energy)) * frame + frame // 2
    return cut - cut % _ALIGN


class _Buffer:
    """Decoded samples for one rate, kept as a list of blocks until a chunk is cut."""

    def __init__(self, channels: int):
        self.blocks: list[np.ndarray] = []
        self.size = 0
        self.channels = channels

    def add(self, frames) -> None:
        for f in frames:
            a = f.to_ndarray().astype(np.float32, copy=False)  # planar float: [channels, n]
            if a.shape[0] != self.channels:  # packed layouts come as [1, n * channels]
                a = a.reshape(-1, self.channels).T
            self.blocks.append(a)
            self.size += a.shape[1]

    def take(self, n: int) -> np.ndarray:
        data = np.concatenate(self.blocks, axis=1) if self.blocks else np.zeros((self.channels, 0), np.float32)
        head, tail = data[:, :n], data[:, n:]
        self.blocks, self.size = ([tail] if tail.shape[1] else []), tail.shape[1]
        return np.ascontiguousarray(head)


def decode_chunks(uri: str, config: DecodeConfig) -> Iterator[Chunk]:
    """Yield the source's chunks in order; the final one has `last=True`.

    Raises DecodeError (or PyAV's errors) when nothing usable can be decoded. A stream that breaks
    after some audio was decoded yields that audio and records a warning on the last chunk.
    """
    import av

    sid = source_id(uri)
    with open_input(uri) as f, av.open(f, mode="r") as container:
        if not container.streams.audio:
            raise DecodeError("no audio stream")
        stream = container.streams.audio[0]
        channels = stream.codec_context.channels or len(stream.layout.channels)
        if not 1 <= channels <= config.max_channels:
            raise DecodeError(f"{channels} channels (max_channels={config.max_channels})")
        estimated = float(stream.duration * stream.time_base) if stream.duration else None
        if container.duration and not estimated:
            estimated = container.duration / 1e6
        if estimated and estimated > config.max_duration_hours * 3600:
            raise DecodeError(f"{estimated / 3600:.1f} h exceeds max_duration_hours")
        recording = Recording(sid, uri, estimated or 0.0, stream.rate or 0, channels)
        layout = stream.layout.name
        resamplers = {
            rate: av.AudioResampler(format="fltp", layout=layout, rate=rate)
            for rate in (ANALYSIS_RATE, CODEC_RATE)
        }
        buffers = {rate: _Buffer(channels) for rate in resamplers}
        chunk_len = int(config.chunk_seconds * ANALYSIS_RATE) // _ALIGN * _ALIGN
        search = int(config.cut_search_seconds * ANALYSIS_RATE)
        taper = config.taper_chunks * chunk_len
        tapered = bool(taper and estimated and estimated * ANALYSIS_RATE >= 2 * taper)

        def next_length() -> int:
            left = int(estimated * ANALYSIS_RATE) - offset16 if tapered else None
            if left is None or left > taper:
                return chunk_len
            return max(left // 2, chunk_len // 4) // _ALIGN * _ALIGN

        pending: Chunk | None = None
        index, offset16 = 0, 0
        warning = None

        def cut(n16: int) -> Chunk:
            nonlocal index, offset16
            a16 = buffers[ANALYSIS_RATE].take(n16)
            a24 = buffers[CODEC_RATE].take(n16 * 3 // 2).mean(axis=0)
            chunk = Chunk(recording, index, offset16 / ANALYSIS_RATE, False, a16, np.ascontiguousarray(a24))
            if not (np.isfinite(a16).all() and np.isfinite(a24).all()):
                raise DecodeError(f"non-finite samples in chunk {index}")
            index, offset16 = index + 1, offset16 + n16
            return chunk

        try:
            for frame in container.decode(stream):
                for rate, r in resamplers.items():
                    buffers[rate].add(r.resample(frame))
                n = next_length()
                reach = min(search, n // 2)
                if buffers[ANALYSIS_RATE].size >= n + reach:
                    mono = np.concatenate(buffers[ANALYSIS_RATE].blocks, axis=1)[:, :n].mean(axis=0)
                    n16 = _quiet_cut(mono, n - reach, n)
                    if pending is not None:
                        yield pending
                    pending = cut(n16)
        except (av.error.FFmpegError, EOFError) as exc:
            if pending is None and buffers[ANALYSIS_RATE].size == 0:
                raise
            warning = f"stream ended early: {type(exc).__name__}: {exc}"
        for rate, r in resamplers.items():
            buffers[rate].add(r.resample(None))
        # The 24 kHz stream can lag or lead by a few samples: pad/trim it to match 16 kHz exactly.
        rest16 = buffers[ANALYSIS_RATE].size - buffers[ANALYSIS_RATE].size % _ALIGN
        need24 = rest16 * 3 // 2
        if buffers[CODEC_RATE].size < need24:
            buffers[CODEC_RATE].blocks.append(np.zeros((channels, need24 - buffers[CODEC_RATE].size), np.float32))
            buffers[CODEC_RATE].size = need24
        if rest16 > 0:
            if pending is not None:
                yield pending
            pending = cut(rest16)
        if pending is None:
            raise DecodeError("no audio samples decoded")
        pending.last = True
        recording.duration = offset16 / ANALYSIS_RATE  # exact once fully decoded
        if not warning and estimated and recording.duration < estimated - max(1.0, 0.05 * estimated):
            warning = f"decoded {recording.duration:.2f} s of the {estimated:.2f} s the header declares"
        if warning:
            pending.warnings = [
                ErrorRecord(uri, sid, "decode", "TruncatedStream", warning, chunk=pending.index)
            ]
        yield pending


class DecodeStage(Stage):
    """Source stage: one input URI -> its chunks. Errors become a failed placeholder chunk."""

    name = "decode"

    def resources(self) -> Resources:
        return Resources(cpus=0.5)

    def chunks(self, uri: str) -> Iterator[Chunk]:
        next_index = 0
        chunks = decode_chunks(uri, self.config)
        try:
            while True:
                clock = Clock()  # decoding happens lazily, inside next()
                chunk = next(chunks, None)
                if chunk is None:
                    return
                clock.charge(chunk, self.name)
                next_index = chunk.index + 1
                yield chunk
        except Exception as exc:
            # Recorded as a failed final chunk, so the source still completes (0..last) and the
            # chunks already yielded are kept.
            placeholder = Chunk(Recording(source_id(uri), uri, 0.0, 0, 0), next_index, 0.0, True)
            placeholder.fail(self.name, exc)
            yield placeholder
