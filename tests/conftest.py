"""Shared fixtures: real audio from pyannote's sample, one Ray instance per test session, and one
embedded-corpus pipeline run that several end-to-end tests inspect."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
warnings.filterwarnings("ignore", message=r"\s*torchcodec")


def _sample_dir() -> Path:
    import pyannote.audio

    return Path(pyannote.audio.__file__).parent / "sample"


@pytest.fixture(scope="session")
def sample_wav() -> Path:
    return _sample_dir() / "sample.wav"


@pytest.fixture(scope="session")
def sample_rttm() -> list[tuple[float, float, str]]:
    """(start, end, speaker) from the sample's reference diarization."""
    rows = []
    for line in (_sample_dir() / "sample.rttm").read_text().splitlines():
        f = line.split()
        rows.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return rows


@pytest.fixture(scope="session")
def sample_stm() -> list[tuple[float, float, str, str]]:
    """(start, end, speaker, text) from the sample's reference transcript."""
    rows = []
    for line in (_sample_dir() / "sample.stm").read_text().splitlines():
        f = line.split(maxsplit=5)  # file channel speaker start end text
        if len(f) == 6:
            rows.append((float(f[3]), float(f[4]), f[2], f[5]))
    return rows


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # As `pipeline run` starts it: a CPU per core plus one for decode tasks (fused workers).
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_cli(args: list[str]):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="session")
def embedded_run(ray_session, tmp_path_factory) -> Path:
    """`pipeline run --output DIR` with no inputs: the embedded default corpus, on Ray."""
    out = tmp_path_factory.mktemp("embedded")
    result = run_cli(["run", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def tone(seconds: float, rate: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else x


@pytest.fixture(scope="session")
def clips(sample_wav, tmp_path_factory) -> list[Path]:
    """Two real conversation clips (parts of the sample), 15 s each: three chunks with chunk_seconds=12."""
    import soundfile as sf

    audio, rate = sf.read(sample_wav, dtype="float32")
    d = tmp_path_factory.mktemp("clips")
    paths = []
    for i, start in enumerate((6.0, 14.0)):
        p = d / f"conv{i}.wav"
        sf.write(p, audio[int(start * rate) : int((start + 15.0) * rate)], rate)
        paths.append(p)
    return paths


def corpus_files(out: Path | str) -> dict[str, bytes]:
    """Everything a run commits that must be identical across runs, by a name that does not depend on
    which part holds it: each sample's tar members (`sample/<member>`), and each table row
    (`<table>/<identity>`, JSON of the row less its part's shard name). Uncommitted objects are not
    in the corpus and not in this. run.json (timings) is left out."""
    import json
    import tarfile

    import pyarrow.parquet as pq

    from stages.corpus_format import OutputDir
    from stages.corpus_parts import COMMITS, INCOMPLETE, PartFiles, committed_parts, read_part_tables

    corpus = OutputDir(str(out))
    files: dict[str, bytes] = {}

    def put(name: str, row: dict) -> None:
        row = {k: v for k, v in row.items() if k != "shard"}
        n = 0
        while f"{name}#{n}" in files:
            n += 1
        files[f"{name}#{n}"] = json.dumps(row, sort_keys=True, default=str).encode()

    for part in committed_parts(corpus):
        if corpus.exists(PartFiles(part).shard):
            with corpus.fs.open_input_file(corpus.path(PartFiles(part).shard)) as f, tarfile.open(fileobj=f) as tar:
                for m in tar:
                    files[f"sample/{m.name}"] = tar.extractfile(m).read()
    ident = {"manifest": lambda r: r["key"], COMMITS: lambda r: f"{r['source_id']}-c{r['chunk']:04d}",
             "rejected": lambda r: f"{r['source_id']}-{r['stage']}-{r['reason']}-{r['start']}-{r['end']}",
             "errors": lambda r: f"{r['source_id']}-{r['chunk']}-{r['stage']}-{r['error_type']}",
             "speakers": lambda r: f"{r['source_id']}-{r['speaker']}"}
    for _, tables in read_part_tables(corpus, {sub: None for sub in ident}):
        for sub, table in tables.items():
            for row in table.to_pylist() if table is not None else ():
                put(f"{sub}/{ident[sub](row)}", row)
    if corpus.exists(INCOMPLETE):
        for row in pq.read_table(corpus.path(INCOMPLETE), filesystem=corpus.fs).to_pylist():
            put(f"incomplete/{row['source_id']}", row)
    return files


def commit_records(out, records, threshold: float, min_seconds: float, min_share: float = 1.0) -> None:
    """Commit chunk records (no samples) through the pipeline's PartWriter with linking on, as a run
    does: a source's speaker labelling is written in the part that completes it."""
    import functools

    from stages.corpus_format import chunk_name
    from stages.speakers import link_source
    from stages.write import ChunkOutput, PartWriter

    link = functools.partial(link_source, threshold=threshold, min_seconds=min_seconds, min_share=min_share)
    writer = PartWriter(out, 1 << 40, float("inf"), link)
    for r in records:
        writer.add(ChunkOutput(chunk_name(r.source_id, r.chunk), b"", [], [], [], r))
    writer.close()
