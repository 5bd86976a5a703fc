"""A long recording diarized the way the pipeline does it: cut into chunks by the decode stage
itself (`decode.chunk_seconds`, at a quiet point near each boundary, the end tapered), each chunk
through the diarize stage on its own, then the chunks' speakers linked into one labelling per
source (stages/speakers.py). Shared by tests/test_speakers.py and bench/bench_diarize.py."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import soundfile as sf
from conftest_audio import RATE, energy_regions

from stages.corpus_format import ChunkRecord, label_map
from stages.decode import DecodeConfig, decode_chunks
from stages.records import Chunk, Recording, Region, Turn
from stages.speakers import link_source


def cut_points(mono: np.ndarray, chunk_seconds: float) -> list[int]:
    """Sample indices where decode starts each chunk of `mono` (as a 16 kHz float WAV, under the
    default DecodeConfig at `chunk_seconds`); the first is 0."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "recording.wav")
        sf.write(path, mono, RATE, subtype="FLOAT")
        return [round(c.offset * RATE) for c in decode_chunks(path, DecodeConfig(chunk_seconds=chunk_seconds))]


def diarize_chunks(stage, mono: np.ndarray, chunk_seconds: float, rid: str = "src") -> list[Chunk]:
    """The chunks of `mono` after the diarize stage, in order."""
    cuts = cut_points(mono, chunk_seconds)
    bounds = list(zip(cuts, cuts[1:] + [len(mono)]))
    rec = Recording(rid, f"{rid}.wav", len(mono) / RATE, RATE, 1)
    chunks = []
    for i, (a, b) in enumerate(bounds):
        offset = a / RATE
        chunk = Chunk(rec, i, offset, i == len(bounds) - 1, audio16k=mono[None, a:b].astype(np.float32),
                      audio24k=np.zeros(1, np.float32))
        chunk.speech = [Region(offset + s, offset + e) for s, e in energy_regions(mono[a:b])]
        chunks.append(stage.process(chunk))
    return chunks


def linked_turns(chunks: list[Chunk], config) -> tuple[list[Turn], list[dict]]:
    """Every chunk's turns under its source speaker (linked as a DiarizeConfig says), and the
    speakers rows they come from."""
    rows = link_source([ChunkRecord.of(c) for c in chunks], config.link_threshold, config.min_speaker_seconds,
                       config.min_speaker_share)
    m = label_map(rows)
    turns = [Turn(t.start, t.end, m.get((c.recording.id, c.index, t.speaker), t.speaker)) for c in chunks for t in c.turns]
    return turns, rows
