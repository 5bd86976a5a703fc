"""`train SHARDS_DIR --config FILE --output RUN_DIR [--max-steps N] [--resume] [--set key=value ...]`

Registered by the pipeline as `pipeline train`; `torchrun --nproc_per_node K -m train ...` runs it
on several processes (see train/__main__.py).
"""

from __future__ import annotations

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
