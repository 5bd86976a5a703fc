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
3. The rejection records (`rejected/`), in pipeline order: VAD (`vad:no_speech` for a chunk with no
   speech at all; `vad:non_speech` for time outside every VAD speech region, itself split into
   pauses between kept utterances inside kept windows and the rest), ASR/utterances
   (`utterances:empty_transcript`), the utterance filters in their order, the windows stage
   (`utterance_over_budget`, `too_few_utterances`, `window_too_short`, `single_speaker`), the
   window filters in their order, and chunk-level `no_windows` last within its stage.
4. `unaccounted`: time no record claims (should be ~0; shown so a gap in the records is visible).

So a rejected utterance inside a rejected window counts for the utterance filter that dropped it,
and the silence inside a rejected window counts as VAD non-speech.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from pipeline.corpus import chunk_records, read_errors, read_parquet_dir
from stages.write import OutputDir

STAGE_ORDER = ["decode", "vad", "diarize", "asr", "utterances", "filters:utterance", "windows", "filters:window", "tokenize", "write"]
REASON_ORDER = {
    "vad": ["no_speech", "non_speech"],
    "utterances": ["empty_transcript"],
    "windows": ["utterance_over_budget", "too_few_utterances", "window_too_short", "single_speaker"],
}
PAUSES = "vad:non_speech (pauses between kept utterances)"


def _filter_order() -> tuple[list[str], set[str]]:
    """(all filter names in order, the window-level ones)."""
    from stages.filters import FILTER_ORDER, WINDOW_FILTERS

    return FILTER_ORDER, {f.name for f in WINDOW_FILTERS}


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(iv: list[tuple[float, float]], taken: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of a sorted disjoint list not inside another sorted disjoint list."""
    out = []
    for a, b in iv:
        cur = a
        for c, d in taken[max(0, bisect.bisect_left(taken, (a, a)) - 1) :]:
            if c >= b:
                break
            if d <= cur:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def _length(iv: list[tuple[float, float]]) -> float:
    return float(sum(b - a for a, b in iv))


def _intersect(iv: list[tuple[float, float]], other: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return _subtract(iv, _subtract(iv, other))


def line_key(stage: str, reason: str, level: str | None) -> str:
    if stage == "filters":
        return f"filters:{reason}"
    return f"{stage}:{reason}"


def line_rank(stage: str, reason: str, level: str | None) -> tuple:
    """Sort key: pipeline order, then reason order within the stage; chunk-level last in a stage."""
    if stage == "filters":
        order, window_names = _filter_order()
        window = level in ("window", "chunk") or reason in window_names
        s = STAGE_ORDER.index("filters:window" if window else "filters:utterance")
    else:
        s = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
        order = REASON_ORDER.get(stage, [])
    r = order.index(reason) if reason in order else len(order)
    return (s, level == "chunk", r, reason)


def funnel(chunks: list[dict], rejected: list[dict], manifest: list[dict], errors: list[dict]) -> dict[str, Any]:
    """Hours in, attributed to exactly one line each (see the module doc). Returns
    {input_hours, kept_hours, lines: [{line, hours, records}], unaccounted_hours, total_hours}."""
    error_stage: dict[tuple[str, int], str] = {}
    for e in errors:
        if e.get("chunk") is not None:
            error_stage.setdefault((e["source_id"], e["chunk"]), e["stage"])
    rej_by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rejected:
        rej_by_source[r["source_id"]].append(r)
    man_by_source: dict[str, list[dict]] = defaultdict(list)
    for m in manifest:
        man_by_source[m["source_id"]].append(m)

    seconds: Counter[str] = Counter()
    records: Counter[str] = Counter()
    ranks: dict[str, tuple] = {}
    total_in = 0.0
    for r in rejected:
        key = line_key(r["stage"], r["reason"], r.get("level"))
        records[key] += 1
        ranks.setdefault(key, line_rank(r["stage"], r["reason"], r.get("level")))
    for c in chunks:
        a, b = c["offset"], c["offset"] + c["duration"]
        total_in += c["duration"]
        if c["duration"] <= 0:
            continue
        if c.get("failed"):
            stage = error_stage.get((c["source_id"], c["chunk"]), "unknown")
            seconds[f"error:{stage}"] += c["duration"]
            ranks.setdefault(f"error:{stage}", (-2,))
            records[f"error:{stage}"] += 1
            continue
        sid = c["source_id"]
        rows = [m for m in man_by_source.get(sid, ()) if m.get("chunk") == c["chunk"]]
        windows = _union([(max(a, m["start"]), min(b, m["end"])) for m in rows])
        spans = []
        for m in rows:
            uq = m.get("utterance_quality")
            spans += [(u["start"], u["end"]) for u in uq] if uq else [(m["start"], m["end"])]
        taken = _union([(max(a, s), min(b, e)) for s, e in spans])
        seconds["kept"] += _length(taken)
        by_line: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rej_by_source.get(sid, ()):
            if r["end"] > a and r["start"] < b:
                by_line[line_key(r["stage"], r["reason"], r.get("level"))].append((max(a, r["start"]), min(b, r["end"])))
        for key in sorted(by_line, key=lambda k: ranks[k]):
            new = _subtract(_union(by_line[key]), taken)
            if key == "vad:non_speech":
                inside = _intersect(new, windows)
                seconds[PAUSES] += _length(inside)
                seconds[key] += _length(new) - _length(inside)
                ranks.setdefault(PAUSES, ranks[key][:1] + (False, -1, ""))
            else:
                seconds[key] += _length(new)
            taken = _union(taken + new)
        seconds["unaccounted"] += max(0.0, (b - a) - _length(taken))
    kept = seconds.pop("kept", 0.0)
    unaccounted = seconds.pop("unaccounted", 0.0)
    lines = [
        {"line": k, "hours": seconds.get(k, 0.0) / 3600, "records": records.get(k, 0) if k != PAUSES else 0}
        for k in sorted(set(seconds) | set(records), key=lambda k: ranks.get(k, (99,)))
    ]
    removed = sum(x["hours"] for x in lines)
    return {
        "input_hours": total_in / 3600,
        "lines": lines,
        "removed_hours": removed,
        "kept_hours": kept / 3600,
        "unaccounted_hours": unaccounted / 3600,
        "total_hours": removed + (kept + unaccounted) / 3600,
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    x = np.asarray(values, dtype=float)
    p = np.percentile(x, [5, 25, 50, 75, 95])
    return {"count": int(len(x)), "mean": float(x.mean()), "min": float(x.min()), "p5": float(p[0]), "p25": float(p[1]),
            "median": float(p[2]), "p75": float(p[3]), "p95": float(p[4]), "max": float(x.max())}


def distributions(manifest: list[dict]) -> dict[str, list[float]]:
    """Raw values for the distributions (windows from manifest columns, utterances from each
    row's `utterance_quality`)."""
    d: dict[str, list[float]] = defaultdict(list)
    for m in manifest:
        d["window_seconds"].append(m["duration"])
        d["speakers_per_window"].append(m["speakers"])
        for col in ("speech_ratio", "snr_db"):
            if m.get(col) is not None:
                d[col].append(m[col])
        uq = m.get("utterance_quality") or []
        for u in uq:
            d["utterance_seconds"].append(u["end"] - u["start"])
            d["chars_per_second"].append(u["chars_per_second"])
            d["avg_logprob"].append(u["avg_logprob"])
            d["no_speech_prob"].append(u["no_speech_prob"])
            d["overlap_ratio"].append(u["overlap_ratio"])
        for x, y in zip(uq, uq[1:]):
            if x["speaker"] != y["speaker"]:
                d["turn_gap_seconds"].append(y["start"] - x["end"])
        if not uq:  # manifests without per-utterance facts: window-level stand-ins
            d["avg_logprob"].append(m["avg_logprob"])
            if m["duration"] > 0:
                d["overlap_ratio"].append(m["overlap_seconds"] / max(m.get("speech_seconds", m["duration"]), 1e-6))
    return dict(d)


def corpus_stats(root: str, values: bool = False) -> dict[str, Any]:
    """Totals, funnel and distribution summaries; `values=True` also returns the raw distribution
    values under `distribution_values` (for the report's figures; not JSON-sized)."""
    out = OutputDir(root)
    manifest = read_parquet_dir(out, "manifest").to_pylist()
    rejected = read_parquet_dir(out, "rejected").to_pylist()
    chunks = chunk_records(out)
    errors = read_errors(out)
    input_seconds = sum(c["duration"] for c in chunks)
    removed: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    for r in rejected:
        removed[f"{r['stage']}:{r['reason']}"] += r["duration"]
        counted[f"{r['stage']}:{r['reason']}"] += 1
    dists = distributions(manifest)
    speech = sum(m["speech_seconds"] for m in manifest)
    result = {
        "sources": len({c["uri"] for c in chunks}),
        "failed_sources": len({c["uri"] for c in chunks if c["failed"]}),
        "chunks": len(chunks),
        "shards": len({m["shard"] for m in manifest}),
        "samples": len(manifest),
        "input_hours": input_seconds / 3600,
        "audio_hours": sum(m["duration"] for m in manifest) / 3600,
        "speech_hours": speech / 3600,
        "utterances": sum(m["utterances"] for m in manifest),
        # Speakers are labelled per source: count distinct (source, label) pairs.
        "speakers": len({(m["source_id"], s) for m in manifest for s in m["speaker_labels"]}),
        "frames": sum(m["frames"] for m in manifest),
        "text_chars": sum(m["text_chars"] for m in manifest),
        # What the model sees: text tokens (chars / 3.5 + BOS/EOS per utterance), frames, and one
        # end-of-audio frame per utterance (stages/windows.py's budget).
        "text_tokens_estimate": int(sum(m["text_chars"] / 3.5 + 2 * m["utterances"] for m in manifest)),
        "positions_estimate": int(sum(m["text_chars"] / 3.5 + 3 * m["utterances"] + m["frames"] for m in manifest)),
        "languages": dict(Counter(m["language"] for m in manifest)),
        "errors": len(errors),
        "errors_by_type": dict(Counter(e["error_type"] for e in errors)),
        "errors_by_stage": dict(Counter(e["stage"] for e in errors)),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(counted.items())),
        "rejected_hours_by_reason": {k: v / 3600 for k, v in sorted(removed.items())},
        "funnel": funnel(chunks, rejected, manifest, errors),
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
        f"speakers       {s['speakers']}",
        f"frames         {s['frames']} ({s['frames'] / 12.5 / 3600:.3f} h of codes)",
        f"text chars     {s['text_chars']} (~{s['text_tokens_estimate']} text tokens; ~{s['positions_estimate']} model positions)",
        f"languages      {', '.join(f'{k}: {v}' for k, v in s['languages'].items()) or '-'}",
        f"errors         {s['errors']}  {s['errors_by_type'] or ''}",
        f"rejected       {s['rejected']} records",
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
