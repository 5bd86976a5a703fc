"""`pipeline stats`: the funnel adds up (constructed records, and a real run), distributions, and
the HTML report renders with images that open."""

from __future__ import annotations

import glob
import json
import math
import re
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.stats import PAUSES, corpus_stats, format_stats, funnel, line_rank
from stages.corpus_format import ChunkRecord
from tests.conftest import run_cli


def _chunk(chunk, offset, duration, failed=False):
    return ChunkRecord("s", "u", chunk, False, offset, duration, 150.0, None, 0, 0, 0, 0, 0, [], failed, None, None)


def _rej(stage, reason, start, end, level="utterance"):
    return {"source_id": "s", "stage": stage, "reason": reason, "start": start, "end": end, "level": level, "metric": None}


def test_funnel_attributes_every_second_once_in_pipeline_order():
    chunks = [_chunk(0, 0.0, 100.0), _chunk(1, 100.0, 50.0, failed=True)]
    errors = [{"source_id": "s", "chunk": 1, "stage": "asr", "error_type": "RuntimeError"}]
    manifest = [{"source_id": "s", "chunk": 0, "start": 10.0, "end": 30.0, "utterance_quality": [{"start": 10.0, "end": 15.0}, {"start": 16.0, "end": 30.0}]}]
    rejected = [
        # listed out of order on purpose: attribution follows the pipeline, not the file
        _rej("windows", "window_too_short", 50.0, 60.0, "window"),
        _rej("filter_utterances", "text_in_silence", 55.0, 57.0),
        _rej("filter_utterances", "text_in_silence", 40.0, 50.0),
        *[_rej("vad", "non_speech", a, b, "region") for a, b in [(0, 10), (15, 16), (30, 40), (52, 53), (60, 100)]],
        _rej("filter_windows", "snr", 120.0, 130.0, "window"),  # inside the failed chunk: the error wins
    ]
    f = funnel(chunks, rejected, manifest, errors)
    got = {x["line"]: round(x["hours"] * 3600, 6) for x in f["lines"]}
    assert got == {
        "error:asr": 50.0,
        PAUSES: 1.0,  # the pause between the two kept utterances
        "vad:non_speech": 61.0,
        "filter_utterances:text_in_silence": 12.0,  # inside the rejected window, the utterance filter came first
        "windows:window_too_short": 7.0,
        "filter_windows:snr": 0.0,
    }
    assert [x["line"] for x in f["lines"]] == [
        "error:asr", PAUSES, "vad:non_speech", "filter_utterances:text_in_silence", "windows:window_too_short", "filter_windows:snr"]
    assert f["kept_hours"] * 3600 == pytest.approx(19.0)
    assert f["unaccounted_hours"] == 0.0
    assert f["total_hours"] == pytest.approx(f["input_hours"]) == pytest.approx(150 / 3600)


def test_funnel_order_is_the_chain_order():
    from stages.chain import CHAIN

    ranks = [line_rank(name, reason, "utterance") for name, reasons in CHAIN.funnel_order() for reason in reasons]
    assert ranks == sorted(ranks)
    assert line_rank("windows", "no_windows", "chunk") > line_rank("windows", "single_speaker", "window")  # chunk-level last
    # Older corpora named both filter stages `filters`: each reason ranks with the stage that declares it now.
    assert line_rank("filters", "snr", "window")[0] == line_rank("filter_windows", "snr", "window")[0]
    assert line_rank("filters", "repetition", "utterance")[0] == line_rank("filter_utterances", "repetition", "utterance")[0]


def test_funnel_shows_time_no_record_claims():
    chunks = [_chunk(0, 0.0, 10.0)]
    f = funnel(chunks, [_rej("vad", "non_speech", 0.0, 4.0, "region")], [], [])
    assert f["unaccounted_hours"] * 3600 == pytest.approx(6.0)
    assert f["total_hours"] == pytest.approx(f["input_hours"])


# --------------------------------------------------------------------------------- a real run


def _samples(out: Path) -> list[dict]:
    metas = []
    for shard in sorted(glob.glob(str(out / "shards" / "*.tar"))):
        with tarfile.open(shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def test_funnel_adds_up_over_a_real_run(embedded_run):
    s = corpus_stats(str(embedded_run))
    f = s["funnel"]
    assert f["input_hours"] * 3600 == pytest.approx(30.0, abs=0.01)
    # In = kept + every removal line (+ unaccounted), to rounding.
    removed = sum(x["hours"] for x in f["lines"])
    assert (f["kept_hours"] + removed + f["unaccounted_hours"]) * 3600 == pytest.approx(30.0, abs=1e-6)
    assert f["unaccounted_hours"] * 3600 < 0.05  # every second of input has a record
    lines = {x["line"]: x for x in f["lines"]}
    assert lines["vad:non_speech"]["hours"] > 0  # the sample starts with ~6.7 s of silence
    assert lines["vad:non_speech"]["records"] >= 1
    # Kept = the utterance audio of the samples in the shards (tars read here, for the check only).
    metas = _samples(embedded_run)
    assert metas and s["samples"] == len(metas)
    kept = sum(u["end"] - u["start"] for m in metas for u in m["utterances"])
    assert f["kept_hours"] * 3600 == pytest.approx(kept, abs=1e-6)
    # Every rejection record has a known reason and its removed time is in the funnel.
    rejected = pq.read_table(embedded_run / "rejected").to_pylist() if glob.glob(str(embedded_run / "rejected/*.parquet")) else []
    for r in rejected:
        key = f"{r['stage']}:{r['reason']}"
        assert key in lines and r["end"] >= r["start"]
    # Distributions come from the manifest alone.
    d = s["distributions"]
    assert d["utterance_seconds"]["count"] == s["utterances"]
    assert d["window_seconds"]["count"] == s["samples"]
    for name in ("speakers_per_window", "chars_per_second", "avg_logprob", "overlap_ratio", "snr_db", "speech_ratio", "dnsmos_ovrl"):
        assert d[name] and math.isfinite(d[name]["mean"])
    text = format_stats(s)
    assert "funnel" in text and "kept (utterance audio in samples)" in text and "chars_per_second" in text


def test_real_windows_respect_the_budget_and_the_source(embedded_run):
    from stages.windows import WindowsConfig, audio_frames

    cfg = WindowsConfig()
    rows = {r["key"]: r for r in pq.read_table(embedded_run / "manifest").to_pylist()}
    for m in _samples(embedded_run):
        utts = m["utterances"]
        used = sum(
            math.ceil(len(f"[{u['speaker']}]{u['text']}") / cfg.chars_per_token) + 2 + audio_frames(u["end"] - u["start"]) + 1
            for u in utts
        )
        assert used <= cfg.max_positions
        assert m["end"] - m["start"] >= cfg.min_seconds
        for a, b in zip(utts, utts[1:]):
            assert a["start"] <= b["start"]
        for u in utts:
            assert 0 <= u["start"] < u["end"] <= m["source"]["duration"] + 1e-6
        q = m["quality"]
        assert {"snr_db", "speech_ratio", "clipping_ratio", "chars_per_second"} <= set(q)
        assert [(x["start"], x["end"]) for x in q["utterance_quality"]] == [(u["start"], u["end"]) for u in utts]
        row = rows[m["key"]]
        assert row["snr_db"] == q["snr_db"] and len(row["utterance_quality"]) == len(utts)


def test_stats_cli_prints_the_funnel(embedded_run):
    result = run_cli(["stats", str(embedded_run)])
    assert result.exit_code == 0, result.output
    assert "audio in" in result.output and "vad:non_speech" in result.output
    js = json.loads(run_cli(["stats", str(embedded_run), "--json"]).output)
    assert js["funnel"]["input_hours"] == pytest.approx(30.0 / 3600, abs=1e-5)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_report_renders_and_its_images_open(embedded_run, tmp_path):
    from PIL import Image

    from pipeline.report import write_report

    html_path = tmp_path / "site" / "report.html"
    pngs = write_report(str(embedded_run), str(html_path))
    page = html_path.read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.src) == len(pngs) >= 8
    assert sorted(str(html_path.parent / s) for s in parser.src) == sorted(pngs)
    for src in parser.src:
        with Image.open(html_path.parent / src) as im:
            im.verify()
        with Image.open(html_path.parent / src) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert "report-funnel.png" in parser.src
    assert re.search(r"<td>kept \(utterance audio in samples\)</td>", page)


def test_stats_cli_writes_the_report(embedded_run, tmp_path):
    from tests.conftest import run_cli

    html = tmp_path / "r" / "corpus.html"
    result = run_cli(["stats", str(embedded_run), "--report", str(html)])
    assert result.exit_code == 0, result.output
    assert html.exists() and list(html.parent.glob("*.png"))
