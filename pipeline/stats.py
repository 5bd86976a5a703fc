"""`pipeline stats`: what is in a corpus, from the manifests and chunk records (never the tars),
so it takes seconds on thousands of shards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.corpus import chunk_records, read_errors, read_parquet_dir
from stages.write import OutputDir


def corpus_stats(root: str) -> dict[str, Any]:
    out = OutputDir(root)
    manifest = read_parquet_dir(out, "manifest").to_pylist()
    rejected = read_parquet_dir(out, "rejected").to_pylist()
    chunks = chunk_records(out)
    errors = read_errors(out)
    input_seconds = sum(c["duration"] for c in chunks)
    removed: Counter[str] = Counter()
    for r in rejected:
        removed[f"{r['stage']}:{r['reason']}"] += r["duration"]
    return {
        "sources": len({c["uri"] for c in chunks}),
        "failed_sources": len({c["uri"] for c in chunks if c["failed"]}),
        "chunks": len(chunks),
        "shards": len({m["shard"] for m in manifest}),
        "samples": len(manifest),
        "input_hours": input_seconds / 3600,
        "audio_hours": sum(m["duration"] for m in manifest) / 3600,
        "speech_hours": sum(m["speech_seconds"] for m in manifest) / 3600,
        "utterances": sum(m["utterances"] for m in manifest),
        # Speakers are labelled per source: count distinct (source, label) pairs.
        "speakers": len({(m["source_id"], s) for m in manifest for s in m["speaker_labels"]}),
        "frames": sum(m["frames"] for m in manifest),
        "text_chars": sum(m["text_chars"] for m in manifest),
        "languages": dict(Counter(m["language"] for m in manifest)),
        "errors": len(errors),
        "errors_by_type": dict(Counter(e["error_type"] for e in errors)),
        "errors_by_stage": dict(Counter(e["stage"] for e in errors)),
        "rejected": len(rejected),
        "rejected_hours_by_reason": {k: v / 3600 for k, v in sorted(removed.items())},
    }


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
        f"text chars     {s['text_chars']}",
        f"languages      {', '.join(f'{k}: {v}' for k, v in s['languages'].items()) or '-'}",
        f"errors         {s['errors']}  {s['errors_by_type'] or ''}",
        f"rejected       {s['rejected']}",
    ]
    lines += [f"  {reason:<28} {hours:.4f} h" for reason, hours in s["rejected_hours_by_reason"].items()]
    return "\n".join(lines)
