"""A long recording diarized the way the pipeline does it: cut into chunks of about
`chunk_seconds` (at the quietest 20 ms within `search` seconds of each nominal end, like decode),
each chunk through the diarize stage on its own, then the chunks' speakers linked into one
labelling per source (stages/speakers.py). Shared by tests/test_speakers.py and bench/bench_diarize.py."""

from __future__ import annotations

import numpy as np
from conftest_audio import RATE, energy_regions

from stages.corpus_format import ChunkRecord, label_map
from stages.records import Chunk, Recording, Region, Turn
from stages.speakers import link_source


def cut_points(mono: np.ndarray, chunk_seconds: float, search: float = 2.0) -> list[int]:
    """Sample indices where chunks start (the first is 0)."""
    frame, cuts = int(0.02 * RATE), [0]
    while len(mono) - cuts[-1] > (chunk_seconds + search) * RATE:
        lo, hi = cuts[-1] + int((chunk_seconds - search) * RATE), cuts[-1] + int(chunk_seconds * RATE)
        energy = np.add.reduceat(np.square(mono[lo:hi].astype(np.float64)), np.arange(0, hi - lo, frame))
        cuts.append(lo + int(np.argmin(energy)) * frame)
    return cuts


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
