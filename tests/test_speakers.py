"""One labelling per source, a robust speaker count, and corpus speakers (stages/speakers.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest_audio import SCRIPT, VOICE_A, VOICE_B, conversation, have_espeak
from diarize_chunks import diarize_chunks, linked_turns

from stages.corpus_format import ChunkRecord, OutputDir
from stages.diarize import DiarizeConfig
from stages.speakers import link_corpus, link_source, read_speakers
from tests.conftest import commit_records
from train.speakers import SpeakerLabels
from stages.utterances import assign_speaker
from tests.test_diarize import offline_stage  # noqa: F401 (a fixture)
from tests.test_reliability import EACH, FAST, cli, corpus_files, finish, reference  # noqa: F401 (a fixture)

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
THRESHOLD = DiarizeConfig().link_threshold


def _voices(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [v / np.linalg.norm(v) for v in rng.normal(size=(n, 256))]


def _near(v, rng, noise=0.03):
    x = v + noise * rng.normal(size=v.shape)
    return [float(a) for a in x / np.linalg.norm(x)]


def record(chunk, speakers, last=False, sid="src"):
    return ChunkRecord(sid, f"dir/{sid}.wav", chunk, last, 10.0 * chunk, 10.0, 30.0, None, 0, 0, 0, 0.0, 0, [], False,
                       None, None, speakers=speakers)


# --- linking from records (no models) -------------------------------------------------------


def test_labels_follow_the_voice_across_chunks_and_speakers_of_a_chunk_join_only_when_short():
    A, B, _ = _voices()
    rng = np.random.default_rng(1)
    recs = [record(0, {"S0": {"seconds": 6, "embedding": _near(A, rng)}, "S1": {"seconds": 6, "embedding": _near(B, rng)}}),
            # chunk 1 starts with voice B: its local S0 is B
            record(1, {"S0": {"seconds": 6, "embedding": _near(B, rng)}, "S1": {"seconds": 6, "embedding": _near(A, rng)}}),
            # one chunk's two short labels on one voice: the diarizer split it in small clusters
            record(2, {"S0": {"seconds": 3, "embedding": _near(A, rng)}, "S1": {"seconds": 2.5, "embedding": _near(A, rng)}}),
            # two long labels of one chunk: told apart on enough speech, they stay apart however close
            record(3, {"S0": {"seconds": 8, "embedding": _near(A, rng)}, "S1": {"seconds": 8, "embedding": _near(A, rng)}}, True)]
    rows = link_source(recs, THRESHOLD, 5.0)
    got = {(c["chunk"], c["label"]): r["speaker"] for r in rows for c in r["chunks"]}
    assert got[(0, "S0")] == got[(1, "S1")] == "S0" and got[(0, "S1")] == got[(1, "S0")] == "S1"
    assert got[(2, "S0")] == got[(2, "S1")] == "S0"
    assert got[(3, "S0")] != got[(3, "S1")]
    assert all(c["distance"] < 0.2 for r in rows for c in r["chunks"])  # noise is ~0.1 from the voice
    assert link_source(list(reversed(recs)), THRESHOLD, 5.0) == rows  # order of arrival does not matter


def test_a_short_stray_cluster_is_folded_into_the_nearest_real_speaker():
    A, B, C, D = _voices(n=4)
    rng = np.random.default_rng(2)
    stray = _near(A + 1.2 * C, rng, 0.0)  # a third cluster, beyond the threshold from A but nearer A than B
    recs = [record(0, {"S0": {"seconds": 8, "embedding": _near(A, rng)}, "S1": {"seconds": 7, "embedding": _near(B, rng)},
                       "S2": {"seconds": 1.5, "embedding": stray}}),
            record(1, {"S0": {"seconds": 9, "embedding": _near(B, rng)}, "S1": {"seconds": 2.0, "embedding": _near(D, rng)}}, True)]
    rows = link_source(recs, THRESHOLD, 5.0)
    assert [r["speaker"] for r in rows] == ["S0", "S1"]  # the count: two speakers over the source
    a = {(c["chunk"], c["label"]): c for c in rows[0]["chunks"]}
    assert a[(0, "S2")]["folded"] and not a[(0, "S0")]["folded"]
    assert rows[0]["seconds"] == 8 + 1.5 + (2.0 if (1, "S1") in a else 0)
    assert sum(r["seconds"] for r in rows) == 8 + 7 + 1.5 + 9 + 2
    # the embedding is the real speaker's, not pulled toward the folded cluster
    assert np.allclose(rows[0]["embedding"], recs[0].speakers["S0"]["embedding"], atol=1e-4)
    # nothing folded when the bar is lower than the short clusters' speech: A, B, the stray, D
    assert len(link_source(recs, THRESHOLD, 1.0)) == 4


def test_a_short_source_keeps_two_short_speakers():
    A, B, _ = _voices()
    cfg = DiarizeConfig()
    recs = [record(0, {"S0": {"seconds": 5, "embedding": list(A)}, "S1": {"seconds": 4, "embedding": list(B)}}, True)]
    assert len(link_source(recs, cfg.link_threshold, cfg.min_speaker_seconds, cfg.min_speaker_share)) == 2
    assert len(link_source(recs, cfg.link_threshold, cfg.min_speaker_seconds)) == 1  # by seconds alone: one


def test_channels_link_by_channel_and_a_source_without_speech_has_an_empty_map(tmp_path):
    recs = [record(0, {"S0": {"seconds": 3, "channel": 1}, "S1": {"seconds": 3, "channel": 0}}),
            record(1, {"S0": {"seconds": 3, "channel": 0}, "S1": {"seconds": 3, "channel": 1}}, True)]
    rows = link_source(recs, THRESHOLD, 0.0)
    assert [sorted((c["chunk"], c["label"]) for c in r["chunks"]) for r in rows] == [[(0, "S0"), (1, "S1")], [(0, "S1"), (1, "S0")]]
    out = OutputDir(str(tmp_path))
    out.makedirs()
    commit_records(out, [record(0, {}, True, sid="quiet")], THRESHOLD, 5.0)
    assert pq.read_table(tmp_path / "commits").num_rows == 1 and read_speakers(out) == []


def test_link_corpus_groups_sources_and_says_how_sure_each_link_is():
    A, B, C = _voices()
    rng = np.random.default_rng(3)

    def spk(sid, speaker, v, d):
        return {"source_id": sid, "speaker": speaker, "seconds": 30.0, "embedding": _near(v, rng), "source_dir": d}

    rows = [spk("x1", "S0", A, "show1"), spk("x1", "S1", B, "show1"), spk("x2", "S0", B, "show1"), spk("x2", "S1", A, "show1"),
            spk("y1", "S0", A, "show2"), spk("y1", "S1", C, "show2")]
    flat = {(r["source_id"], r["speaker"]): r for r in link_corpus(rows, THRESHOLD)}
    assert flat[("x1", "S0")]["corpus_speaker"] == flat[("x2", "S1")]["corpus_speaker"] == flat[("y1", "S0")]["corpus_speaker"]
    assert flat[("x1", "S0")]["confidence"] == "high" and flat[("y1", "S1")]["confidence"] == "single"
    grouped = {(r["source_id"], r["speaker"]): r for r in link_corpus(rows, THRESHOLD, "source_dir")}
    assert grouped[("x1", "S0")]["corpus_speaker"] == grouped[("x2", "S1")]["corpus_speaker"]
    assert grouped[("y1", "S0")]["corpus_speaker"] != grouped[("x1", "S0")]["corpus_speaker"]  # another show
    assert len({r["corpus_speaker"] for r in grouped.values()}) == 4


def test_trainer_labels_go_through_the_source_map(tmp_path):
    from stages.corpus_format import Sample, SampleUtterance, SourceInfo

    A, B, _ = _voices()
    out = OutputDir(str(tmp_path))
    out.makedirs()
    commit_records(out, [record(0, {"S0": {"seconds": 6, "embedding": list(A)}, "S1": {"seconds": 6, "embedding": list(B)}}),
                                record(1, {"S0": {"seconds": 6, "embedding": list(B)}}, True)], THRESHOLD, 5.0)
    utt = [SampleUtterance("S0", 10.0, 11.0, "hi", 0, (0, 1), 0.0, 0.0, 0.0)]
    sample = Sample("src-c0001-w0000", SourceInfo("dir/src.wav", "src", 30.0, 16000, 1), 1, 10.0, 11.0, "en", utt, {}, {}, {})
    mapped = SpeakerLabels().apply(sample, f"{tmp_path}/shards/shard-src-c0001.tar")
    assert mapped.utterances[0].speaker == "S1"
    # a packed corpus (pipeline pack copies speakers/ next to train/ and val/) maps the same way
    utt[0].speaker = "S0"
    assert SpeakerLabels().apply(sample, f"{tmp_path}/train/shard-000000.tar").utterances[0].speaker == "S1"


def test_trainer_corpus_speaker_ids_give_one_voice_one_id_across_files(tmp_path):
    """data.speaker_ids=corpus: two files whose speakers link to one corpus speaker give its lines one id."""
    import re

    import webdataset as wds

    from stages.speakers import write_corpus_map
    from train.config import DataConfig
    from train.data import SampleDecoder, preflight
    from train.testing import make_shards, tiny_tokenizer

    A, B, _ = _voices()
    make_shards(tmp_path, n_shards=2, per_shard=3)  # sources synthetic-0000000000/1, chunk labels SPEAKER_00/01
    out = OutputDir(str(tmp_path))
    out.makedirs()
    for n, (v0, v1) in enumerate([(A, B), (B, A)]):  # the second file has the voices the other way round
        commit_records(out, [record(0, {"SPEAKER_00": {"seconds": 9, "embedding": list(v0)},
                                               "SPEAKER_01": {"seconds": 9, "embedding": list(v1)}}, True,
                                           sid=f"synthetic-{n:010x}")], THRESHOLD, 5.0)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    tok = tiny_tokenizer(tmp_path / "tok")

    def ids(speaker_ids):
        """{(source, chunk label): set of speaker ids the trainer writes in its text rows}"""
        decoder = SampleDecoder(tok, DataConfig(speaker_ids=speaker_ids, allow_unreleased_codec=True), 32)
        got: dict = {}
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            labels = [u["speaker"] for u in json.loads(raw["json"])["utterances"]]
            r = decoder(raw)
            text = tok.decode(r["tokens"][r["mask"][:, 32], 32])
            for label, spk in zip(labels, re.findall(r"\[ (\d+) \]", text)):
                got.setdefault((raw["__key__"].rsplit("-c", 1)[0].rsplit("-", 1)[1], label), set()).add(spk)
        return got

    with pytest.raises(FileNotFoundError, match="data.speaker_ids=corpus.*speaker_map.parquet.*link-speakers"):
        ids("corpus")
    # ... and before training starts: the trainer's preflight reads each shard's first sample
    with pytest.raises(FileNotFoundError, match="data.speaker_ids=corpus.*speaker_map.parquet"):
        preflight(urls, True, 32, 2051, speaker_ids="corpus")
    preflight(urls, True, 32, 2051)  # the other numberings need no map
    write_corpus_map(out, THRESHOLD)
    preflight(urls, True, 32, 2051, speaker_ids="corpus")
    got = ids("corpus")
    assert all(len(v) == 1 for v in got.values())  # one id per source speaker in every sample
    assert got[("0000000000", "SPEAKER_00")] == got[("0000000001", "SPEAKER_01")]  # voice A in both files
    assert got[("0000000000", "SPEAKER_01")] == got[("0000000001", "SPEAKER_00")]  # voice B in both files
    assert got[("0000000000", "SPEAKER_00")] != got[("0000000000", "SPEAKER_01")]
    # per-sample indices ("index") give the first speaker of every sample 0, whichever voice it is
    assert ids("index")[("0000000001", "SPEAKER_00")] == {"0"} == ids("index")[("0000000000", "SPEAKER_00")]


# --- real voices through the diarizer --------------------------------------------------------


def _line_speakers(conv, turns):
    return [assign_speaker(s, e, turns)[0] for s, e, _ in conv.turns]


@pytest.mark.slow
@needs_espeak
def test_the_same_voice_keeps_its_label_across_a_chunk_boundary(offline_stage):
    conv = conversation(script=SCRIPT * 2, gap=0.4, seed=11)  # ~50 s: four chunks of ~12 s
    chunks = diarize_chunks(offline_stage, conv.mono, 12.0)
    assert len(chunks) >= 3
    turns, rows = linked_turns(chunks, DiarizeConfig())
    got, want = _line_speakers(conv, turns), [k for _, _, k in conv.turns]
    mapping = dict(zip(want, got))
    assert len(rows) == 2 and sorted(mapping.values()) == ["S0", "S1"]
    assert [mapping[k] for k in want] == got  # every line of a voice under that voice's one label
    # chunk labels alone do not say so: some chunk starts with the other voice
    assert any(c.turns and c.turns[0].speaker == "S0" and assign_speaker(c.turns[0].start, c.turns[0].end, turns)[0] == "S1"
               for c in chunks)


@pytest.mark.slow
@needs_espeak
def test_link_speakers_joins_a_voice_across_files_and_keeps_voices_apart(offline_stage, tmp_path):
    files = {"f1": conversation(voices=(VOICE_A, VOICE_B), seed=21),
             # the same two voices saying each other's lines (VOICE_C is no use here: for the speaker
             # encoder it is 0.17 from VOICE_A, little more than two lines of one voice, 0.09-0.12)
             "f2": conversation(script=[(1 - k, t) for k, t in SCRIPT], voices=(VOICE_A, VOICE_B), seed=22)}
    out = OutputDir(str(tmp_path))
    out.makedirs()
    truth = {}
    for sid, conv in files.items():
        chunks = diarize_chunks(offline_stage, conv.mono, 60.0, rid=sid)
        cfg = DiarizeConfig()
        commit_records(out, [ChunkRecord.of(c) for c in chunks], cfg.link_threshold, cfg.min_speaker_seconds, cfg.min_speaker_share)
        turns, _ = linked_turns(chunks, DiarizeConfig())
        for (_, _, k), label in zip(conv.turns, _line_speakers(conv, turns)):
            truth[(sid, label)] = (VOICE_A, VOICE_B)[k]
    (tmp_path / "config.json").write_text(json.dumps({"layout": 2, "config": {"diarize": {"link_threshold": THRESHOLD}}}))
    from pipeline.cli import main

    res = CliRunner().invoke(main, ["link-speakers", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "4 source speakers -> 2 corpus speakers" in res.output
    rows = pq.read_table(tmp_path / "speaker_map.parquet").to_pylist()
    by_voice: dict[str, set] = {}
    for r in rows:
        by_voice.setdefault(truth[(r["source_id"], r["speaker"])], set()).add(r["corpus_speaker"])
    assert all(len(v) == 1 for v in by_voice.values())  # one corpus speaker per voice
    assert len(set().union(*by_voice.values())) == 2  # and the two voices apart
    assert {r["confidence"] for r in rows} <= {"high", "medium"} and all(r["members"] == 2 for r in rows)
    assert len(read_speakers(out)) == 4


# --- kill and resume with linking on ----------------------------------------------------------


@pytest.mark.slow
def test_kill_and_resume_with_linking_gives_identical_bytes(reference, clips, tmp_path):
    import os
    import signal
    import time

    ref = corpus_files(reference)
    assert len([k for k in ref if k.startswith("speakers/")]) >= 2  # both sources linked
    out = tmp_path / "corpus"
    proc = cli([*map(str, clips), "--output", str(out), *FAST, *EACH])
    deadline = time.time() + 600
    while len(list((out / "commits").glob("*.parquet"))) < 2 and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finish(cli([*map(str, clips), "--output", str(out), *FAST]))
    assert corpus_files(out) == ref  # a source resumed part-way is linked from both runs' records


def test_stats_reports_linked_sources_and_corpus_speakers(tmp_path):
    from pipeline.stats import corpus_stats, format_stats
    from stages.speakers import write_corpus_map

    A, B, _ = _voices()
    out = OutputDir(str(tmp_path))
    out.makedirs()
    for sid in ("one", "two"):
        commit_records(out, [record(0, {"S0": {"seconds": 9, "embedding": list(A)}, "S1": {"seconds": 9, "embedding": list(B)}},
                                           True, sid=sid)], THRESHOLD, 5.0)
    write_corpus_map(out, THRESHOLD)
    s = corpus_stats(str(tmp_path))
    assert s["linked_sources"] == 2 and s["corpus_speakers"] == 2 and s["corpus_links"] == {"high": 4}
    assert "2 sources linked across chunks), 2 corpus speakers (links: 4 high)" in format_stats(s)
