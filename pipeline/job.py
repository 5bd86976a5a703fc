"""`pipeline run` without the command line: check that every model can be had, prepare the corpus
directory, join the cluster, place the GPU stages, store the config's digest (frozen from there
on), process the inputs that are not done yet and write run.json."""

from __future__ import annotations

import sys
from typing import Any

from pipeline.config import PipelineConfig, RunStopped
from pipeline.corpus import check_config, chunk_records, completed_sources, write_run_json
from pipeline.inputs import Input
from stages.chain import build_source, build_stages, place_on_gpus
from stages.corpus_format import OutputDir
from stages.speakers import SourceLinker


def run_job(inputs: list[Input], config: PipelineConfig, address: str | None = None, allow_config_change: bool = False,
            note: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Process `inputs` into config.write.output; returns what run.json holds. `note` ends the
    first progress line; `extra` goes into run.json."""
    from pipeline.ray_runner import connected, run_pipeline  # the one module that imports ray

    for stage in [build_source(config), *build_stages(config)]:
        stage.preflight()  # a missing model is a ConfigError here, before any worker starts
    out = OutputDir(config.write.output)
    out.makedirs()
    out.remove_temporaries()
    with connected(address, config) as cluster:
        config = place_on_gpus(config, cluster.get("GPU", 0.0))
        check_config(out, config, allow_config_change)
        done = completed_sources(out)
        linker = SourceLinker.of(out, config.diarize)
        if linker and done:  # a run killed between a source's last commit and its speaker map
            linker.heal(chunk_records(out), done)
        todo = [i for i in inputs if i.uri not in done]
        print(f"[csm-corpus] {len(inputs)} inputs ({len(inputs) - len(todo)} already done), output {out.root}{note}",
              file=sys.stderr, flush=True)
        extra = {**(extra or {}), "inputs_skipped_done": len(inputs) - len(todo)}
        try:
            summary = run_pipeline([i.uri for i in todo], [i.size for i in todo], config, linker and linker.committed)
        except RunStopped as stop:
            try:  # when it can be: a full disk may refuse this too
                write_run_json(out, config, {"stopped": str(stop)}, extra)
            except OSError:
                pass
            raise
    return write_run_json(out, config, summary, extra)
