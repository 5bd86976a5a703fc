"""`pipeline run | stats | pack | link-speakers | train`."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from pipeline.config import CONFIG_DIR, ConfigError, load_config


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """csm-corpus: conversational audio -> CSM training corpus, and its trainer."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--output", "-o", required=True, help="Corpus directory (local path or URI).")
@click.option("--config", "-c", "config_files", multiple=True, help="YAML overrides (repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key, e.g. asr.batch_size=16.")
@click.option("--address", default=None, help="Join a Ray cluster: auto or HOST:PORT. Default: a local instance.")
@click.option("--allow-config-change", is_flag=True, help="Add to a corpus made with a different config.")
def run(inputs, output, config_files, sets, address, allow_config_change) -> None:
    """Process INPUTS (files, directories, globs, .txt lists, URIs) into a corpus at OUTPUT.

    With no INPUTS: the embedded default corpus (pyannote's sample conversation)."""
    from pipeline.config import RunStopped
    from pipeline.inputs import embedded_default, expand_inputs
    from pipeline.job import run_job
    from stages.corpus_format import RUN_FILE, OutputDir

    embedded = not inputs
    files = ([str(CONFIG_DIR / "embedded.yaml")] if embedded else []) + list(config_files)
    try:
        config = load_config(files, list(sets), {"write": {"output": output}})
        found = expand_inputs(list(inputs) or embedded_default())
        run = run_job(found, config, address, allow_config_change, " — embedded default corpus" if embedded else "",
                      {"embedded_default": embedded})
    except (ConfigError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    except RunStopped as exc:  # one line, non-zero; what was committed stays and a rerun resumes
        raise click.ClickException(f"stopped: {exc}; rerun the same command to resume") from None
    unwritten = run["counts"].get("not_written", 0)
    click.echo(
        f"[csm-corpus] done: {run['counts'].get('samples', 0)} samples from {run['audio_hours'] * 3600:.1f} s of audio "
        f"in {run['wall_seconds']:.1f} s ({run['real_time_factor']:.2f}x real time); "
        f"{sum(run['errors_by_type'].values())} errors{f', {unwritten} chunks not written' if unwritten else ''}; "
        f"see {OutputDir(output).uri(RUN_FILE)}",
        err=True,
    )
    codec = run["models"].get("codec") or {}
    if codec and not codec.get("released", True):
        click.echo(f"[csm-corpus] WARNING: codes come from {codec.get('weights')}, not the released Mimi weights.", err=True)
    if unwritten:
        raise click.ClickException(f"{unwritten} chunks could not be written (errors above); rerun the same command to retry them")


@main.command()
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--report", default=None, metavar="FILE.html", help="Also write an HTML report, PNG figures next to it.")
def stats(directory: str, as_json: bool, report: str | None) -> None:
    """What is in the corpus at DIRECTORY (read from manifests, not shards)."""
    from pipeline.stats import corpus_stats, format_stats

    if "://" not in directory and not os.path.isdir(directory):
        raise click.UsageError(f"no corpus at {directory}")
    try:
        s = corpus_stats(directory)
    except (ValueError, OSError) as exc:  # not a corpus, an older layout, a store that refuses
        raise click.UsageError(" ".join(str(exc).split())) from None
    click.echo(json.dumps(s, indent=1, sort_keys=True) if as_json else format_stats(s))
    if report:
        from pipeline.report import write_report

        pngs = write_report(directory, report)
        click.echo(f"[csm-corpus] report: {report} ({len(pngs)} figures)", err=True)


@main.command()
@click.argument("directory")
@click.option("--output", "-o", required=True, help="Packed corpus directory (local path or URI).")
@click.option("--shard-size", default="1GB", show_default=True, help="Target shard size (e.g. 500MB, 1GB).")
@click.option("--val-fraction", default=0.005, show_default=True, type=float, help="Share of sources held out in val/.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the shuffle and the split.")
@click.option("--address", default=None, help="Run the passes as tasks on the Ray cluster at HOST:PORT (or auto).")
def pack(directory: str, output: str, shard_size: str, val_fraction: float, seed: int, address: str | None) -> None:
    """Repack the corpus at DIRECTORY into shuffled train/ and val/ shards of about --shard-size.
    Interrupted, the same command resumes."""
    import contextlib

    from pipeline.pack import pack as run_pack
    from pipeline.pack import parse_size

    if address:
        from pipeline.ray_runner import task_mapper  # imports ray
    try:
        with task_mapper(address) if address else contextlib.nullcontext(None) as map_tasks:
            summary = run_pack(directory, output, parse_size(shard_size), val_fraction, seed, map_tasks)
    except (ValueError, OSError) as exc:
        raise click.UsageError(" ".join(str(exc).split())) from None
    splits = ", ".join(f"{k}: {v['samples']} samples in {v['shards']} shards from {v['sources']} sources"
                       for k, v in summary["splits"].items())
    click.echo(f"[csm-corpus] packed {splits}; {summary['duplicates']} duplicate samples dropped (duplicates.parquet)", err=True)


@main.command("link-speakers")
@click.argument("directory")
@click.option("--group-by", default=None, metavar="COLUMN",
              help="Link only speakers whose sources share this speakers/ column (e.g. source_dir: one show per directory).")
@click.option("--threshold", default=None, type=float,
              help="Cosine distance that ends linking. Default: the corpus's diarize.link_threshold.")
def link_speakers(directory: str, group_by: str | None, threshold: float | None) -> None:
    """Link the source speakers of the corpus at DIRECTORY (speakers/*.parquet) into corpus
    speakers, written to DIRECTORY/speaker_map.parquet with how confident each link is."""
    from stages.corpus_format import CONFIG_FILE, OutputDir
    from stages.speakers import CORPUS_MAP, write_corpus_map

    from stages.corpus_parts import layout_problem

    out = OutputDir(directory)
    if not out.exists(CONFIG_FILE):
        raise click.UsageError(f"no corpus at {directory}")
    if problem := layout_problem(out):
        raise click.UsageError(problem)
    if threshold is None:
        from stages.diarize import DiarizeConfig

        diarize = json.loads(out.read_bytes(CONFIG_FILE))["config"]["diarize"]
        threshold = diarize.get("link_threshold", DiarizeConfig.link_threshold)  # a corpus made before linking
    try:
        linked = write_corpus_map(out, threshold, group_by)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    conf = linked["confidence"]
    click.echo(f"[csm-corpus] {linked['speakers']} source speakers -> {linked['corpus_speakers']} corpus speakers "
               f"(threshold {threshold:g}{f', within {group_by}' if group_by else ''}); links: "
               f"{', '.join(f'{v} {k}' for k, v in sorted(conf.items())) or 'none'}; see {out.uri(CORPUS_MAP)}", err=True)


from train.cli import evaluate, export, generate, train  # noqa: E402  (registered after the group exists)

main.add_command(train, name="train")
main.add_command(export, name="export")
main.add_command(generate, name="generate")
main.add_command(evaluate, name="evaluate")

if __name__ == "__main__":
    sys.exit(main())
