"""Shards -> model rows -> padded batches.

A sample becomes rows of N+1 columns (N codebooks + 1 text token) and a mask of filled columns:
per utterance, the text rows of `[{speaker}]{text}` (BOS ... EOS), then its audio frames, then one
end-of-audio frame of N zero codes. Shard contents are decoded by hand (json, np.load without
pickle): nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from stages.corpus_format import CODES, JSON, TRAIN_SPLIT, VAL_SPLIT, OutputDir, Sample
from stages.corpus_parts import COMMITS, PartFiles, committed_parts, layout_problem, read_table
from train.config import DataConfig
from train.speakers import CorpusSpeakers, SpeakerLabels

log = logging.getLogger(__name__)

UNRELEASED_MSG = (
    "shard {where} holds codes from a Mimi codec without released weights (codec.released=false, "
    "weights={weights}); such codes carry no speech information and a model trained on them is useless. "
    "Set data.allow_unreleased_codec: true only for tests and plumbing runs."
)


def byte_tokenizer():
    """An offline byte-level tokenizer (256 byte symbols + BOS/EOS): for laptop and plumbing runs
    where the gated Llama-3.2 tokenizer cannot be had. Not what the released CSM was trained with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<|begin_of_text|>": len(vocab), "<|end_of_text|>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def load_tokenizer(name: str):
    """Llama-3.2 text tokenizer from a hub id, a local directory or a tokenizer.json file;
    "bytes" for the offline byte-level tokenizer (logged loudly)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "bytes":
        log.warning("!!! data.tokenizer=bytes: byte-level text tokens, not the Llama-3.2 tokenizer CSM uses !!!")
        return byte_tokenizer()
    try:
        if name.endswith(".json") and Path(name).is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=name)
        else:
            tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - offline, gated or missing all need the same advice
        raise RuntimeError(
            f"cannot load the text tokenizer '{name}' ({type(e).__name__}: {e}). Set data.tokenizer "
            "to a local directory (or tokenizer.json) of the Llama-3.2 tokenizer, e.g. a download of "
            "meta-llama/Llama-3.2-1B, or log in to the hub for the gated repository."
        ) from e
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer '{name}' has no BOS/EOS token; CSM text segments need both")
    return tok


_KEY_SOURCE = re.compile(r"^(.+)-c\d{4}-w\d{4}$")  # stages.corpus_format.sample_key
MIMI_CODES = 2048  # codes per codebook of the pipeline's codec


def key_source(key: str) -> str:
    """The source id of a sample key."""
    m = _KEY_SOURCE.match(key)
    return m.group(1) if m else key


def source_hash(source: str) -> float:
    return int(hashlib.sha1(source.encode()).hexdigest()[:15], 16) / 16**15


class Split(list):
    """Shard urls, and the held-out sources a sample must (`held=True`) or must not be from when a
    corpus's shards mix sources (None: every sample of these shards). Picklable."""

    def __init__(self, urls, sources: frozenset[str] | None = None, held: bool = False):
        super().__init__(urls)
        self.sources, self.held = sources, held

    def admits(self, raw: dict) -> bool:
        return self.sources is None or (key_source(raw["__key__"]) in self.sources) == self.held


def list_shards(shards_dir: str | Path, eval_fraction: float) -> tuple[Split, Split]:
    """(train, eval) shards, split by source: a source whose hash falls under `eval_fraction` is held
    out whole (at least one source when the fraction is positive), so no source is in both splits
    and adding sources never moves an existing one. A packed corpus's val/ already holds whole
    sources; in a pipeline corpus a shard holds many sources, so both splits read every committed
    shard and keep their own sources' samples."""
    packed = Path(shards_dir) / TRAIN_SPLIT
    if packed.is_dir():  # `pipeline pack` output: its val/ split already holds whole sources
        if not (Path(shards_dir) / "pack.json").exists():
            raise FileNotFoundError(f"the pack at {shards_dir} did not finish (no pack.json): run the same `pipeline pack` again")
        val = sorted(str(p) for p in (Path(shards_dir) / VAL_SPLIT).glob("*.tar")) if eval_fraction else []
        return Split(sorted(str(p) for p in packed.glob("*.tar"))), Split(val)
    out = OutputDir(str(shards_dir))
    if problem := layout_problem(out):
        raise ValueError(problem)
    parts = committed_parts(out)
    shards = [out.path(PartFiles(p).shard) for p in parts if out.exists(PartFiles(p).shard)]
    if not shards:
        raise FileNotFoundError(f"no committed shards under {out.path('shards')} (is {shards_dir} a corpus made by `pipeline run`?)")
    if not eval_fraction:
        return Split(shards), Split([])
    ids = read_table(out, COMMITS, ["source_id", "chunk"], parts)
    import pyarrow.compute as pc

    sources = sorted(set(ids.filter(pc.equal(ids["chunk"], 0))["source_id"].to_pylist()), key=source_hash)
    held = frozenset({s for s in sources if source_hash(s) < eval_fraction} or {sources[0]})
    if len(held) == len(sources):
        raise ValueError(f"{len(sources)} source(s) cannot hold out data.eval_fraction={eval_fraction}; "
                         "set data.eval_fraction: 0")
    return Split(shards, held, held=False), Split(shards, held, held=True)


def check_codec(sample: Sample, allow_unreleased: bool, where: str) -> None:
    if not sample.codec.get("released", False) and not allow_unreleased:
        raise ValueError(UNRELEASED_MSG.format(where=where, weights=sample.codec.get("weights")))


def preflight(shards: list[str], allow_unreleased: bool, num_codebooks: int, audio_vocab_size: int,
              speaker_ids: str = "index") -> None:
    """Read the first sample's json of each shard, so a bad corpus (or a model that cannot hold its
    codes, or `speaker_ids: corpus` without a corpus speaker map) fails before training starts."""
    labels, corpus = SpeakerLabels(), CorpusSpeakers() if speaker_ids == "corpus" else None
    for shard in shards:
        with tarfile.open(shard) as tar:
            member = next((m for m in tar if m.name.endswith(f".{JSON}")), None)
            if member is None:
                continue
            sample = Sample.from_json(tar.extractfile(member).read())
            check_codec(sample, allow_unreleased, shard)
            if corpus is not None:
                corpus.apply(labels.apply(sample, shard), shard)
            have = int(sample.codec.get("num_codebooks", num_codebooks))
            if have < num_codebooks:
                raise ValueError(f"model.num_codebooks={num_codebooks} but shard {shard} holds {have} codebooks "
                                 "(codec.num_codebooks)")
            codes = int(sample.codec.get("codebook_size", MIMI_CODES))
            if codes > audio_vocab_size:
                raise ValueError(f"model.audio_vocab_size={audio_vocab_size} cannot hold the {codes} codes per "
                                 f"codebook of shard {shard}")


def segment_rows(tokenizer, text: str, codes: np.ndarray | None, num_codebooks: int):
    """One turn: text rows of `text` ("[speaker]words", BOS ... EOS), then, when `codes` [N, frames] is
    given, its audio frames and one all-zero end-of-audio frame. -> (tokens [T, N+1], mask [T, N+1])."""
    N = num_codebooks
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    n_text, n_audio = len(ids), 0 if codes is None else codes.shape[1] + 1
    seg = np.zeros((n_text + n_audio, N + 1), dtype=np.int64)
    mask = np.zeros_like(seg, dtype=bool)
    seg[:n_text, N], mask[:n_text, N] = ids, True
    if codes is not None:
        seg[n_text : n_text + n_audio - 1, :N] = codes[:N].T  # the last audio row stays 0: EOS frame
        mask[n_text:, :N] = True
    return seg, mask


def build_rows(sample: Sample, codes: np.ndarray, tokenizer, cfg: DataConfig, num_codebooks: int):
    """One sample -> (tokens int64 [T, N+1], mask bool [T, N+1]), cropped to cfg.seq_len at an
    utterance boundary (the first utterance alone is truncated if it does not fit)."""
    N = num_codebooks
    if codes.ndim != 2 or codes.shape[0] < N:
        raise ValueError(f"codes.npy has shape {codes.shape}, need [>= {N}, frames]")
    speakers: dict = {}
    segments, total = [], 0
    for utt in sample.utterances:
        spk = speakers.setdefault(utt.speaker, len(speakers)) if cfg.speaker_ids == "index" else utt.speaker
        begin, end = utt.frames
        seg, mask = segment_rows(tokenizer, f"[{spk}]{utt.text}", codes[:N, begin:end], N)
        if total + len(seg) > cfg.seq_len:
            if not segments:
                segments.append((seg[: cfg.seq_len], mask[: cfg.seq_len]))
            break
        segments.append((seg, mask))
        total += len(seg)
    if not segments:
        return np.zeros((0, N + 1), dtype=np.int64), np.zeros((0, N + 1), dtype=bool)
    return np.concatenate([s for s, _ in segments]), np.concatenate([m for _, m in segments])


def collate(samples: list[dict]) -> dict:
    """Right-pad to the longest sample; padded rows have an all-false mask."""
    T = max(len(s["tokens"]) for s in samples)
    C = samples[0]["tokens"].shape[1]
    tokens = torch.zeros(len(samples), T, C, dtype=torch.long)
    mask = torch.zeros(len(samples), T, C, dtype=torch.bool)
    for i, s in enumerate(samples):
        tokens[i, : len(s["tokens"])] = torch.from_numpy(s["tokens"])
        mask[i, : len(s["mask"])] = torch.from_numpy(s["mask"])
    return {"tokens": tokens, "mask": mask, "keys": [s["key"] for s in samples]}


class SampleDecoder:
    """Raw tar members -> model rows. Picklable, so DataLoader workers get their own copy."""

    def __init__(self, tokenizer, cfg: DataConfig, num_codebooks: int):
        self.tokenizer, self.cfg, self.N = tokenizer, cfg, num_codebooks
        self.labels = SpeakerLabels()  # chunk labels -> the source's one labelling (speakers/), where linked
        self.corpus = CorpusSpeakers() if cfg.speaker_ids == "corpus" else None  # -> corpus speakers

    def __call__(self, raw: dict) -> dict:
        sample = self.labels.apply(Sample.from_json(raw[JSON]), raw.get("__url__"))
        if self.corpus is not None:
            sample = self.corpus.apply(sample, raw.get("__url__"))
        check_codec(sample, self.cfg.allow_unreleased_codec, f"{raw.get('__url__')} sample {raw['__key__']}")
        codes = np.load(io.BytesIO(raw[CODES]), allow_pickle=False)
        tokens, mask = build_rows(sample, codes, self.tokenizer, self.cfg, self.N)
        return {"key": raw["__key__"], "tokens": tokens, "mask": mask}


def _nonempty(sample: dict) -> bool:
    return len(sample["tokens"]) > 1  # a window without utterances has nothing to train on


class ShardStream(IterableDataset):
    """Endless, reproducible stream of batches for one rank.

    Shards are split by node and by worker when there are enough of them (otherwise every worker
    samples all shards), then resampled at random with a seed of (seed, epoch, rank, worker), so an
    epoch of `epoch_batches` per rank is identical on rerun. `skip_batches` fast-forwards within the
    epoch after a resume: the skipped batches are read and decoded again (about a millisecond a
    sample, nothing next to a training step) but not trained on, so the stream resumes exactly.
    """

    def __init__(self, urls, decoder: SampleDecoder, cfg: DataConfig, seed: int, batch_size: int):
        self.urls, self.decoder, self.cfg, self.seed, self.batch_size = urls, decoder, cfg, seed, batch_size
        self.epoch, self.skip_batches = 0, 0

    def __iter__(self):
        rank, world, loader_worker, num_workers = wds.utils.pytorch_worker_info()
        worker = (loader_worker + self.skip_batches) % num_workers
        urls = self.urls
        if len(urls) >= world * num_workers:
            urls = urls[rank::world][worker::num_workers]  # wds.split_by_* would use the loader's worker id
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, rank, worker))
        per_worker = -(-self.cfg.epoch_batches // num_workers)
        # Batches come round-robin from workers, so this worker served every num_workers-th one.
        skip = len(range(worker, self.skip_batches, num_workers))
        pipeline = wds.DataPipeline(
            lambda: ({"url": rng.choice(urls)} for _ in itertools.count()),
            wds.tarfile_to_samples(),
            wds.select(getattr(self.urls, "admits", lambda raw: True)),
            wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng),
            wds.map(self.decoder),
            wds.select(_nonempty),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
            lambda src: itertools.islice(src, skip, None),
        ).with_epoch(nbatches=per_worker)
        yield from pipeline


class BatchStream:
    """Iterator over a rank's training batches that knows its position: `consumed` batches so far.
    Rebuilding it with the same seed and `consumed` resumes exactly where it stopped."""

    def __init__(self, dataset: ShardStream, num_workers: int, consumed: int = 0):
        self.dataset, self.num_workers, self.consumed = dataset, num_workers, consumed
        self._it = None

    def _start(self):
        E = self.dataset.cfg.epoch_batches
        self.dataset.epoch, self.dataset.skip_batches = divmod(self.consumed, E)
        # The loader is rebuilt each epoch so workers see the new epoch's seed.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        self._it = itertools.islice(iter(loader), E - self.dataset.skip_batches)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._start()
            batch = next(self._it, None)
            if batch is not None:
                self.consumed += 1
                return batch
            self._it = None
            if self.consumed % self.dataset.cfg.epoch_batches:  # short epoch: advance to the next one
                self.consumed += self.dataset.cfg.epoch_batches - self.consumed % self.dataset.cfg.epoch_batches


def eval_batches(urls, decoder: SampleDecoder, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches of the held-out shards, in order; the same on every rank."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(),
        wds.select(getattr(urls, "admits", lambda raw: True)),
        wds.map(decoder),
        wds.select(_nonempty),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return list(itertools.islice(iter(pipeline), max_batches))
