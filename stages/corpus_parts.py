"""The corpus in parts: many chunks, of many sources, share one set of objects, and a reader finds
what is committed from one listing. docs/output-format.md says the same in prose.

A writer (`stages/write.py`: `PartWriter`) gathers the outputs of chunks until they reach
`write.shard_size` bytes (or `write.commit_seconds` pass), then writes one part, in this order:

    shards/part-<id>.tar  manifest/part-<id>.parquet  rejected/...  errors/...  speakers/...
    commits/part-<id>.parquet   the chunk records, last: its presence commits the whole part

`<id>` is a function of the chunk names in the part. A part without its commit object is not in the
corpus: readers never look at it and the next run deletes it. Objects grow with bytes, not with
chunks or sources: a 1 GB part holds thousands of chunks.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from stages.corpus_format import CONFIG_FILE, LAYOUT, SUBDIRS, OutputDir

COMMITS = "commits"
PREFIX = "part-"


def part_id(chunk_names: Iterable[str]) -> str:
    """The part's name: the same chunks give the same name, whichever run writes them."""
    return hashlib.sha1("\n".join(sorted(chunk_names)).encode()).hexdigest()[:16]


class PartFiles:
    """Where one part's objects go, relative to the corpus root."""

    def __init__(self, part: str):
        name = f"{PREFIX}{part}"
        self.shard_file = f"{name}.tar"  # the manifest's `shard` column
        self.shard = f"shards/{self.shard_file}"
        self.manifest, self.rejected, self.errors = (f"{sub}/{name}.parquet" for sub in ("manifest", "rejected", "errors"))
        self.speakers, self.commit = f"speakers/{name}.parquet", f"{COMMITS}/{name}.parquet"


def part_of(file_name: str) -> str | None:
    """`part-<id>.tar` / `.parquet` -> `<id>`; None for anything else (temporaries, older layouts)."""
    if not file_name.startswith(PREFIX):
        return None
    return file_name[len(PREFIX):].split(".", 1)[0]


def committed_parts(out: OutputDir) -> list[str]:
    """The ids of every committed part, in name order (one listing of commits/)."""
    return [p for p in map(part_of, out.list(COMMITS, ".parquet")) if p]


def remove_uncommitted(out: OutputDir) -> int:
    """Delete what a killed run left outside a committed part: its objects and any temporary. One
    writer at a time (the lease) makes this safe."""
    done = set(committed_parts(out))
    stale = [f"{sub}/{n}" for sub in SUBDIRS for n in out.list(sub, hidden=True) if part_of(n) not in done]
    for rel in stale:
        out.delete(rel)
    return len(stale)


def layout_problem(out: OutputDir) -> str | None:
    """Why this version cannot read or add to the corpus at `out`, or None."""
    import json

    if out.list("chunks", ".json"):
        return (f"{out.root} is a corpus of layout 1 (a shard per chunk) made by an older csm-corpus; this version "
                f"reads layout {LAYOUT}: run `pipeline run` again into a new --output")
    if out.exists(CONFIG_FILE):
        layout = json.loads(out.read_bytes(CONFIG_FILE)).get("layout", 1)
        if layout != LAYOUT:
            return f"{out.root} has corpus layout {layout}, this version reads layout {LAYOUT}: use a new --output"
    return None


def read_parts(out: OutputDir, sub: str, parts: list[str], columns: list[str] | None = None,
               threads: int = 8) -> Iterator[tuple[str, object]]:
    """(part, pyarrow table) for each of `parts` that has an object in `sub`, in order (read_part_tables)."""
    for part, tables in read_part_tables(out, {sub: columns}, parts, threads):
        if tables[sub] is not None:
            yield part, tables[sub]


def read_part_tables(out: OutputDir, subs: dict[str, list[str] | None], parts: list[str] | None = None,
                     threads: int = 8) -> Iterator[tuple[str, dict[str, object]]]:
    """(part, {sub: table or None}) for every committed part (or `parts`), reading `subs` (sub ->
    columns, None: all) of a bounded window of parts at once on a thread pool: what a reader that
    works part by part needs, in memory bounded by the window, whatever the corpus size."""
    import pyarrow.parquet as pq

    parts = committed_parts(out) if parts is None else parts
    have = {sub: {part_of(n) for n in out.list(sub, ".parquet")} for sub in subs}

    def read(part: str) -> dict[str, object]:
        return {sub: pq.read_table(out.path(sub, f"{PREFIX}{part}.parquet"), filesystem=out.fs, columns=cols, use_threads=False)
                if part in have[sub] else None for sub, cols in subs.items()}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i in range(0, len(parts), threads):
            window = parts[i:i + threads]
            yield from zip(window, pool.map(read, window))


def read_table(out: OutputDir, sub: str, columns: list[str] | None = None, parts: list[str] | None = None):
    """One table of every committed part's `sub` (only the columns asked for); for small columns."""
    import pyarrow as pa

    tables = [t for _, t in read_parts(out, sub, committed_parts(out) if parts is None else parts, columns)]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


INCOMPLETE = "incomplete.parquet"  # sources whose chunks did not all come back (error rows), as of the last run


def record_incomplete(out: OutputDir, uris: list[str], rows: list[dict]) -> None:
    """Replace the error rows of `uris` in incomplete.parquet with `rows` (error_schema): a source
    completed since drops out, one still incomplete stays until a run completes it. One object."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from stages.corpus_format import error_schema, table_bytes

    new = pa.Table.from_pylist(rows, schema=error_schema())
    if out.exists(INCOMPLETE):
        old = pq.read_table(out.path(INCOMPLETE), filesystem=out.fs, schema=error_schema())
        new = pa.concat_tables([old.filter(pc.invert(pc.is_in(old["uri"], pa.array(uris, pa.string())))), new])
    elif not rows:
        return
    if new.num_rows:
        out.write_bytes(INCOMPLETE, table_bytes(new.to_pylist(), error_schema()))
    else:
        out.delete(INCOMPLETE)
