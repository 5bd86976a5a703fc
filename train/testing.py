"""Synthetic shards (docs/output-format.md) and a tiny offline tokenizer, for tests and bench/."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from stages.corpus_format import CODES, JSON, ChunkFiles, Sample, SampleUtterance, SourceInfo, chunk_name, sample_key

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


def make_shards(out_dir: str | Path, n_shards: int = 3, per_shard: int = 8, released: bool = False,
                seed: int = 0, **sample_kw) -> Path:
    """OUT/shards/ as the pipeline lays it out, `n_shards` shards of `per_shard` random samples each."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        source = f"synthetic-{s:010x}"
        with wds.TarWriter(str(Path(out_dir) / ChunkFiles(chunk_name(source, 0)).shard)) as w:
            for k in range(per_shard):
                w.write(make_sample(rng, sample_key(source, 0, k), released, source=source, **sample_kw))
    return Path(out_dir)


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
