"""`pipeline stats`: what is in a corpus, from the manifests, rejection records and chunk records
of its committed parts (never the tars), read part by part: memory holds a few parts and the
distributions' reservoirs, whatever the corpus size.

The funnel
----------
Audio in is the decoded duration of every committed chunk (`commits/`). Each second of it is attributed
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
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from stages.chain import CHAIN, Chain
from stages.corpus_format import CONFIG_FILE, SPEAKERS_DIR, ChunkRecord, OutputDir
from stages.corpus_parts import COMMITS, INCOMPLETE, committed_parts, layout_problem, read_part_tables
from stages.intervals import intersect, length, subtract, union
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
    f = Funnel(chain)
    f.add(chunks, recs, kept, errors)
    return f.result()


class Funnel:
    """The funnel, summed over parts: a chunk's records are all in its part, so each part's chunks
    are attributed on their own and only the per-line totals are kept."""

    def __init__(self, chain: Chain = CHAIN):
        self.chain = chain
        self.seconds: Counter[str] = Counter()
        self.records: Counter[str] = Counter()
        self.ranks: dict[str, tuple] = {}
        self.total_in, self.unknown = 0.0, 0

    def add(self, chunks, recs: list[Record], kept: dict[tuple[str, int], tuple[list, list]], errors: list[dict]) -> None:
        """`chunks`: records with source_id, chunk, offset, duration, failed; `recs`: rejection tuples."""
        seconds, records, ranks = self.seconds, self.records, self.ranks
        error_stage: dict[tuple[str, int], str] = {}
        for e in errors:
            if e.get("chunk") is not None:
                error_stage.setdefault((e["source_id"], e["chunk"]), e["stage"])
        # Records to chunks by time (the chunks of a source tile its timeline, so a record needs no
        # chunk index); kept windows and utterance spans come keyed by (source, chunk).
        starts: dict[str, list[float]] = defaultdict(list)
        for c in sorted(chunks, key=lambda c: (c.source_id, c.offset)):
            starts[c.source_id].append(c.offset)
        by_chunk: dict[tuple[str, float], list] = defaultdict(list)
        keys: dict[tuple, str] = {}
        for r in recs:
            sid, stage, reason, level, a, b = r
            key = keys.get((stage, reason, level))
            if key is None:
                key = keys[(stage, reason, level)] = f"{stage}:{reason}"
                ranks.setdefault(key, line_rank(stage, reason, level, self.chain))
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
        for c in chunks:
            a, b = c.offset, c.offset + c.duration
            self.total_in += c.duration
            if c.duration <= 0:
                self.unknown += c.failed  # e.g. a file that could not be decoded at all
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

    def result(self) -> dict[str, Any]:
        seconds = Counter(self.seconds)
        kept_s = seconds.pop("kept", 0.0)
        unaccounted = seconds.pop("unaccounted", 0.0)
        lines = [
            {"line": k, "hours": seconds.get(k, 0.0) / 3600, "records": self.records.get(k, 0)}
            for k in sorted(set(seconds) | set(self.records), key=lambda k: self.ranks.get(k, (99,)))
        ]
        removed = sum(x["hours"] for x in lines)
        return {
            "input_hours": self.total_in / 3600,
            "lines": lines,
            "removed_hours": removed,
            "kept_hours": kept_s / 3600,
            "unaccounted_hours": unaccounted / 3600,
            "total_hours": removed + (kept_s + unaccounted) / 3600,
            "failed_unknown_duration": self.unknown,  # failed chunks with no decoded audio: not in the hours
        }


class Reservoir:
    """A distribution's values in bounded memory: exact count, mean, min and max; percentiles (and
    the report's histograms) from a uniform sample of at most `size` values (seeded, so the same
    corpus gives the same figures)."""

    def __init__(self, size: int = 200_000, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.sample = np.zeros(0)
        self.n, self.total, self.lo, self.hi = 0, 0.0, np.inf, -np.inf

    def add(self, values) -> None:
        x = np.asarray(values, dtype=float)
        x = x[np.isfinite(x)]
        if not len(x):
            return
        self.total += float(x.sum())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        room = max(0, self.size - len(self.sample))
        self.sample = np.concatenate([self.sample, x[:room]])
        rest = x[room:]
        if len(rest):  # reservoir sampling (algorithm R), vectorised: item t replaces slot j < size
            t = self.n + room + np.arange(len(rest))
            j = (self.rng.random(len(rest)) * (t + 1)).astype(np.int64)
            hit = j < self.size
            self.sample[j[hit]] = rest[hit]
        self.n += len(x)

    def summary(self) -> dict[str, float] | None:
        if not self.n:
            return None
        p = np.percentile(self.sample, [5, 25, 50, 75, 95])
        return {"count": self.n, "mean": self.total / self.n, "min": self.lo, "p5": float(p[0]), "p25": float(p[1]),
                "median": float(p[2]), "p75": float(p[3]), "p95": float(p[4]), "max": self.hi}


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


CHUNK_COLUMNS = ["source_id", "uri", "chunk", "offset", "duration", "failed", "speakers"]
REJECTION_COLUMNS = ["source_id", "stage", "reason", "level", "start", "end"]


class _Chunk:
    """The commit-record columns the funnel reads."""
    __slots__ = ("source_id", "chunk", "offset", "duration", "failed")

    def __init__(self, source_id, chunk, offset, duration, failed):
        self.source_id, self.chunk, self.offset, self.duration, self.failed = source_id, chunk, offset, duration, failed


def corpus_stats(root: str, values: bool = False, chain: Chain = CHAIN) -> dict[str, Any]:
    """Totals, funnel and distribution summaries, read part by part (memory bounded by a few parts
    and the distributions' reservoirs); `values=True` also returns the distributions' sampled values
    under `distribution_values` (numpy arrays, for the report's figures)."""
    import pyarrow.compute as pc

    out = OutputDir(root)
    if problem := layout_problem(out):
        raise ValueError(problem)
    if not out.exists(CONFIG_FILE) and not committed_parts(out):
        raise FileNotFoundError(f"{out.root} is not a corpus made by `pipeline run` (no {CONFIG_FILE}, no {COMMITS}/)")
    f = Funnel(chain)
    n: Counter[str] = Counter()
    hours: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    errors_by_type: Counter[str] = Counter()
    errors_by_stage: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    by_level: Counter[str] = Counter()
    dists: dict[str, Reservoir] = defaultdict(Reservoir)
    failed_uris: set[str] = set()
    subs = {COMMITS: CHUNK_COLUMNS, "manifest": None, "rejected": REJECTION_COLUMNS, "errors": ["source_id", "chunk", "stage", "error_type"],
            SPEAKERS_DIR: ["source_id"]}
    for _, t in read_part_tables(out, subs, threads=2):
        if t[SPEAKERS_DIR] is not None:
            n["speaker_rows"] += t[SPEAKERS_DIR].num_rows
            n["linked_sources"] += pc.count_distinct(t[SPEAKERS_DIR]["source_id"]).as_py()
        n["shards"] += t["manifest"] is not None
        for ct, mt, rt, et in _slices(t[COMMITS], t["manifest"], t["rejected"], t["errors"]):
            c = {k: ct.column(k).to_pylist() for k in CHUNK_COLUMNS[:-1]}
            chunks = [_Chunk(*x) for x in zip(c["source_id"], c["chunk"], c["offset"], c["duration"], c["failed"])]
            n["chunks"] += len(chunks)
            n["sources"] += sum(1 for i in c["chunk"] if i == 0)
            failed_uris.update(u for u, bad in zip(c["uri"], c["failed"]) if bad)
            n["chunk_speakers"] += int(pc.sum(pc.list_value_length(ct["speakers"])).as_py() or 0)
            hours["input"] += sum(c["duration"]) / 3600
            errors = et.to_pylist() if et is not None else []
            for e in errors:
                errors_by_type[e["error_type"]] += 1
                errors_by_stage[e["stage"]] += 1
            recs = list(zip(*(_col(rt, k) for k in REJECTION_COLUMNS))) if rt is not None else []
            for (_, stage, reason, level, a, b) in recs:
                removed[f"{stage}:{reason}"] += b - a
                counted[f"{stage}:{reason}"] += 1
                by_level[level or "window"] += 1
            kept: dict[tuple[str, int], tuple[list, list]] = defaultdict(lambda: ([], []))
            if mt is not None:
                _manifest_part(mt, kept, n, hours, languages, dists)
            f.add(chunks, recs, kept, errors)
    incomplete = _incomplete(out)
    for e in incomplete:
        errors_by_type[e["error_type"]] += 1
        errors_by_stage[e["stage"]] += 1
    corpus_map = read_corpus_map(out, ["corpus_speaker", "confidence"])
    result = {
        "sources": n["sources"],
        "failed_sources": len(failed_uris),
        "chunks": n["chunks"],
        "shards": n["shards"],
        "samples": n["samples"],
        "input_hours": hours["input"],
        "audio_hours": hours["audio"],
        "speech_hours": hours["speech"],
        "utterances": n["utterances"],
        # Source speakers (speakers/); a corpus made without linking counts each chunk's speakers.
        "speakers": n["speaker_rows"] if n["linked_sources"] else n["chunk_speakers"],
        "linked_sources": n["linked_sources"],
        "corpus_speakers": pc.count_distinct(corpus_map["corpus_speaker"]).as_py() if corpus_map is not None else None,
        "corpus_links": {} if corpus_map is None else
        {v["values"]: v["counts"] for v in pc.value_counts(corpus_map["confidence"]).to_pylist()},
        "frames": n["frames"],
        "text_chars": n["text_chars"],
        # What the model sees: text tokens (chars / 3.5 + BOS/EOS per utterance), frames, and one
        # end-of-audio frame per utterance (stages/windows.py's budget).
        "text_tokens_estimate": int(n["text_chars"] / 3.5 + 2 * n["utterances"]),
        "positions_estimate": int(n["text_chars"] / 3.5 + 3 * n["utterances"] + n["frames"]),
        "languages": dict(languages),
        "errors": sum(errors_by_type.values()),
        "errors_by_type": dict(errors_by_type),
        "errors_by_stage": dict(errors_by_stage),
        "rejected": sum(counted.values()),
        "rejected_by_level": dict(by_level),
        "rejected_by_reason": dict(sorted(counted.items())),
        "rejected_hours_by_reason": {k: v / 3600 for k, v in sorted(removed.items())},
        "funnel": f.result(),
        "distributions": {k: r.summary() for k, r in sorted(dists.items())},
    }
    if values:
        result["distribution_values"] = {k: r.sample for k, r in sorted(dists.items())}
    return result


SLICE_CHUNKS = 1000  # chunks whose rows become Python objects at once (a 1 GB part holds thousands)


def _slices(ct, mt, rt, et):
    """A part's tables cut by source into slices of about SLICE_CHUNKS chunks: the funnel needs a
    chunk's rows together, and a source's rows are all in the part that holds its chunks."""
    import pyarrow.compute as pc

    sources = pc.unique(ct["source_id"]).sort()
    per_source = max(1, len(ct) // max(1, len(sources)))
    step = max(1, SLICE_CHUNKS // per_source)
    for i in range(0, len(sources), step):
        some = sources[i:i + step]
        yield tuple(None if t is None else t.filter(pc.is_in(t["source_id"], value_set=some)) for t in (ct, mt, rt, et))


def _incomplete(out: OutputDir) -> list[dict]:
    import pyarrow.parquet as pq

    if not out.exists(INCOMPLETE):
        return []
    return pq.read_table(out.path(INCOMPLETE), filesystem=out.fs, columns=["stage", "error_type"]).to_pylist()


def _manifest_part(mt, kept, n: Counter, hours: Counter, languages: Counter, dists: dict[str, Reservoir]) -> None:
    """One part's manifest: totals, distributions, and the kept windows and spans its funnel needs."""
    rows = mt.num_rows
    sids, chunk_idx = _col(mt, "source_id"), _col(mt, "chunk")
    m_start, m_end = _col(mt, "start"), _col(mt, "end")
    utts = _utterances(mt)
    has_utts = np.zeros(rows, dtype=bool)
    has_utts[utts["row"]] = True
    for i in range(rows):
        windows, spans = kept[(sids[i], chunk_idx[i])]
        windows.append((m_start[i], m_end[i]))
        if not has_utts[i]:
            spans.append((m_start[i], m_end[i]))
    for i, s, e in zip(utts["row"].tolist(), utts.get("start", np.zeros(0)).tolist(), utts.get("end", np.zeros(0)).tolist()):
        kept[(sids[i], chunk_idx[i])][1].append((s, e))
    n["samples"] += rows
    for col in ("text_chars", "utterances", "frames"):
        n[col] += int(np.nansum(_np(mt, col)))
    hours["audio"] += float(np.nansum(_np(mt, "duration"))) / 3600
    hours["speech"] += float(np.nansum(_np(mt, "speech_seconds"))) / 3600
    languages.update(_col(mt, "language"))
    for name, v in distributions_from(mt, utts).items():
        dists[name].add(v)


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
