"""Synthetic shards (docs/output-format.md) and a tiny offline tokenizer, for tests and bench/."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from stages.corpus_format import (CODES, JSON, ChunkRecord, OutputDir, Sample, SampleUtterance, SourceInfo, chunk_name,
                                  manifest_row, sample_key)

WORDS = "hello there how are you doing today fine thanks and what about the weather yes no maybe okay".split()


def tiny_tokenizer(out_dir: str | Path):
    """A word-level tokenizer with Llama-3 style BOS/EOS names, saved so AutoTokenizer can load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + ["[", "]"] + [str(i) for i in range(10)] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="[UNK]"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_sample(rng: np.random.Generator, key: str, released: bool, num_codebooks: int = 32,
                utterances: tuple[int, int] = (2, 4), frames: tuple[int, int] = (4, 16), source: str | None = None) -> dict:
    """Raw WebDataset members of one random sample (what `wds.TarWriter` writes)."""
    utts, begin = [], 0
    for i in range(int(rng.integers(*utterances, endpoint=True))):
        n = int(rng.integers(*frames, endpoint=True))
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        utts.append(SampleUtterance(f"SPEAKER_0{i % 2}", begin * 0.08, (begin + n) * 0.08, text, 0, (begin, begin + n),
                                    -0.2, 0.01, 0.0))
        begin += n
    codes = rng.integers(0, 2048, size=(num_codebooks, begin)).astype(np.int16)
    sample = Sample(
        key=key, source=SourceInfo(f"file:///{source or key}.wav", source or key, begin * 0.08, 24000, 1), chunk=0,
        start=0.0, end=begin * 0.08, language="en", utterances=utts,
        codec={"name": "mimi", "num_codebooks": num_codebooks, "frame_rate": 12.5, "sample_rate": 24000,
               "weights": "kyutai/moshiko-pytorch-bf16" if released else None, "released": released},
        diarizer={"name": "synthetic"}, quality={},
    )
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return {"__key__": key, JSON: sample.to_json(), CODES: buf.getvalue()}


def write_corpus(out_dir: str | Path, chunks: list[tuple[str, int, bool, list[dict]]], part_bytes: int = 1) -> Path:
    """A corpus as `pipeline run` lays it out, written by the pipeline's own PartWriter: each
    (source id, chunk, last, raw samples) is a committed chunk; with the default `part_bytes` every
    chunk with samples is a part of its own."""
    from stages.write import ChunkOutput, PartWriter, tar_members

    out = OutputDir(str(out_dir))
    out.makedirs()
    writer = PartWriter(out, part_bytes, float("inf"))
    for source, chunk, last, raws in chunks:
        members, rows = [], []
        for raw in raws:
            sample = Sample.from_json(raw[JSON])
            members += [(f"{sample.key}.{JSON}", raw[JSON]), (f"{sample.key}.{CODES}", raw[CODES])]
            rows.append(manifest_row(sample, frames=int(sample.utterances[-1].frames[1])))
        first = Sample.from_json(raws[0][JSON]) if raws else None
        record = ChunkRecord(
            source_id=source, uri=first.source.uri if first else f"file:///{source}.wav", chunk=chunk, last=last,
            offset=0.0, duration=sum(r["duration"] for r in rows), source_duration=sum(r["duration"] for r in rows),
            shard=None, samples=len(rows), utterances=sum(len(Sample.from_json(r[JSON]).utterances) for r in raws),
            frames=sum(r["frames"] for r in rows), kept_seconds=sum(r["duration"] for r in rows), rejected=0, errors=[],
            failed=False, codec=first.codec if first else None, diarizer=first.diarizer if first else None)
        writer.add(ChunkOutput(chunk_name(source, chunk), tar_members(members), rows, [], [], record))
    writer.close()
    return Path(out_dir)


def make_shards(out_dir: str | Path, n_shards: int = 3, per_shard: int = 8, released: bool = False,
                seed: int = 0, **sample_kw) -> Path:
    """A corpus as the pipeline lays it out: `n_shards` sources of one chunk of `per_shard` random
    samples each, a part (shard) per source."""
    rng = np.random.default_rng(seed)
    chunks = []
    for s in range(n_shards):
        source = f"synthetic-{s:010x}"
        chunks.append((source, 0, True, [make_sample(rng, sample_key(source, 0, k), released, source=source, **sample_kw)
                                         for k in range(per_shard)]))
    return write_corpus(out_dir, chunks)


def tiny_run(root: str | Path, sets: list[str], max_steps: int) -> list[dict]:
    """A tiny.yaml run on a synthetic corpus under `root` (tok/, data/, run/): its metrics history.
    `sets` are `key=value` overrides on top of the offline plumbing ones."""
    from stages.overrides import parse_sets
    from train import loop
    from train.config import load_config

    root = Path(root)
    tiny_tokenizer(root / "tok")
    make_shards(root / "data", n_shards=3, per_shard=4)
    base = [f"data.tokenizer={root / 'tok'}", "data.allow_unreleased_codec=true", "data.num_workers=0"]
    cfg = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny.yaml"), parse_sets(base + sets))
    return loop.run(cfg, str(root / "data"), str(root / "run"), max_steps=max_steps)
