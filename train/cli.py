"""`train SHARDS_DIR --config FILE --output RUN_DIR [--max-steps N] [--resume] [--set key=value ...]`

Registered by the pipeline as `pipeline train`; `torchrun --nproc_per_node K -m train ...` runs it
on several processes (see train/__main__.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import click

from train.config import load_config, parse_sets


@click.command("train")
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML overrides of the defaults in train/config.py (e.g. configs/train/tiny.yaml).")
@click.option("--output", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoints, metrics.jsonl, config.json.")
@click.option("--max-steps", type=int, default=None, help="Stop after this step (the LR schedule keeps train.steps).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the run directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.lr=1e-4.")
def train(shards_dir, config_file, run_dir, max_steps, resume, overrides):
    """Train CSM (backbone + decoder) on the WebDataset shards under SHARDS_DIR/shards."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from train.loop import run  # torch import deferred: `pipeline --help` stays fast

    try:
        cfg = load_config(config_file, parse_sets(overrides))
    except (KeyError, TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    run(cfg, shards_dir, run_dir, max_steps=max_steps, resume=resume)


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="transformers-format directory to write.")
def export(run_dir, step, output):
    """Write RUN_DIR's checkpoint as a transformers CsmForConditionalGeneration directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from train.export import export as run_export

    try:
        summary = run_export(run_dir, output, step)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"[csm-corpus] exported {summary['checkpoint']} to {output} (codec weights: {summary['codec_weights']}, "
               f"tokenizer: {summary['tokenizer']})", err=True)


@click.command("generate")
@click.argument("model")
@click.option("--text", required=True, help='What to say, with the speaker: "[0]Hello there."')
@click.option("--context", "contexts", multiple=True, metavar="KEY|TEXT|WAV",
              help="Earlier turn, oldest first (repeatable): a corpus sample key (needs --shards), or "
                   "'[1]what was said|path.wav'.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Corpus directory for context keys.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="WAV to write (24 kHz).")
@click.option("--step", type=int, default=None, help="Checkpoint step of a run directory (default: the latest).")
@click.option("--tokenizer", default=None, help="Text tokenizer (default: the run's, or the model directory's).")
@click.option("--max-seconds", type=float, default=None)
@click.option("--temperature", type=float, default=None, help="0: greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--mimi", default=None, help="Local Mimi safetensors (default: the hub's released file).")
@click.option("--allow-unreleased-codec", is_flag=True,
              help="Decode with the seeded random Mimi when the released one cannot be had (noise, marked).")
def generate(model, text, contexts, shards, output, step, tokenizer, max_seconds, temperature, top_k, seed,
             mimi, allow_unreleased_codec):
    """Speak TEXT with MODEL (a run directory, a transformers-format directory or a hub id) into a WAV."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from train import generate as gen

    given = {k: v for k, v in dict(max_seconds=max_seconds, temperature=temperature, top_k=top_k, seed=seed,
                                   mimi=mimi).items() if v is not None}
    try:
        loaded = gen.load(model, step, tokenizer)
        g = dataclasses.replace(loaded.generate, **given)  # the model's defaults, then the options
        codec, codec_id = gen.load_codec(loaded.model.N, allow_unreleased_codec or loaded.allow_unreleased_codec, g.mimi)
        rows = []
        for c in contexts:
            if "|" in c:
                said, wav = c.rsplit("|", 1)
                rows.append(gen.segment_rows(loaded.tokenizer, said, gen.encode_wav(codec, wav), loaded.model.N))
            elif shards:
                rows.append(gen.sample_context(shards, c, loaded.tokenizer, loaded.model.N))
            else:
                raise ValueError(f"--context {c}: a sample key needs --shards DIR")
        result = gen.synthesize(loaded, text, rows, g, codec)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.UsageError(str(e)) from e
    gen.write_wav(output, result, {"model": loaded.info, "codec": codec_id, "generate": dataclasses.asdict(g),
                                   "context": list(contexts)})
    click.echo(f"[csm-corpus] {output}: {result['seconds']:.2f} s, {len(result['frames'])} frames "
               f"(stopped at {result['stopped']}), {result['frames_per_s']:.1f} frames/s; model {loaded.info['model']}",
               err=True)
    if not codec_id.get("released", False):
        click.echo(f"[csm-corpus] WARNING: decoded with {codec_id.get('weights')}, NOT the released Mimi: "
                   "the audio is noise (marked in the .json next to it).", err=True)


@click.command("evaluate")
@click.argument("model")
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Corpus (or packed corpus) directory: its held-out sources give the loss and the contexts.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="report.json to write.")
@click.option("--report", "html_out", type=click.Path(dir_okay=False), default=None, help="Also an HTML page.")
@click.option("--step", type=int, default=None, help="Checkpoint step of a run directory (default: the latest).")
@click.option("--tokenizer", default=None, help="Text tokenizer (default: the run's, or the model directory's).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML overrides of EvaluateConfig in train/config.py (e.g. configs/train/evaluate.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="e.g. phoneme_model=DIR.")
def evaluate(model, shards, output, html_out, step, tokenizer, config_file, overrides):
    """Score MODEL (run directory, transformers CSM directory or hub id): held-out loss per codebook,
    intelligibility, speaker similarity, length and stopping, the pronunciation tests."""
    import json

    from stages.overrides import read_yaml, with_overrides
    from train.config import EvaluateConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from train import evaluate as ev

    try:
        cfg = with_overrides(EvaluateConfig(), read_yaml(config_file) if config_file else {})
        cfg = with_overrides(cfg, parse_sets(overrides))
        report = ev.evaluate(model, shards, cfg, step, tokenizer)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from e
    with open(output, "w") as f:
        json.dump(report, f, indent=1)
    if html_out:
        ev.write_html(report, html_out)
    for metric, reason in report["not_scored"].items():
        click.echo(f"[csm-corpus] NOT SCORED {metric}: {reason}", err=True)
    click.echo(f"[csm-corpus] {output}: {len(report['prompts'])} prompts, {len(report['not_scored'])} metric(s) not scored",
               err=True)
