"""The trainer's speaker policies: which name an utterance's speaker gets in `[{speaker}]{text}`.

`SpeakerLabels`: chunk labels -> the source's one labelling (speakers/ of the corpus a shard is in);
`CorpusSpeakers` (`data.speaker_ids: corpus`): -> the corpus speaker's number from
`speaker_map.parquet` (`pipeline link-speakers`, copied by `pipeline pack`).
"""

from __future__ import annotations

from stages.corpus_format import CORPUS_MAP, SPEAKERS_DIR, OutputDir, Sample, read_rows
from stages.corpus_parts import committed_parts, part_of, read_table


def corpus_root(shard_url: str | None) -> str | None:
    """The corpus root a shard is in (`DIR/shards/x.tar` or a packed `DIR/train/x.tar` -> DIR)."""
    return shard_url.rsplit("/", 2)[0] if shard_url and shard_url.count("/") >= 2 else None


class SpeakerLabels:
    """One labelling per source for samples, read once per corpus from the speakers tables of its
    committed parts (a packed corpus has a copy). A source without a map (made without linking, or
    not complete yet) keeps its chunk labels. Picklable: the cache starts empty."""

    def __init__(self):
        self.cache: dict[str, dict[tuple[str, int, str], str]] = {}

    def labels(self, root: str) -> dict[tuple[str, int, str], str]:
        if root not in self.cache:
            out = OutputDir(root)  # a packed corpus has the speakers parts and no commits
            parts = committed_parts(out) or [p for p in map(part_of, out.list(SPEAKERS_DIR, ".parquet")) if p]
            table = read_table(out, SPEAKERS_DIR, ["source_id", "speaker", "chunks"], parts)
            rows = table.to_pylist() if table is not None else []
            self.cache[root] = {(r["source_id"], c["chunk"], c["label"]): r["speaker"] for r in rows for c in r["chunks"]}
        return self.cache[root]

    def apply(self, sample: Sample, shard_url: str | None) -> Sample:
        root = corpus_root(shard_url)
        if root is None:  # a stream: nothing to map
            return sample
        m, sid = self.labels(root), sample.source.id
        for u in sample.utterances:
            u.speaker = m.get((sid, sample.chunk, u.speaker), u.speaker)
        return sample


class CorpusSpeakers:
    """The trainer's `data.speaker_ids: corpus`: each utterance's source speaker (the labels
    SpeakerLabels gives) becomes its corpus speaker's number from the corpus-wide map that
    `pipeline link-speakers` writes (`DIR/speaker_map.parquet`, copied by `pipeline pack`), so one
    voice has one id in every file. A missing map, or a speaker the map lacks (a source added or
    relinked since), is an error: a silent fallback would give one voice several ids. Picklable."""

    KEY = "data.speaker_ids=corpus"

    def __init__(self):
        self.cache: dict[str, dict[tuple[str, str], str]] = {}

    def ids(self, root: str) -> dict[tuple[str, str], str]:
        if root not in self.cache:
            out = OutputDir(root)
            if not out.exists(CORPUS_MAP):
                raise FileNotFoundError(
                    f"{self.KEY}: no corpus speaker map {out.path(CORPUS_MAP)}; run `pipeline link-speakers {root}` "
                    "(on the pipeline's output, then pack again), or set data.speaker_ids to index or raw")
            self.cache[root] = {(r["source_id"], r["speaker"]): r["corpus_speaker"].lstrip("C")
                                for r in read_rows(out, CORPUS_MAP)}
        return self.cache[root]

    def apply(self, sample: Sample, shard_url: str | None) -> Sample:
        root = corpus_root(shard_url)
        if root is None:
            raise ValueError(f"{self.KEY}: sample {sample.key} does not come from a corpus directory "
                             f"({shard_url!r}), so there is no speaker_map.parquet to read")
        ids = self.ids(root)
        for u in sample.utterances:
            got = ids.get((sample.source.id, u.speaker))
            if got is None:
                raise KeyError(f"{self.KEY}: source {sample.source.id} speaker {u.speaker} (sample {sample.key}) is not "
                               f"in {OutputDir(root).path(CORPUS_MAP)}: the corpus changed since the map was written "
                               "(or the source was not linked across chunks); run `pipeline link-speakers` again")
            u.speaker = got
        return sample
