"""`pipeline run` without the command line: check that every model can be had, take the output's
lease, prepare the corpus directory (dropping what a killed run left uncommitted), join the cluster,
place the GPU stages, store the config's digest (frozen from there on), process the inputs and
chunks that are not done yet and write run.json."""

from __future__ import annotations

import sys
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, RunStopped
from pipeline.corpus import Lease, check_config, committed_state, not_done, write_run_json
from pipeline.inputs import Input
from stages.chain import build_source, build_stages, place_on_gpus
from stages.corpus_format import OutputDir
from stages.corpus_parts import layout_problem, remove_uncommitted


def run_job(inputs: list[Input], config: PipelineConfig, address: str | None = None, allow_config_change: bool = False,
            note: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Process `inputs` into config.write.output; returns what run.json holds. `note` ends the
    first progress line; `extra` goes into run.json."""
    from pipeline.ray_runner import connected, run_pipeline  # the one module that imports ray

    for stage in [build_source(config), *build_stages(config)]:
        stage.preflight()  # a missing model is a ConfigError here, before any worker starts
    out = OutputDir(config.write.output)
    try:  # the output is checked before Ray starts: a wrong endpoint, key or bucket is one line
        if problem := layout_problem(out):
            raise ConfigError(problem)
        out.makedirs()
        lease = Lease(out).acquire()
    except OSError as exc:
        raise ConfigError(f"cannot write the corpus at {out.uri()}: {' '.join(str(exc).split())}") from None
    with lease, connected(address, config) as cluster:
        removed = remove_uncommitted(out)
        config = place_on_gpus(config, cluster.get("GPU", 0.0))
        check_config(out, config, allow_config_change)
        done, prior = committed_state(out)
        todo = [i for i, new in zip(inputs, not_done([i.uri for i in inputs], done)) if new]
        todo_uris = {i.uri for i in todo}
        prior = {sid: recs for sid, recs in prior.items() if recs[0].uri in todo_uris}
        print(f"[csm-corpus] {len(inputs)} inputs ({len(inputs) - len(todo)} already done"
              f"{f', {len(prior)} partly' if prior else ''}), output {out.uri()}{note}", file=sys.stderr, flush=True)
        extra = {**(extra or {}), "inputs_skipped_done": len(inputs) - len(todo), "inputs_resumed_partly": len(prior),
                 "uncommitted_objects_removed": removed}
        try:
            summary = run_pipeline([i.uri for i in todo], [i.size for i in todo], config, prior)
        except RunStopped as stop:
            try:  # when it can be: a full disk may refuse this too
                write_run_json(out, config, {"stopped": str(stop)}, extra)
            except OSError:
                pass
            raise
        return write_run_json(out, config, summary, extra)
