"""`pipeline stats`: what is in a corpus, from the manifests, rejection records and chunk records
(never the tars), so it takes seconds on thousands of shards.

The funnel
----------
Audio in is the decoded duration of every chunk (`chunks/*.json`). Each second of it is attributed
to exactly one line, so the lines add up to the input by construction; the first line that claims
a second wins, in this order:

1. `error:<stage>`: the whole chunk, when a stage failed on it (a decode failure of a whole file
   has no decoded duration and counts 0 s; it shows in the error counts).
2. `kept`: inside a kept utterance of a kept window (the audio whose codes are in the shards).
3. The rejection records (`rejected/`), in chain order (stages/chain.py), each stage's reasons in
   the order it declares them, chunk-level records last within a stage: VAD (`vad:no_speech` for a
   chunk with no speech at all; `vad:non_speech` for time outside every VAD speech region, itself
   split into pauses between kept utterances inside kept windows and the rest), utterances
   (`utterances:empty_transcript`), the utterance filters (`filter_utterances:<filter>`), the
   windows stage (`utterance_over_budget`, `too_few_utterances`, `window_too_short`,
   `single_speaker`), the window filters (`filter_windows:<filter>`).
4. `unaccounted`: time no record claims (should be ~0; shown so a gap in the records is visible).

So a rejected utterance inside a rejected window counts for the utterance filter that dropped it,
and the silence inside a rejected window counts as VAD non-speech.
"""

from __future__ import annotations

import bisect
import functools
import io
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.corpus import chunk_records, read_errors
from stages.chain import CHAIN, Chain
from stages.corpus_format import ChunkRecord, OutputDir
from stages.intervals import intersect, length, subtract, union
from stages.corpus_format import label_map, read_speakers
from stages.speakers import read_corpus_map

PAUSES = "vad:non_speech (pauses between kept utterances)"


@functools.lru_cache(maxsize=None)
def line_rank(stage: str, reason: str, level: str | None, chain: Chain = CHAIN) -> tuple:
    """Sort key: chain order, then reason order within the stage; chunk-level last in a stage. A
    stage the chain does not name (older corpora: `filters`) ranks with the first that declares the reason."""
    order = chain.funnel_order()
    names = [name for name, _ in order]
    s = names.index(stage) if stage in names else next((i for i, (_, rs) in enumerate(order) if reason in rs), len(order))
    reasons = order[s][1] if s < len(order) else ()
    r = reasons.index(reason) if reason in reasons else len(reasons)
    return (s, level == "chunk", r, reason)


Record = tuple  # (source_id, stage, reason, level, start, end)


def funnel(chunks: list[ChunkRecord], rejected: list[dict], manifest: list[dict], errors: list[dict], chain: Chain = CHAIN) -> dict[str, Any]:
    """Hours in, attributed to exactly one line each (see the module doc), from the chunk records and row dicts.
    Returns {input_hours, lines: [{line, hours, records}], kept_hours, unaccounted_hours, ...}."""
    recs = [(r["source_id"], r["stage"], r["reason"], r.get("level"), r["start"], r["end"]) for r in rejected]
    kept: dict[tuple[str, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    for m in manifest:
        windows, spans = kept[(m["source_id"], m["chunk"])]
        windows.append((m["start"], m["end"]))
        uq = m.get("utterance_quality")
        spans += [(u["start"], u["end"]) for u in uq] if uq else [(m["start"], m["end"])]
    return _funnel(chunks, recs, kept, errors, chain)


def _funnel(chunks: list[ChunkRecord], recs: list[Record], kept: dict[tuple[str, int], tuple[list, list]], errors: list[dict],
            chain: Chain) -> dict[str, Any]:
    error_stage: dict[tuple[str, int], str] = {}
    for e in errors:
        if e.get("chunk") is not None:
            error_stage.setdefault((e["source_id"], e["chunk"]), e["stage"])
    # Records to chunks by time (the chunks of a source tile its timeline, so a record needs no
    # chunk index); kept windows and utterance spans come keyed by (source, chunk).
    starts: dict[str, list[float]] = defaultdict(list)
    for c in sorted(chunks, key=lambda c: (c.source_id, c.offset)):
        starts[c.source_id].append(c.offset)
    by_chunk: dict[tuple[str, float], list[Record]] = defaultdict(list)
    records: Counter[str] = Counter()
    ranks: dict[str, tuple] = {}
    keys: dict[tuple, str] = {}
    for r in recs:
        sid, stage, reason, level, a, b = r
        key = keys.get((stage, reason, level))
        if key is None:
            key = keys[(stage, reason, level)] = f"{stage}:{reason}"
            ranks.setdefault(key, line_rank(stage, reason, level, chain))
        records[key] += 1
        offs = starts.get(sid)
        if not offs:
            continue
        i = max(0, bisect.bisect_right(offs, a) - 1)
        by_chunk[(sid, offs[i])].append((key, a, b))
        for j in range(i + 1, len(offs)):  # a record across a chunk boundary
            if offs[j] >= b:
                break
            by_chunk[(sid, offs[j])].append((key, a, b))

    seconds: Counter[str] = Counter()
    total_in, unknown = 0.0, 0
    for c in chunks:
        a, b = c.offset, c.offset + c.duration
        total_in += c.duration
        if c.duration <= 0:
            unknown += c.failed  # e.g. a file that could not be decoded at all
            continue
        if c.failed:
            key = f"error:{error_stage.get((c.source_id, c.chunk), 'unknown')}"
            seconds[key] += c.duration
            ranks.setdefault(key, (-2,))
            records[key] += 1
            continue
        windows, spans = kept.get((c.source_id, c.chunk), ((), ()))
        windows = union([(max(a, s), min(b, e)) for s, e in windows])
        taken = union([(max(a, s), min(b, e)) for s, e in spans])
        seconds["kept"] += length(taken)
        by_line: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for key, s, e in by_chunk.get((c.source_id, c.offset), ()):
            if e > a and s < b:
                by_line[key].append((max(a, s), min(b, e)))
        for key in sorted(by_line, key=lambda k: ranks[k]):
            new = subtract(union(by_line[key]), taken)
            if key == "vad:non_speech":
                inside = intersect(new, windows)
                seconds[PAUSES] += length(inside)
                seconds[key] += length(new) - length(inside)
                ranks.setdefault(PAUSES, ranks[key][:1] + (False, -1, ""))
            else:
                seconds[key] += length(new)
            taken = union(taken + new)
        seconds["unaccounted"] += max(0.0, (b - a) - length(taken))
    kept_s = seconds.pop("kept", 0.0)
    unaccounted = seconds.pop("unaccounted", 0.0)
    lines = [
        {"line": k, "hours": seconds.get(k, 0.0) / 3600, "records": records.get(k, 0)}
        for k in sorted(set(seconds) | set(records), key=lambda k: ranks.get(k, (99,)))
    ]
    removed = sum(x["hours"] for x in lines)
    return {
        "input_hours": total_in / 3600,
        "lines": lines,
        "removed_hours": removed,
        "kept_hours": kept_s / 3600,
        "unaccounted_hours": unaccounted / 3600,
        "total_hours": removed + (kept_s + unaccounted) / 3600,
        "failed_unknown_duration": unknown,  # failed chunks with no decoded audio: not in the hours
    }


def _summary(values) -> dict[str, float] | None:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return None
    p = np.percentile(x, [5, 25, 50, 75, 95])
    return {"count": int(len(x)), "mean": float(x.mean()), "min": float(x.min()), "p5": float(p[0]), "p25": float(p[1]),
            "median": float(p[2]), "p75": float(p[3]), "p95": float(p[4]), "max": float(x.max())}


def read_dir(out: OutputDir, sub: str):
    """All parquet parts of a directory as one table, read on a thread pool (parquet decoding
    releases the GIL): thousands of small manifest parts in seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = out.list(sub, ".parquet")
    if not names:
        return pa.table({})

    def read(name: str):
        return pq.read_table(io.BytesIO(out.read_bytes(f"{sub}/{name}")), use_threads=False)

    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        tables = list(pool.map(read, names))
    return pa.concat_tables(tables, promote_options="permissive")


def _col(table, name: str, default: Any = None) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def _np(table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=float)


def _utterances(table) -> dict[str, np.ndarray]:
    """The manifest's `utterance_quality` lists, flattened: one entry per kept utterance, with
    `row` the manifest row it belongs to."""
    import pyarrow.compute as pc

    if "utterance_quality" not in table.column_names or table.num_rows == 0:
        return {"row": np.zeros(0, dtype=int)}
    uq = table.column("utterance_quality").combine_chunks()
    flat = pc.list_flatten(uq)
    out = {"row": np.asarray(pc.list_parent_indices(uq).to_numpy(zero_copy_only=False), dtype=int)}
    for name in flat.type.names if hasattr(flat.type, "names") else [flat.type.field(i).name for i in range(flat.type.num_fields)]:
        arr = flat.field(name).to_numpy(zero_copy_only=False)
        out[name] = arr if arr.dtype == object else np.asarray(arr, dtype=float)
    return out


def distributions_from(table, utts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw values of each distribution: windows from manifest columns, utterances from the
    flattened `utterance_quality`."""
    n = table.num_rows
    d: dict[str, np.ndarray] = {}
    if n == 0:
        return d
    d["window_seconds"] = _np(table, "duration")
    d["speakers_per_window"] = _np(table, "speakers")
    for col in ("speech_ratio", "snr_db", "dnsmos_ovrl"):
        v = _np(table, col)
        if np.isfinite(v).any():
            d[col] = v[np.isfinite(v)]
    rows = utts["row"]
    if len(rows):
        d["utterance_seconds"] = utts["end"] - utts["start"]
        for col in ("chars_per_second", "avg_logprob", "no_speech_prob", "overlap_ratio"):
            d[col] = utts[col]
        same = (rows[1:] == rows[:-1]) & (utts["speaker"][1:] != utts["speaker"][:-1])
        d["turn_gap_seconds"] = (utts["start"][1:] - utts["end"][:-1])[same]
    # Rows without per-utterance facts (older manifests): window-level stand-ins.
    missing = np.ones(n, dtype=bool)
    missing[rows] = False
    if missing.any():
        d["avg_logprob"] = np.concatenate([d.get("avg_logprob", np.zeros(0)), _np(table, "avg_logprob")[missing]])
        ratio = _np(table, "overlap_seconds") / np.maximum(_np(table, "speech_seconds"), 1e-6)
        d["overlap_ratio"] = np.concatenate([d.get("overlap_ratio", np.zeros(0)), ratio[missing]])
    return d


def corpus_stats(root: str, values: bool = False, chain: Chain = CHAIN) -> dict[str, Any]:
    """Totals, funnel and distribution summaries; `values=True` also returns the raw distribution
    values under `distribution_values` (numpy arrays, for the report's figures)."""
    out = OutputDir(root)
    mt = read_dir(out, "manifest")
    rt = read_dir(out, "rejected")
    chunks = chunk_records(out)
    errors = read_errors(out)
    n = mt.num_rows
    sids, chunk_idx = _col(mt, "source_id"), _col(mt, "chunk")
    m_start, m_end = _col(mt, "start"), _col(mt, "end")
    utts = _utterances(mt)
    # Kept windows and utterance spans per (source, chunk), for the funnel.
    kept: dict[tuple[str, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    has_utts = np.zeros(n, dtype=bool)
    has_utts[utts["row"]] = True
    for i in range(n):
        windows, spans = kept[(sids[i], chunk_idx[i])]
        windows.append((m_start[i], m_end[i]))
        if not has_utts[i]:
            spans.append((m_start[i], m_end[i]))
    for i, s, e in zip(utts["row"].tolist(), utts.get("start", np.zeros(0)).tolist(), utts.get("end", np.zeros(0)).tolist()):
        kept[(sids[i], chunk_idx[i])][1].append((s, e))
    r_cols = [_col(rt, c) for c in ("source_id", "stage", "reason", "level", "start", "end")]
    recs = list(zip(*r_cols)) if rt.num_rows else []
    removed: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    for (sid, stage, reason, level, a, b) in recs:
        removed[f"{stage}:{reason}"] += b - a
        counted[f"{stage}:{reason}"] += 1
    dists = distributions_from(mt, utts)
    text_chars, n_utts, frames = (float(np.nansum(_np(mt, c))) for c in ("text_chars", "utterances", "frames"))
    labels = _col(mt, "speaker_labels", [])
    speaker_rows = read_speakers(out)
    to_source = label_map(speaker_rows)  # chunk labels -> one labelling per source, where linked
    corpus_map = read_corpus_map(out)
    result = {
        "sources": len({c.uri for c in chunks}),
        "failed_sources": len({c.uri for c in chunks if c.failed}),
        "chunks": len(chunks),
        "shards": len(set(_col(mt, "shard"))),
        "samples": n,
        "input_hours": sum(c.duration for c in chunks) / 3600,
        "audio_hours": float(np.nansum(_np(mt, "duration"))) / 3600,
        "speech_hours": float(np.nansum(_np(mt, "speech_seconds"))) / 3600,
        "utterances": int(n_utts),
        # Distinct (source, speaker) pairs among kept windows, chunk labels mapped through speakers/.
        "speakers": len({(sid, to_source.get((sid, c, lab), lab))
                         for sid, c, labs in zip(sids, chunk_idx, labels) for lab in labs or ()}),
        "linked_sources": len({r["source_id"] for r in speaker_rows}),
        "corpus_speakers": len({r["corpus_speaker"] for r in corpus_map}) if corpus_map else None,
        "corpus_links": dict(Counter(r["confidence"] for r in corpus_map)),
        "frames": int(frames),
        "text_chars": int(text_chars),
        # What the model sees: text tokens (chars / 3.5 + BOS/EOS per utterance), frames, and one
        # end-of-audio frame per utterance (stages/windows.py's budget).
        "text_tokens_estimate": int(text_chars / 3.5 + 2 * n_utts),
        "positions_estimate": int(text_chars / 3.5 + 3 * n_utts + frames),
        "languages": dict(Counter(_col(mt, "language"))),
        "errors": len(errors),
        "errors_by_type": dict(Counter(e["error_type"] for e in errors)),
        "errors_by_stage": dict(Counter(e["stage"] for e in errors)),
        "rejected": len(recs),
        "rejected_by_level": dict(Counter(r[3] or "window" for r in recs)),
        "rejected_by_reason": dict(sorted(counted.items())),
        "rejected_hours_by_reason": {k: v / 3600 for k, v in sorted(removed.items())},
        "funnel": _funnel(chunks, recs, kept, errors, chain),
        "distributions": {k: _summary(v) for k, v in sorted(dists.items())},
    }
    if values:
        result["distribution_values"] = dists
    return result


def _hm(hours: float) -> str:
    s = hours * 3600
    return f"{hours:9.4f} h {s:9.1f} s"


def format_stats(s: dict[str, Any]) -> str:
    lines = [
        f"sources        {s['sources']} ({s['failed_sources']} failed)",
        f"shards         {s['shards']}",
        f"samples        {s['samples']}",
        f"input audio    {s['input_hours']:.3f} h",
        f"kept windows   {s['audio_hours']:.3f} h ({s['speech_hours']:.3f} h of speech)",
        f"utterances     {s['utterances']}",
        f"speakers       {s['speakers']} (per source; {s['linked_sources']} sources linked across chunks)"
        + (f", {s['corpus_speakers']} corpus speakers (links: {', '.join(f'{v} {k}' for k, v in sorted(s['corpus_links'].items()))})"
           if s.get("corpus_speakers") is not None else ""),
        f"frames         {s['frames']} ({s['frames'] / 12.5 / 3600:.3f} h of codes)",
        f"text chars     {s['text_chars']} (~{s['text_tokens_estimate']} text tokens; ~{s['positions_estimate']} model positions)",
        f"languages      {', '.join(f'{k}: {v}' for k, v in s['languages'].items()) or '-'}",
        f"errors         {s['errors']}  {s['errors_by_type'] or ''}",
        f"rejected       {s['rejected']} records"
        + (f" ({', '.join(f'{v} {k}' for k, v in sorted(s['rejected_by_level'].items()))})" if s.get("rejected_by_level") else ""),
    ]
    f = s.get("funnel")
    if f:
        lines += ["", "funnel (each second of input counted once, first reason in pipeline order)"]
        lines.append(f"  {'audio in':<52} {_hm(f['input_hours'])}")
        for x in f["lines"]:
            lines.append(f"  - {x['line']:<50} {_hm(x['hours'])}  ({x['records']} records)" if x["records"] else f"  - {x['line']:<50} {_hm(x['hours'])}")
        if f["unaccounted_hours"] > 0:
            lines.append(f"  - {'unaccounted':<50} {_hm(f['unaccounted_hours'])}")
        lines.append(f"  = {'kept (utterance audio in samples)':<50} {_hm(f['kept_hours'])}")
        if f.get("failed_unknown_duration"):
            lines.append(f"  ({f['failed_unknown_duration']} failed inputs/chunks with no decoded duration are not in these hours)")
        pct = 100 * f["kept_hours"] / f["input_hours"] if f["input_hours"] else 0.0
        lines.append(f"  {'kept / in':<52} {pct:9.1f} %")
    d = s.get("distributions") or {}
    if any(d.values()):
        lines += ["", f"{'distribution':<22} {'count':>6} {'mean':>8} {'p5':>8} {'median':>8} {'p95':>8} {'min':>8} {'max':>8}"]
        for name, v in d.items():
            if v:
                lines.append(
                    f"{name:<22} {v['count']:>6} {v['mean']:>8.2f} {v['p5']:>8.2f} {v['median']:>8.2f} {v['p95']:>8.2f} {v['min']:>8.2f} {v['max']:>8.2f}"
                )
    return "\n".join(lines)
