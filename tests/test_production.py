"""The production path: setup errors fail fast and once, a full disk stops the run with one reason
and resumes exactly, and every table of a mixed corpus reads as one table in pandas and pyarrow."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import corpus_files, run_cli
from pipeline.config import RunStopped, load_config
from stages.base import Stage
from stages.chain import CHAIN, StageSpec
from stages.records import Chunk
from stages.write import WriteConfig, WriteStage

FAST = ["tokenize.allow_unreleased=true", "decode.chunk_seconds=12", "decode.cut_search_seconds=2", "run.workers=1"]


def run(clips, out: Path, chain=CHAIN, sets=()):
    from pipeline.inputs import expand_inputs
    from pipeline.job import run_job

    config = load_config([], [*FAST, *sets], {"write": {"output": str(out)}}, chain=chain)
    return run_job(expand_inputs([str(c) for c in clips]), config)


def test_missing_weights_fail_before_any_worker_naming_the_key(clips, tmp_path):
    out = tmp_path / "corpus"
    result = run_cli(["run", str(clips[0]), "--output", str(out)])  # not the embedded corpus: released Mimi required
    assert result.exit_code == 2 and "tokenize.weights" in result.output, result.output
    assert not out.exists()  # refused before the corpus directory, Ray or any worker


def test_the_driver_checks_and_describes_stages_without_loading_a_model_library(tmp_path):
    """preflight() and describe() run in the driver: importing torch there cost 1.1 s on one core before Ray started."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.config import load_config; from stages.chain import build_source, build_stages; "
            f"c = load_config([], ['tokenize.allow_unreleased=true'], {{'write': {{'output': {str(tmp_path)!r}}}}}); "
            "[(s.preflight(), s.describe()) for s in [build_source(c), *build_stages(c)]]; "
            "print(sorted(m for m in ('torch', 'moshi', 'pyannote.audio', 'whisperx', 'silero_vad') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("setting, key", [("decode.chunk_seconds=-5", "decode.chunk_seconds"),
                                          ("tokenize.num_codebooks=0", "tokenize.num_codebooks"),
                                          ("filters.disable=[no_such_filter]", "filters.disable")])
def test_a_bad_value_is_refused_before_the_run_naming_the_key(clips, tmp_path, setting, key):
    out = tmp_path / "corpus"
    result = run_cli(["run", str(clips[0]), "--output", str(out), "--set", "tokenize.allow_unreleased=true", "--set", setting])
    assert result.exit_code == 2 and key in result.output, result.output
    assert result.output.count(key) == 1 and not out.exists()


def broken_spec() -> StageSpec:
    """A stage whose model cannot load in the workers (made in a function: Ray ships it by value)."""

    @dataclasses.dataclass(frozen=True)
    class BrokenConfig:
        path: str = "/models/missing.bin"

    class Broken(Stage):
        name = "broken"

        def resources(self):
            from stages.base import Resources

            return Resources(cpus=1.0, uses_model=True)

        def setup(self):
            raise FileNotFoundError(f"no model at {self.config.path}")

        def process(self, chunk: Chunk) -> Chunk:
            return chunk

    return StageSpec(Broken, "broken", BrokenConfig)


def test_a_model_that_fails_in_setup_ends_the_run_once_not_as_crashes(ray_session, clips, tmp_path):
    out = tmp_path / "corpus"
    with pytest.raises(RunStopped, match="broken could not start: FileNotFoundError: no model at /models/missing.bin"):
        run(clips, out, CHAIN.inserted(broken_spec(), after="vad"))
    assert list((out / "errors").glob("*")) == [] and list((out / "commits").glob("*")) == []  # no WorkerCrashed, no per-input error
    assert "broken could not start" in (out / "run.json").read_text()


def full_disk_chain():
    """The chain with a writer that finds the disk full when it reaches the second input."""

    class FullDiskWrite(WriteStage):
        def write(self, chunk: Chunk) -> Chunk:
            if "conv1" in chunk.recording.uri:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(chunk)

    specs = [s if s.name != "write" else dataclasses.replace(s, stage=FullDiskWrite) for s in CHAIN.stages]
    return dataclasses.replace(CHAIN, stages=tuple(specs))


def test_a_full_disk_stops_the_run_with_one_reason_and_resumes_to_the_same_bytes(ray_session, clips, tmp_path):
    clean = tmp_path / "clean"
    run(clips, clean)
    out = tmp_path / "corpus"
    with pytest.raises(RunStopped) as stop:
        run(clips, out, full_disk_chain())
    assert str(stop.value) == f"cannot write to {out}: No space left on device"
    assert not any("conv1" in name for name in corpus_files(out))  # nothing of the failed input, not even an error record
    run(clips, out)  # the disk has room again: the same command resumes
    assert corpus_files(out) == corpus_files(clean)


def test_the_cli_says_why_it_stopped_in_one_line(monkeypatch, clips, tmp_path):
    import pipeline.job

    def stopped(*args, **kwargs):
        raise RunStopped(f"cannot write to {tmp_path}: No space left on device")

    monkeypatch.setattr(pipeline.job, "run_job", stopped)
    result = run_cli(["run", str(clips[0]), "--output", str(tmp_path / "x"), "--set", "tokenize.allow_unreleased=true"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.strip()] == [
        f"Error: stopped: cannot write to {tmp_path}: No space left on device; rerun the same command to resume"]


def test_every_table_of_a_mixed_corpus_reads_as_one_table(ray_session, clips, tmp_path):
    """Good, rejected-only (a tone), failing (not audio) and stereo inputs in one corpus."""
    import pyarrow.dataset as ds

    d = tmp_path / "inputs"
    d.mkdir()
    audio, rate = sf.read(clips[0], dtype="float32")
    sf.write(d / "stereo.wav", np.stack([audio, 0.5 * audio], axis=1), rate)
    t = np.arange(rate * 5) / rate
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    (d / "broken.wav").write_bytes(b"RIFF not really a wav file")
    out = tmp_path / "corpus"
    run([clips[0], d / "stereo.wav", d / "tone.wav", d / "broken.wav"], out)
    for table in ("manifest", "rejected", "errors"):
        frame = pd.read_parquet(out / table)
        assert len(frame) == ds.dataset(str(out / table), format="parquet").count_rows() > 0
    assert pd.read_parquet(out / "rejected").metric.dtype == np.float64
    errors = pd.read_parquet(out / "errors")
    assert ds.dataset(str(out / "errors"), format="parquet").schema.field("chunk").type == "int64"
    assert any("broken" in u for u in errors.uri)
