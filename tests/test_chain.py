"""The chain is defined once (stages/chain.py): the config's sections, the stages a run builds, the
funnel's order, GPU placement and the config digest all follow it, and a stage added there runs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import load_config, to_dict
from pipeline.corpus import config_digest
from stages.base import Stage
from stages.chain import CHAIN, GPU_SHARE, StageSpec, build_stages, place_on_gpus
from stages.records import Chunk, Rejection


def test_everything_follows_the_chain():
    config = load_config()
    names = [s.name for s in CHAIN.stages]
    assert [s.name for s in build_stages(config)] == names
    assert len(set(names + [CHAIN.source.name])) == len(names) + 1  # unique: timings and placement never merge
    assert list(to_dict(config)) == [*CHAIN.sections(), "run"]
    # GPU placement is a new config, made before the digest: the digest sees it.
    placed = place_on_gpus(config, cluster_gpus=2.0)
    on_gpu = {s.section for s in CHAIN.specs if s.gpu}
    assert on_gpu == {"diarize", "asr", "tokenize"}
    assert all(getattr(placed, section).gpus == GPU_SHARE for section in on_gpu) and config.asr.gpus == 0.0
    assert place_on_gpus(config, cluster_gpus=0.0) is config
    assert config_digest(placed) != config_digest(config)
    # Runtime keys schedule the work: the digest leaves them out.
    for spec in CHAIN.specs:
        for key in spec.runtime_keys:
            value = "elsewhere" if key == "output" else 3
            assert config_digest(load_config(overrides={spec.section: {key: value}})) == config_digest(config), (spec.name, key)
    assert config_digest(load_config(["configs/conversational.yaml"])) != config_digest(config)


def test_stage_names_are_unique():
    spec = CHAIN.stages[0]
    with pytest.raises(ValueError, match="unique"):
        CHAIN.inserted(spec, after="windows")


def probe_spec() -> StageSpec:
    """A stage that records one zero-length rejection per chunk and drops nothing. Made in a
    function: Ray ships classes defined here by value (the test module is not importable in its workers)."""

    @dataclass(frozen=True)
    class ProbeConfig:
        reason: str = "probed"

    class Probe(Stage):
        name = "probe"

        def describe(self) -> dict:
            return {"name": "probe", "reason": self.config.reason}

        def process(self, chunk: Chunk) -> Chunk:
            chunk.rejected.append(Rejection(chunk.recording.id, self.name, self.config.reason, chunk.offset, chunk.offset, level="region"))
            return chunk

    return StageSpec(Probe, "probe", ProbeConfig, reasons=("seen",))


def test_a_stage_added_to_the_chain_runs_and_shows_in_the_funnel_and_run_json(ray_session, sample_wav, tmp_path):
    from pipeline.inputs import expand_inputs
    from pipeline.job import run_job
    from pipeline.stats import corpus_stats

    chain = CHAIN.inserted(probe_spec(), after="windows")
    audio, rate = sf.read(sample_wav, dtype="float32")
    clip = tmp_path / "clip.wav"
    sf.write(clip, audio[6 * rate : 18 * rate], rate)
    out = tmp_path / "corpus"
    config = load_config([], ["probe.reason=seen", "tokenize.allow_unreleased=true", "run.workers=1"],
                         {"write": {"output": str(out)}}, chain=chain)
    run = run_job(expand_inputs([str(clip)]), config)

    # It ran, between windows and the window filters, in the one fused operator.
    assert run["operators"][0]["stages"] == [s.name for s in chain.stages]
    assert run["operators"][0]["stages"][6:8] == ["probe", "filter_windows"]
    assert run["stage_seconds"]["probe"] > 0
    assert run["counts"]["samples"] >= 1  # the rest of the chain still made a corpus
    # run.json has its config section (the override reached it) and its identity.
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["probe"] == {"reason": "seen"} and saved["models"]["probe"] == {"name": "probe", "reason": "seen"}
    assert json.loads((out / "config.json").read_text())["config"]["probe"] == {"reason": "seen"}
    # Its records are in rejected/ and its line sits in the funnel where the chain puts it.
    rows = pq.read_table(out / "rejected").to_pylist()
    assert {(r["stage"], r["reason"]) for r in rows if r["stage"] == "probe"} == {("probe", "seen")}
    lines = [x["line"] for x in corpus_stats(str(out), chain=chain)["funnel"]["lines"]]
    assert "probe:seen" in lines
    before = [i for i, line in enumerate(lines) if line.split(":")[0] in ("vad", "utterances", "filter_utterances", "windows")]
    after = [i for i, line in enumerate(lines) if line.split(":")[0] in ("filter_windows", "tokenize")]
    assert all(i < lines.index("probe:seen") for i in before) and all(i > lines.index("probe:seen") for i in after)
