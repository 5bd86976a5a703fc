"""`pipeline stats DIR --report FILE.html`: the stats as an HTML page with PNG figures (matplotlib,
Agg backend) written next to it, named `<FILE stem>-<figure>.png`. Reads what `corpus_stats`
reads (manifests, rejection and chunk records), never the tars."""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from pipeline.stats import corpus_stats, format_stats

_TITLES = {
    "window_seconds": ("Window duration", "seconds"),
    "utterance_seconds": ("Utterance duration", "seconds"),
    "speakers_per_window": ("Speakers per window", "speakers"),
    "chars_per_second": ("Speaking rate", "characters / second"),
    "turn_gap_seconds": ("Gap between turns (negative: overlap)", "seconds"),
    "overlap_ratio": ("Overlapped speech per utterance", "share of the utterance"),
    "avg_logprob": ("ASR confidence", "average token log probability"),
    "no_speech_prob": ("ASR no-speech probability", "probability"),
    "speech_ratio": ("Speech ratio per window", "VAD speech / window length"),
    "snr_db": ("Estimated SNR per window", "dB"),
    "dnsmos_ovrl": ("DNSMOS P.835 overall quality per window", "MOS (1-5)"),
}


def _funnel_figure(plt, f: dict[str, Any], path: str) -> None:
    labels = ["audio in"] + [x["line"] for x in f["lines"]]
    values = [f["input_hours"]] + [x["hours"] for x in f["lines"]]
    if f["unaccounted_hours"] > 0:
        labels.append("unaccounted")
        values.append(f["unaccounted_hours"])
    labels.append("kept")
    values.append(f["kept_hours"])
    colors = ["#4c72b0"] + ["#c44e52"] * (len(labels) - 2) + ["#55a868"]
    scale, unit = (1.0, "h") if f["input_hours"] >= 2 else (3600.0, "s")
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, [v * scale for v in values], color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("hours of audio" if unit == "h" else "seconds of audio")
    ax.set_title("Funnel: where the input audio went")
    for yi, v in zip(y, values):
        ax.text(v * scale, yi, f" {v * scale:.{3 if unit == 'h' else 1}f} {unit}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hist_figure(plt, name: str, values: list[float], path: str) -> None:
    title, xlabel = _TITLES.get(name, (name, name))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    lo, hi = float(np.min(values)), float(np.max(values))
    # Values that differ by float rounding only (a probability at 1.0 and 1 - 1e-16) leave numpy
    # no range to cut into bins: one bar.
    bins = 1 if hi - lo <= 1e3 * np.spacing(max(abs(lo), abs(hi))) else min(40, max(5, len(np.unique(values))))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_title(f"{title} (n={len(values)})", fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bar_figure(plt, title: str, counts: dict[str, int], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    keys = sorted(counts, key=counts.get, reverse=True)[:20]
    ax.bar(keys, [counts[k] for k in keys], color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("samples", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(corpus_dir: str, html_path: str) -> list[str]:
    """Write the HTML report and its PNG figures (next to it); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = corpus_stats(corpus_dir, values=True)
    dists = stats.pop("distribution_values")
    html_path = os.path.abspath(html_path)
    folder, stem = os.path.dirname(html_path), os.path.splitext(os.path.basename(html_path))[0]
    os.makedirs(folder, exist_ok=True)
    pngs: list[str] = []
    figures: list[tuple[str, str]] = []  # (file name, caption)

    def png(name: str) -> str:
        path = os.path.join(folder, f"{stem}-{name}.png")
        pngs.append(path)
        return path

    if stats["funnel"]["input_hours"] > 0:
        _funnel_figure(plt, stats["funnel"], png("funnel"))
        figures.append((os.path.basename(pngs[-1]), "Funnel"))
    for name in _TITLES:
        values = np.asarray(dists.get(name, []), dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            _hist_figure(plt, name, values, png(name))
            figures.append((os.path.basename(pngs[-1]), _TITLES[name][0]))
    if stats["languages"]:
        _bar_figure(plt, "Language", stats["languages"], png("language"))
        figures.append((os.path.basename(pngs[-1]), "Language"))

    f = stats["funnel"]
    rows = [("audio in", f["input_hours"], "")] + [(x["line"], x["hours"], x["records"] or "") for x in f["lines"]]
    if f["unaccounted_hours"] > 0:
        rows.append(("unaccounted", f["unaccounted_hours"], ""))
    rows.append(("kept (utterance audio in samples)", f["kept_hours"], ""))
    funnel_rows = "\n".join(
        f"<tr><td>{html.escape(str(a))}</td><td class=n>{h:.4f}</td><td class=n>{h * 3600:.1f}</td><td class=n>{r}</td></tr>"
        for a, h, r in rows
    )
    totals = [
        ("sources", f"{stats['sources']} ({stats['failed_sources']} failed)"),
        ("samples", stats["samples"]),
        ("shards", stats["shards"]),
        ("input audio", f"{stats['input_hours']:.3f} h"),
        ("kept windows", f"{stats['audio_hours']:.3f} h ({stats['speech_hours']:.3f} h of speech)"),
        ("utterances", stats["utterances"]),
        ("speakers", stats["speakers"]),
        ("frames", stats["frames"]),
        ("text tokens (estimate)", stats["text_tokens_estimate"]),
        ("errors", f"{stats['errors']} {stats['errors_by_type'] or ''}"),
    ]
    total_rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in totals)
    imgs = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption in figures
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>csm-corpus report: {html.escape(str(corpus_dir))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 14px; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 0.5em; }}
pre {{ background: #f6f6f6; padding: 1em; font-size: 12px; }}
</style></head><body>
<h1>csm-corpus report</h1>
<p>{html.escape(str(corpus_dir))}</p>
<h2>Totals</h2>
<table>{total_rows}</table>
<h2>Funnel</h2>
<p>Every second of input is counted once, by the first reason in pipeline order (see pipeline/stats.py).</p>
<table><tr><th>line</th><th>hours</th><th>seconds</th><th>records</th></tr>
{funnel_rows}</table>
<h2>Figures</h2>
{imgs}
<h2>As text</h2>
<pre>{html.escape(format_stats(stats))}</pre>
</body></html>
"""
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return pngs
