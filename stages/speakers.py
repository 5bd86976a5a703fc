"""Speakers across chunks and across sources.

The diarizer labels each `decode.chunk_seconds` chunk on its own (S0, S1, ... by first speech in the
chunk). Once every chunk of a source has reached the corpus writer (stages/write.py), `link_source`
links those local labels into one labelling per source from what the chunk records hold (each
local speaker's centroid and speech seconds): centroid-linkage agglomerative clustering with the
diarizer's cosine metric and a threshold of its own, `diarize.link_threshold`, never joining two
speakers of one chunk that both have enough speech in it (a short chunk's diarizer can split a
voice in small clusters). Then no speaker keeps less than `min_speaker_seconds` of speech over the
whole source: such a cluster (a stray third voice, a cough, a laugh) joins the nearest remaining
speaker. The result is one row per source speaker (its embedding, seconds and the chunk labels it
covers) in the speakers table of the part that completes the source; readers map `(chunk, label)`
through it. `link_corpus` does the same one level up, across the sources of a group, for
`pipeline link-speakers`.

Pure functions of the records: a resumed run writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from stages.corpus_format import CORPUS_MAP, SPEAKERS_DIR, ChunkRecord, OutputDir, corpus_map_schema, speakers_schema
from stages.corpus_parts import committed_parts, read_parts, read_table

# ----------------------------------------------------------------------------- clustering


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


@dataclass
class Item:
    """One thing to link: a chunk's local speaker (or a source's speaker, one level up)."""

    key: Any  # (chunk, label) or (source_id, speaker)
    seconds: float
    embedding: np.ndarray | None  # unit vector
    exclusive: Any = None  # items sharing a value (not None) are different speakers by construction
    tie: Any = None  # a value that must stay together regardless of embeddings (a channel)


def cluster(items: list[Item], threshold: float) -> list[list[int]]:
    """Centroid linkage on cosine distance, seconds-weighted centroids, stopping at `threshold`;
    clusters holding items of one `exclusive` value never merge. Deterministic: ties go to the
    lowest indices. Returns clusters as sorted lists of item indices, ordered by first item."""
    groups: list[list[int]] = []
    tied: dict[Any, int] = {}
    for i, it in enumerate(items):
        if it.tie is not None and it.tie in tied:
            groups[tied[it.tie]].append(i)
            continue
        if it.tie is not None:
            tied[it.tie] = len(groups)
        groups.append([i])
    n = len(groups)
    if n < 2:
        return groups
    cents = [_centroid(items, g) for g in groups]
    has = np.array([c is not None for c in cents])
    dim = next((len(c) for c in cents if c is not None), 1)
    V = np.stack([c if c is not None else np.zeros(dim) for c in cents])
    by_value: dict[Any, list[int]] = {}
    for g, members in enumerate(groups):
        for i in members:
            if items[i].exclusive is not None:
                by_value.setdefault(items[i].exclusive, []).append(g)
    conflict = np.zeros((n, n), dtype=bool)
    for gs in by_value.values():
        conflict[np.ix_(gs, gs)] = True
    alive = np.ones(n, dtype=bool)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    D = 1.0 - V @ V.T
    D[~(upper & ~conflict & has[:, None] & has[None, :])] = np.inf
    while True:
        idx = int(np.argmin(D))  # first minimum in row-major order: the lowest (a, b)
        a, b = divmod(idx, n)
        if not D[a, b] < threshold:
            break
        groups[a] = sorted(groups[a] + groups[b])
        V[a] = _centroid(items, groups[a])
        conflict[a] |= conflict[b]
        conflict[:, a] = conflict[a]
        alive[b] = False
        D[b, :] = D[:, b] = np.inf
        row = 1.0 - V @ V[a]
        row[~alive | ~has | conflict[a]] = np.inf
        row[a] = np.inf
        D[a, a + 1:] = row[a + 1:]
        D[:a, a] = row[:a]
    return sorted((groups[g] for g in range(n) if alive[g]), key=lambda g: g[0])


def _centroid(items: list[Item], members: list[int]) -> np.ndarray | None:
    vs = [(items[i].embedding, max(items[i].seconds, 1e-3)) for i in members if items[i].embedding is not None]
    if not vs:
        return None
    return _unit(sum(w * v for v, w in vs))


def fold_short(items: list[Item], clusters: list[list[int]], min_seconds: float) -> tuple[list[list[int]], set[int]]:
    """Clusters with less than `min_seconds` of speech join the nearest cluster that has enough
    (the one with the most speech when either has no embedding). Returns the clusters and the
    indices of the folded items."""
    seconds = [sum(items[i].seconds for i in c) for c in clusters]
    real = [k for k, s in enumerate(seconds) if s >= min_seconds]
    if not real and clusters:
        real = [int(np.argmax(seconds))]
    merged = {k: list(c) for k, c in enumerate(clusters) if k in real}
    folded: set[int] = set()
    cents = {k: _centroid(items, clusters[k]) for k in range(len(clusters))}
    for k, c in enumerate(clusters):
        if k in merged:
            continue
        if cents[k] is not None and any(cents[r] is not None for r in real):
            target = min((r for r in real if cents[r] is not None), key=lambda r: (1.0 - float(cents[k] @ cents[r]), r))
        else:
            target = max(real, key=lambda r: (seconds[r], -r))
        merged[target] += c
        folded.update(c)
    return sorted((sorted(c) for c in merged.values()), key=lambda g: g[0]), folded


# ----------------------------------------------------------------------------- one source


def chunk_items(records: Iterable[ChunkRecord], min_seconds: float) -> list[Item]:
    """The local speakers of a source's chunks, in chunk then label order. Two speakers of one
    chunk that both have `min_seconds` of speech in it are different by construction (the
    diarizer told them apart on enough speech: pyannote's two telephone voices are only 0.11-0.13
    apart as centroids); shorter ones are not, since a short chunk's diarizer splits a voice into
    small clusters (measured 0.07-0.13 apart on 12 s chunks)."""
    items = []
    for r in sorted(records, key=lambda r: r.chunk):
        for label in sorted(r.speakers, key=lambda lab: (len(lab), lab)):  # S2 before S10
            s = r.speakers[label]
            emb, channel, seconds = s.get("embedding"), s.get("channel"), float(s["seconds"])
            vec = _unit(np.asarray(emb, dtype=np.float64)) if emb else None
            items.append(Item((r.chunk, label), seconds, vec, r.chunk if seconds >= min_seconds else None,
                              None if channel is None else ("ch", channel)))
    return items


def link_source(records: list[ChunkRecord], threshold: float, min_seconds: float, min_share: float = 1.0) -> list[dict[str, Any]]:
    """Rows of speakers/<source_id>.parquet: one per source speaker, named S0, S1, ... in order of
    first appearance (chunk, then local label). A speaker has at least `min_seconds` of speech, or
`min_share` of the source's when that is less. `distance` is a chunk label's cosine distance to
    its source speaker's centroid: how sure the link is (the diarizer's threshold is the limit)."""
    if not records:
        return []
    first = records[0]
    items = chunk_items(records, 0.0)
    bar = min(min_seconds, min_share * sum(it.seconds for it in items))  # a speaker's least speech
    items = chunk_items(records, bar)
    clusters, folded = fold_short(items, cluster(items, threshold), bar)
    rows = []
    for n, members in enumerate(clusters):
        own = [i for i in members if i not in folded]
        cent = _centroid(items, own) if own else _centroid(items, members)
        chunks = []
        for i in members:
            it = items[i]
            d = None if cent is None or it.embedding is None else round(1.0 - float(cent @ it.embedding), 5)
            chunks.append({"chunk": it.key[0], "label": it.key[1], "seconds": round(it.seconds, 3), "distance": d,
                           "folded": i in folded})
        rows.append({
            "source_id": first.source_id, "source_uri": first.uri, "source_dir": first.uri.rsplit("/", 1)[0] if "/" in first.uri else "",
            "speaker": f"S{n}", "seconds": round(sum(items[i].seconds for i in members), 3),
            "embedding": None if cent is None else [round(float(x), 5) for x in cent], "chunks": chunks,
        })
    return rows


# ----------------------------------------------------------------------------- across sources


def link_corpus(rows: list[dict[str, Any]], threshold: float, group_by: str | None = None) -> list[dict[str, Any]]:
    """The corpus-wide speaker map: source speakers clustered within each group (all one group when
    `group_by` is None), two speakers of one source never merged. Corpus speakers are named
    `C<n>` in order of group, then first source. `distance` is a speaker's cosine distance to its
    corpus speaker's centroid, `nearest_other` to the closest other corpus speaker of its group;
    `confidence`: `single` (nobody linked), `high` (distance under half the threshold and the next
    speaker beyond the threshold), `low` (the next speaker closer than the threshold to it), else
    `medium`."""
    out, n = [], 0
    for group, members in _groups(rows, group_by).items():
        linked, count = link_group(group, members, threshold)
        out += [{**r, "corpus_speaker": f"C{n + r['corpus_speaker']}"} for r in linked]
        n += count
    return out


def _groups(rows: list[dict[str, Any]], group_by: str | None) -> dict[str, list[dict[str, Any]]]:
    rows = sorted(rows, key=lambda r: (str(r.get(group_by)) if group_by else "", r["source_id"], int(r["speaker"][1:])))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group_by)) if group_by else "", []).append(r)
    return groups


def link_group(group: str, members: list[dict[str, Any]], threshold: float) -> tuple[list[dict[str, Any]], int]:
    """One group's rows of the map, `corpus_speaker` an index within the group; and how many."""
    items = [Item((r["source_id"], r["speaker"]), float(r["seconds"]),
                  None if r["embedding"] is None else _unit(np.asarray(r["embedding"], dtype=np.float64)), r["source_id"])
             for r in members]
    clusters = cluster(items, threshold)
    cents = [_centroid(items, c) for c in clusters]
    out = []
    for k, c in enumerate(clusters):
        for i in c:
            e = items[i].embedding
            d = None if e is None or cents[k] is None else 1.0 - float(cents[k] @ e)
            others = [1.0 - float(cents[j] @ e) for j in range(len(clusters)) if j != k and e is not None and cents[j] is not None]
            near = min(others) if others else None
            conf = ("single" if len(c) == 1 else
                    "low" if near is not None and near < threshold else
                    "high" if d is not None and d < threshold / 2 else "medium")
            out.append({"group": group, "source_id": items[i].key[0], "speaker": items[i].key[1],
                        "corpus_speaker": k, "seconds": items[i].seconds, "members": len(c),
                        "distance": None if d is None else round(d, 5),
                        "nearest_other": None if near is None else round(near, 5), "confidence": conf})
    return out, len(clusters)


def read_corpus_map(out: OutputDir, columns: list[str] | None = None):
    """speaker_map.parquet (`pipeline link-speakers`) as a pyarrow table, None when it was never run."""
    import pyarrow.parquet as pq

    return pq.read_table(out.path(CORPUS_MAP), filesystem=out.fs, columns=columns) if out.exists(CORPUS_MAP) else None


def read_speakers(out: OutputDir) -> list[dict[str, Any]]:
    """Every source speaker row of the committed parts (none for a corpus made without linking)."""
    table = read_table(out, SPEAKERS_DIR)
    return table.to_pylist() if table is not None else []


BUCKET_ROWS = 200_000  # source speakers per bucket of groups: what link-speakers holds at once


def _rows_with_vectors(table) -> list[dict[str, Any]]:
    """Rows as dicts with each embedding a numpy row of one float32 matrix (as Python floats, a
    bucket's embeddings took ten times the memory)."""
    import pyarrow.compute as pc

    emb = table["embedding"].combine_chunks()
    rows = table.drop_columns(["embedding"]).to_pylist()
    lengths = pc.fill_null(pc.list_value_length(emb), 0).to_numpy()
    flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32)
    ends = np.cumsum(lengths)
    for r, a, b, valid in zip(rows, ends - lengths, ends, emb.is_valid().to_numpy(zero_copy_only=False)):
        r["embedding"] = flat[a:b] if valid else None
    return rows


def write_corpus_map(out: OutputDir, threshold: float, group_by: str | None = None) -> dict[str, Any]:
    """speaker_map.parquet, in bounded memory when `group_by` splits the corpus: groups are spread
    over buckets by a hash of their name (each bucket spilled to a local file), linked bucket by
    bucket, and numbered C0, C1, ... in group order at the end. Without `group_by` the corpus is one
    group, held at once. Returns {speakers, corpus_speakers, confidence: {kind: count}}."""
    import tempfile
    import zlib
    from collections import Counter

    import pyarrow as pa
    import pyarrow.parquet as pq

    named = [f.name for f in speakers_schema() if f.name not in ("embedding", "chunks")]
    if group_by and group_by not in named:
        raise ValueError(f"--group-by {group_by}: not a speakers column (one of {', '.join(named)})")
    parts = committed_parts(out)
    total = sum(t.num_rows for _, t in read_parts(out, SPEAKERS_DIR, parts, ["source_id"]))
    buckets = max(1, -(-total // BUCKET_ROWS)) if group_by else 1
    columns = list(dict.fromkeys(["source_id", "speaker", "seconds", "embedding", *([group_by] if group_by else [])]))
    counts: dict[str, int] = {}
    summary = {"speakers": 0, "corpus_speakers": 0, "confidence": Counter()}
    with tempfile.TemporaryDirectory(prefix="csm-link-") as tmp:
        spill: dict[int, Any] = {}
        for _, t in read_parts(out, SPEAKERS_DIR, parts, columns):
            keys = [zlib.crc32(str(g).encode()) % buckets for g in t[group_by].to_pylist()] if buckets > 1 else [0] * t.num_rows
            for b in set(keys):
                if b not in spill:
                    spill[b] = pq.ParquetWriter(f"{tmp}/in-{b}.parquet", t.schema)
                spill[b].write_table(t.filter(pa.array([k == b for k in keys])))
        for w in spill.values():
            w.close()
        schema = corpus_map_schema().set(corpus_map_schema().get_field_index("corpus_speaker"), pa.field("corpus_speaker", pa.int64()))
        for b in sorted(spill):  # link each bucket's groups, numbered within their group
            rows = _rows_with_vectors(pq.read_table(f"{tmp}/in-{b}.parquet"))
            linked = []
            for group, members in _groups(rows, group_by).items():
                got, counts[group] = link_group(group, members, threshold)
                linked += got
            pq.write_table(pa.Table.from_pylist(linked, schema=schema), f"{tmp}/out-{b}.parquet")
        offset, n = {}, 0
        for group in sorted(counts):
            offset[group], n = n, n + counts[group]
        final = f"{tmp}/{CORPUS_MAP}"
        with pq.ParquetWriter(final, corpus_map_schema()) as writer:
            for b in sorted(spill):
                t = pq.read_table(f"{tmp}/out-{b}.parquet")
                ids = [f"C{offset[g] + k}" for g, k in zip(t["group"].to_pylist(), t["corpus_speaker"].to_pylist())]
                t = t.set_column(t.schema.get_field_index("corpus_speaker"), "corpus_speaker", pa.array(ids, pa.string()))
                writer.write_table(t.cast(corpus_map_schema()))
                summary["speakers"] += t.num_rows
                summary["confidence"].update(t["confidence"].to_pylist())
        if not spill:
            pq.write_table(pa.Table.from_pylist([], schema=corpus_map_schema()), final)
        out.put_file(CORPUS_MAP, final)
    summary["corpus_speakers"] = n
    return summary
