"""The one place stages meet Ray: one worker class that runs any stages (`StageWorker`), the plan
of operators, and the runner that wires the chain (stages/chain.py: its source, then its stages,
none known here by name), streams chunk summaries back and reports progress.

Two ways to run the plan. Fused (the default on CPU), the whole chain is one pool: a plain work
queue on Ray's task API (`fused_summaries`). Pools per stage (GPUs) form a streaming DAG whose
pools grow where a backlog builds: Ray Data (`pool_summaries`), where chunks travel between
operators as pickled `Chunk` records in a single binary column, so Ray never guesses an Arrow
type for them. Either way the driver receives each chunk's `ChunkSummary` (a few hundred bytes,
not the chunk).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import ray

from pipeline.config import ConfigError, PipelineConfig, RunStopped
from pipeline.progress import Progress
from stages.base import WORKER_BASE_GB, Resources, Stage
from stages.chain import build_source, build_stages
from stages.corpus_format import ChunkRecord, OutputDir
from stages.corpus_parts import record_incomplete
from stages.records import Chunk, ChunkSummary, ErrorRecord, source_id
from stages.write import PartWriter, SinkLost

log = logging.getLogger(__name__)
DECODE_RESERVE_CPUS = 1.0  # logical CPUs fused workers leave to the decode tasks
# The fused chain gives a worker chunks several per call (at most MAX_PER_CALL, one after another)
# while every chunk lately took it under this long, so that Ray's cost per call is shared; chunks of
# real model work (seconds) still go one per call.
CALL_SECONDS = 0.5
MAX_PER_CALL = 8
# glibc malloc settings for the job's workers (run.tune_malloc). With the defaults, every large
# temporary went back to the kernel when freed and was faulted in, page by page, at the next call:
# Whisper's attention scores (8 windows x 6 heads x 1500^2 floats, 432 MB), pyannote's SincNet batch
# (81 MB), Mimi's 24 kHz activations. glibc's own adaptive threshold stops at 32 MB, and blocks of
# a thread's own arena (CTranslate2 computes on its own threads) are mapped whatever the threshold.
# One arena, blocks under 1 GiB from the heap and up to 1 GiB of free heap kept: the chain's models
# took 8.6 % less CPU on three chunks of a 10-minute podcast in one process (page faults 3.1 M ->
# 0.24 M, system time 6.5 -> 0.5 s, peak RSS 2.7 -> 2.6 GB), 6 % in the pipeline with and without
# it. glibc reads these once, as the process starts.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _dumps(chunks: list[Chunk]) -> dict[str, list[bytes]]:
    return {"chunk": [pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL) for c in chunks]}


def _loads(batch: dict[str, np.ndarray]) -> list[Chunk]:
    return [pickle.loads(b) for b in batch["chunk"]]


class StageWorker:
    """A worker around a run of stages: it calls every stage's setup() once, then passes chunks
    through the stages in order (one stage, or all of them when fused). As a Ray Data UDF
    (`__call__`, pools per stage) the last operator's workers hand back chunk summaries (column
    "summary"), the others chunks; as the fused chain's actor (`chain`), a chunk's summary."""

    def __init__(self, stages: list[Stage], last: bool = False):
        # pyannote warns at import that torchcodec cannot load (no system FFmpeg): we never use it,
        # audio reaches every model in memory.
        warnings.filterwarnings("ignore", message=r"\s*torchcodec")
        self.stages, self.last = stages, last

    def run(self, chunks: list[Chunk]) -> list[Chunk]:
        context = ray.get_runtime_context()
        where = {"node": context.get_node_id(), "actor": context.get_actor_id()}  # actor: None in a task
        for stage in self.stages:
            chunks = stage.process_batch(chunks)
            for chunk in chunks:
                chunk.placement[stage.name] = where
        return chunks

    def chain(self, chunk: bytes) -> ChunkSummary:
        return self.run([pickle.loads(chunk)])[0].summary()

    def chain_many(self, *chunks: bytes) -> list[ChunkSummary]:
        return [self.chain(c) for c in chunks]  # each through every stage before the next

    def ready(self) -> None:
        """Returns once the worker is up (its stages load their models with the first chunk)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        chunks = self.run(_loads(batch))
        if self.last:
            return {"summary": [pickle.dumps(c.summary(), protocol=pickle.HIGHEST_PROTOCOL) for c in chunks]}
        return _dumps(chunks)


class CorpusWriter:
    """A writer actor: a PartWriter on the driver's node. Workers hand it chunk outputs; many
    workers' chunks fill one part, so parts grow with bytes, not with workers or chunks."""

    def __init__(self, output: str, shard_size: int, commit_seconds: float, link, prior: dict[str, list[ChunkRecord]]):
        self.writer = PartWriter(OutputDir(output), shard_size, commit_seconds, link, prior)

    def add(self, output) -> tuple[int, str] | None:
        """None, or (errno, reason) when the corpus cannot be written (the worker stops the run)."""
        try:
            self.writer.add(output)
        except OSError as exc:
            return exc.errno or 0, exc.strerror or str(exc)
        return None

    def close(self) -> dict[str, int]:
        return self.writer.close()


class WriterSink:
    """The write stage's sink in a worker: a chunk goes to the writer of its source (by a stable
    hash), so one writer sees all of a source and commits its speaker labelling with its last chunk."""

    def __init__(self, writers: list):
        self.writers = writers

    def add(self, output) -> None:
        import zlib

        writer = self.writers[zlib.crc32(output.record.source_id.encode()) % len(self.writers)]
        try:
            failed = ray.get(writer.add.remote(output))
        except ray.exceptions.RayActorError as exc:
            raise SinkLost(str(exc).splitlines()[0]) from None
        if failed:
            raise OSError(*failed)


def start_writers(config: PipelineConfig, workers: int, prior: dict[str, list[ChunkRecord]]) -> list:
    """The run's writer actors, on this (the driver's) node: a writer lost is the run's stop, as
    the driver's node is. Each gets the earlier records of the partly done sources it will see."""
    import functools
    import zlib

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from stages.speakers import link_source

    d, w = getattr(config, "diarize", None), config.write  # a chain may have no diarize stage
    link = functools.partial(link_source, threshold=d.link_threshold, min_seconds=d.min_speaker_seconds,
                             min_share=d.min_speaker_share) if d is not None and d.link_chunks else None
    n = config.run.writers or 1 + workers // 500
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(CorpusWriter).options(num_cpus=0, max_restarts=0, scheduling_strategy=here)
    mine = lambda i: {sid: recs for sid, recs in prior.items() if zlib.crc32(sid.encode()) % n == i}  # noqa: E731
    return [actor.remote(w.output, w.shard_size, w.commit_seconds, link, mine(i)) for i in range(n)]


class ResumedSource:
    """The source less the chunks an earlier run committed, of the sources it left incomplete."""

    def __init__(self, source: Stage, skip: dict[str, set[int]]):
        self.source, self.skip = source, skip

    def resources(self) -> Resources:
        return self.source.resources()

    def chunks(self, uri: str) -> Iterator[Chunk]:
        done = self.skip.get(uri, ())
        return (c for c in self.source.chunks(uri) if c.index not in done)


@dataclass(frozen=True)
class Operator:
    """One operator: `stages` run one after another by each worker; an actor pool of
    `min_actors`..`max_actors` when they hold models (autoscaled when the two differ), else tasks."""

    stages: list[Stage]
    res: Resources
    min_actors: int = 1
    max_actors: int = 1

    @property
    def fixed_pool(self) -> bool:
        return self.res.uses_model and self.min_actors == self.max_actors

    def describe(self) -> dict[str, Any]:
        pool = self.res.uses_model
        return {"stages": [s.name for s in self.stages], "actors": self.min_actors if pool else None,
                "max_actors": self.max_actors if pool else None, "cpus": self.res.cpus, "gpus": self.res.gpus}


def group_resources(stages: list[Stage]) -> Resources:
    """What a worker running `stages` one after another needs: the most any of them needs."""
    rs = [s.resources() for s in stages]
    return Resources(cpus=max(r.cpus for r in rs), gpus=max(r.gpus for r in rs), actors=None,
                     batch_size=max(r.batch_size for r in rs), memory_gb=sum(r.memory_gb for r in rs),  # every model at once
                     uses_model=any(r.uses_model for r in rs))


def worker_memory(res: Resources) -> int:
    """Bytes of host memory one model worker declares to Ray, which places no more on a node than it holds."""
    return int((WORKER_BASE_GB + res.memory_gb) * 2**30)


def fitting_actors(res: Resources, cluster: dict[str, float]) -> int:
    """Workers of this size the cluster holds (CPUs, GPUs, memory), one logical CPU left to the decode tasks."""
    n = int((cluster.get("CPU", 0) - DECODE_RESERVE_CPUS) // res.cpus) if res.cpus else 1 << 30
    if res.gpus:
        n = min(n, int(cluster.get("GPU", 0) // res.gpus))
    if "memory" in cluster:
        n = min(n, int(cluster["memory"] // worker_memory(res)))
    return max(1, n)


def plan_operators(stages: list[Stage], config: PipelineConfig, cluster: dict[str, float]) -> list[Operator]:
    """The operators for `stages` on a cluster with `cluster` resources (ray.cluster_resources()).

    Fused (the default when the cluster has no GPU): a single actor pool runs every stage, each
    worker a chunk through the whole chain on its own core. A chunk is pickled once instead of at
    every stage, and every core runs models all the time instead of some pools idling while the
    slowest (Mimi) holds a backlog.
    Unfused (GPUs, or run.fuse_stages=false): a pool per model stage, of the stage's `actors`, or
    when that is None growing from one actor to as many as fit wherever that stage's backlog builds,
    so one node or eight GPUs take the same config.
    """
    wants_gpu = [f"{s.name}.gpus" for s in stages if s.resources().gpus]
    if wants_gpu and cluster.get("GPU", 0) <= 0:  # the actors would wait for a GPU forever
        raise ConfigError(f"{', '.join(wants_gpu)} asks for GPUs and the cluster has none")
    fuse = config.run.fuse_stages
    if fuse is None:
        fuse = cluster.get("GPU", 0) <= 0
    if fuse:
        res = group_resources(stages)
        workers = config.run.workers or fitting_actors(res, cluster)
        return [Operator(stages, res, workers, workers)]
    ops = []
    for s in stages:
        res = s.resources()
        low = res.actors or 1
        ops.append(Operator([s], res, low, res.actors or max(low, fitting_actors(res, cluster))))
    # Actor pools hold their CPUs for the whole run: with no room left for one task (decode,
    # write) the run would wait forever, so say so instead.
    need = sum(o.res.cpus * o.min_actors for o in ops if o.res.uses_model) + max(o.res.cpus for o in ops if not o.res.uses_model)
    if need > cluster.get("CPU", 0):
        raise ConfigError(f"a pool per stage needs {need:g} logical CPUs, the cluster has {cluster.get('CPU', 0):g}: "
                          "set run.num_cpus (local Ray) or run.fuse_stages=true")
    return ops


def apply_operator(ds: "ray.data.Dataset", op: Operator, max_retries: int, last: bool = False) -> "ray.data.Dataset":
    res = op.res
    common = dict(batch_size=res.batch_size, batch_format="numpy", num_cpus=res.cpus, num_gpus=res.gpus or None)
    if not res.uses_model:
        worker = StageWorker(op.stages, last)
        return ds.map_batches(lambda batch: worker(batch), max_retries=max_retries, **common)
    if op.fixed_pool:
        # One chunk at a time per worker: a chunk is seconds to minutes of model work, so a queue
        # per actor would only leave some workers idle at the end while others hold a backlog.
        pool = ray.data.ActorPoolStrategy(size=op.min_actors, max_tasks_in_flight_per_actor=1)
    else:
        # Ray Data adds an actor when tasks in flight per actor reach 1.75 (its default
        # actor_pool_util_upscaling_threshold): only with two allowed does a queued chunk count.
        pool = ray.data.ActorPoolStrategy(min_size=op.min_actors, max_size=op.max_actors, max_tasks_in_flight_per_actor=2)
    return ds.map_batches(
        StageWorker,
        fn_constructor_args=(op.stages, last),
        compute=pool,
        memory=worker_memory(res),
        max_restarts=-1,  # the pool always gets its actor back; the bound is per task:
        max_task_retries=max_retries,
        **common,
    )


def _chunks_of(source: Stage):
    def decode(batch: dict[str, np.ndarray]) -> Iterator[dict[str, list[bytes]]]:
        # A generator: a long file's chunks stream out one by one instead of as one huge batch.
        for uri in batch["uri"]:
            for chunk in source.chunks(str(uri)):
                yield _dumps([chunk])

    return decode


def _decode_source(source: Stage, uri: str) -> Iterator[bytes]:
    # Pickled here, unpickled by the worker: a chunk Ray deserialized itself would hold read-only
    # views of the object store, and stages may write into their arrays.
    for chunk in source.chunks(uri):
        yield pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)


def fused_summaries(uris: list[str], source: Stage, op: Operator, max_retries: int) -> Iterator[ChunkSummary]:
    """The fused chain on Ray's task API: a streaming task per source decodes its chunks, at most
    two ahead of what the driver has taken, and each of `op.min_actors` actors takes its chunks
    one at a time through every stage. Sources start decoding while the chunks decoded, or expected
    from the decoders under way (an average source's, at least one more each), fall short of twice
    the workers, and while the CPUs the workers leave free can run them: how many decode at once
    follows the cluster, the sources' lengths and the backlog. While chunks take a worker under
    CALL_SECONDS, it gets them several per call. A work queue needs none of Ray Data's planning:
    its scheduling loop and three internal actors took 7.7 % of a core on top of what this runner
    and Ray's daemons take (bench/bench_ray_overhead.py), 3.8 % of a 2-core machine that no model
    got. Chunks whose worker died `max_retries` + 1 times are logged and left out: the caller
    records their sources as incomplete. Driver cost per chunk: bench/bench_scale.py."""
    res = op.res
    worker = ray.remote(StageWorker).options(
        num_cpus=res.cpus, num_gpus=res.gpus or None, memory=worker_memory(res),
        max_restarts=-1, max_task_retries=max_retries,  # the pool always gets its actor back; the bound is per call
        scheduling_strategy="SPREAD")
    # Ray's streaming-generator backpressure (underscored, but the documented knob): a long
    # recording's chunks wait in the decoder instead of filling the object store.
    decode_cpus = source.resources().cpus
    decode = ray.remote(_decode_source).options(num_cpus=decode_cpus, max_retries=max_retries,
                                                 num_returns="streaming", _generator_backpressure_num_objects=2)
    actors = [worker.remote(op.stages, True) for _ in range(op.min_actors)]
    # Decoders beyond twice what the free CPUs run would only wait in Ray's queue, and every
    # ray.wait below pays for each one it is given.
    free = ray.cluster_resources().get("CPU", 0.0) - len(actors) * res.cpus
    max_decoders = 2 * max(1, int(free // decode_cpus)) if decode_cpus > 0 else len(uris)
    backlog = 2 * len(actors)  # chunks decoded, or expected from the decoders under way
    names = [s.name for s in op.stages]
    source_ref = ray.put(source)  # pickled once, not once per input
    todo = collections.deque(uris)
    decoding: dict[Any, int] = {}  # decoder -> chunks taken from it
    taken = finished = supplied = 0  # chunks taken from `decoding`; decoders done, and their chunks
    decoded: collections.deque = collections.deque()  # chunk refs, oldest first
    # A worker gets chunks once it is up: none wait behind a worker still starting while others idle.
    starting = {actor.ready.remote(): actor for actor in actors}
    idle, busy = collections.deque(), {}  # busy: result ref -> (its actor, chunks)
    longest, per_call = CALL_SECONDS, 1  # the longest chunk lately (worker seconds, decaying), chunks per call
    try:
        while todo or decoding or decoded or busy:
            per_source = supplied / finished if finished else 1.0
            while todo and len(decoding) < max_decoders and \
                    len(decoded) + max(len(decoding) * per_source - taken, len(decoding)) < backlog:
                decoding[decode.remote(source_ref, todo.popleft())] = 0
            while idle and decoded:
                n = min(per_call, max(1, len(decoded) // len(idle)))  # every idle worker gets some first
                actor = idle.popleft()
                ref = actor.chain.remote(decoded.popleft()) if n == 1 else \
                    actor.chain_many.remote(*(decoded.popleft() for _ in range(n)))
                busy[ref] = (actor, n)
            # Chunks are taken from the decoders only while fewer wait than there are workers (what
            # the object store holds). Not fetched here: a worker reads its chunks, the driver only
            # their summaries.
            waiting = [*busy, *starting, *decoding] if len(decoded) < len(actors) else [*busy, *starting]
            ready, rest = ray.wait(waiting, num_returns=1, fetch_local=False)
            if rest:  # and all else ready: a wait costs O(refs), shared by what it returns
                ready += ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)[0]
            for ref in ready:
                if ref in starting:
                    idle.append(starting.pop(ref))
                    continue
                if ref not in busy:  # a decoder: its next chunk, or its end
                    try:
                        decoded.append(next(ref))
                    except (StopIteration, ray.exceptions.RayError) as exc:
                        if not isinstance(exc, StopIteration):  # its worker died max_retries + 1 times
                            log.warning("a source's decoding was lost after %d tries: %s", max_retries + 1, str(exc)[:500])
                        n = decoding.pop(ref)
                        taken, finished, supplied = taken - n, finished + 1, supplied + n
                    else:
                        decoding[ref] += 1
                        taken += 1
                    continue
                actor, n = busy.pop(ref)
                idle.append(actor)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.warning("%d chunk(s) lost after %d tries: %s", n, max_retries + 1, str(exc)[:500])
                    continue
                for summary in out if n > 1 else (out,):
                    longest = max(sum(summary.timings.get(s, 0.0) for s in names), 0.99 * longest)
                    yield summary
                per_call = max(1, min(MAX_PER_CALL, int(CALL_SECONDS / max(longest, 1e-3))))
    finally:  # done, or stopped early: nothing keeps running on a cluster this did not start
        for gen in decoding:
            ray.cancel(gen, force=True)
        for actor in actors:
            ray.kill(actor)


def pool_summaries(uris: list[str], source: Stage, operators: list[Operator], max_retries: int) -> Iterator[ChunkSummary]:
    """Pools per stage on Ray Data: a streaming DAG whose pools grow where a backlog builds."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    # Per-item failures are caught inside the stages. What reaches Ray is a worker that died (killed,
    # out of memory, crashed in native code): Ray retries it `max_retries` times, then drops that
    # block instead of failing the run, and the source is recorded as an error (record_incomplete).
    # Set before the dataset is built: a dataset copies the context when it is created.
    ctx.max_errored_blocks = -1
    # One chunk per block. Ray Data packs a task's outputs into blocks of up to 128 MiB, and a block
    # goes to one worker: the five 120 s chunks of a 10-minute file (~20 MB each) were one block, and
    # one core did the whole file while the other idled. Any chunk is over 1 MiB, so each is a block.
    ctx.target_max_block_size = 1 << 20
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    ds = ds.map_batches(_chunks_of(source), batch_size=1, num_cpus=source.resources().cpus, max_retries=max_retries)
    for i, op in enumerate(operators):
        ds = apply_operator(ds, op, max_retries, last=i == len(operators) - 1)
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            yield pickle.loads(row["summary"])
    finally:
        getattr(rows, "close", lambda: None)()


@contextlib.contextmanager
def connected(address: str | None, config: PipelineConfig) -> Iterator[dict[str, float]]:
    """Join the cluster at `address`, or start a local one sized to this machine; yields its
    resources, and stops a Ray this started on the way out. Not left to Ray's exit hook, which
    sleeps 0.5 s for late log lines, then waits a second for the autoscaler monitor to stop on
    SIGTERM, which it does not, before killing it: 1.9 s after every run."""
    started = not ray.is_initialized()
    if started:
        _init_ray(address, config)
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            node = getattr(ray._private.worker, "_global_node", None)  # private; absent: the slow way
            if node is not None and hasattr(node, "kill_monitor"):
                node.kill_monitor(check_alive=False)
            ray.shutdown()


STORAGE_VARIABLES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")


def storage_env() -> dict[str, str]:
    """The standard object-store variables set here (AWS_*, Google's): workers on other nodes read
    and write the same store without anyone exporting them there."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_VARIABLES)}


def _init_ray(address: str | None, config: PipelineConfig) -> None:
    # The job's runtime env: every worker process Ray starts for this run, on any node, gets it:
    # the object store's settings as the driver has them, and the malloc settings.
    env = {**storage_env(), **(MALLOC_ENV if config.run.tune_malloc else {})}
    job = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, log_to_driver=True, **job)
        return
    cores = os.cpu_count() or 1
    # Logical CPUs: fused workers take one per core and leave one to the decode tasks. Separate
    # pools (asked for, or implied by run.num_gpus) hold their slot while idle, so they get twice the
    # cores for decode and write to run; GPUs Ray detects itself may need run.num_cpus on a small box
    # (plan_operators says so). Threads per worker are set by each stage from its `cpus`.
    pools = config.run.fuse_stages is False or (config.run.fuse_stages is None and (config.run.num_gpus or 0) > 0)
    num_cpus = config.run.num_cpus or (2 * cores if pools else cores + int(DECODE_RESERVE_CPUS))
    # "local": a new instance even where a `ray start` cluster runs (plain init would join it)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=config.run.num_gpus, include_dashboard=False,
             log_to_driver=True, **job)


def run_pipeline(uris: list[str], sizes: list[int], config: PipelineConfig,
                 prior: dict[str, list[ChunkRecord]] | None = None) -> dict[str, Any]:
    """Process `uris` into config.write.output on the cluster `connect` joined; returns this run's
    summary (counts, timings, the operators and what each stage ran). `prior`: the committed chunk
    records of sources an earlier run left incomplete (their other chunks are done here)."""
    prior = prior or {}
    source, stages = build_source(config), build_stages(config)
    progress = Progress(len(uris), sum(sizes), dict(zip(uris, sizes)), config.run.progress_seconds)
    models = {s.name: s.describe() for s in stages}  # what each stage runs; workers add codec and diarizer
    if not uris:
        return {**progress.summary(), "models": {**models, **progress.models}}
    for records in prior.values():
        for r in records:
            progress.chunk_done(r)
    max_retries = config.run.max_task_retries
    operators = plan_operators(stages, config, ray.cluster_resources())
    writers = start_writers(config, max(op.max_actors for op in operators), prior)
    for stage in stages:
        if hasattr(stage, "sink"):  # the write stage: outputs go to the writer actors (pickled with it)
            stage.sink = WriterSink(writers)
    skip = {records[0].uri: {r.chunk for r in records} for records in prior.values()}
    source = ResumedSource(source, skip) if skip else source
    if len(operators) == 1 and operators[0].fixed_pool:  # the fused chain: a work queue
        summaries = fused_summaries(uris, source, operators[0], max_retries)
    else:
        summaries = pool_summaries(uris, source, operators, max_retries)
    try:
        with contextlib.closing(summaries):
            for summary in summaries:
                progress.update(summary)
                if summary.fatal:  # every other chunk would fail the same way: stop, say why once
                    progress.finish()
                    raise RunStopped(summary.fatal)
        written = ray.get([w.close.remote() for w in writers])  # the last parts, committed
    finally:
        for w in writers:
            ray.kill(w)
    progress.finish()
    out = OutputDir(config.write.output)
    lost = {uri: sorted(progress.chunks_seen.get(uri, ())) for uri in uris if uri not in progress.done_sources}
    record_incomplete(out, uris, [asdict(ErrorRecord(uri, source_id(uri), "worker", "WorkerCrashed",
                                                     f"worker died {max_retries + 1} times; chunks completed: {seen}; rerun to retry"))
                                  for uri, seen in lost.items()])
    progress.errors["WorkerCrashed"] += len(lost)
    return {**progress.summary(), "models": {**models, **progress.models}, "operators": [op.describe() for op in operators],
            "parts_written": sum(x["parts"] for x in written)}


@contextlib.contextmanager
def task_mapper(address: str) -> Iterator:
    """`map_tasks(fn, argument tuples) -> results` running each call as a Ray task on the cluster at
    `address` (the passes of `pipeline pack`)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=True)
    try:
        yield lambda fn, args: ray.get([ray.remote(fn).remote(*a) for a in args])
    finally:
        if started:
            ray.shutdown()
