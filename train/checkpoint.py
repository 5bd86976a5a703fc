"""Checkpoints that resume exactly: model, optimizer, scheduler, step, data position, RNG states.

Layout: RUN_DIR/checkpoints/step-0000100/{state.pt, rng-<rank>.pt, meta.json} and
RUN_DIR/checkpoints/latest (name of the newest complete one). state.pt holds full (unsharded)
state dicts, written by rank 0, so a run can resume with another parallel mode or world size.
With train.checkpoint_format=sharded, model and optimizer go instead to dcp/ through
torch.distributed.checkpoint (each rank writes its own shards, nothing is gathered; DCP reshards on
load, so any world size resumes it) and the scheduler to scheduler.pt. Everything is loaded with
weights_only=True: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from train.parallel import Dist


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir: Path, d: Dist, model, optimizer, scheduler, step: int, data_state: dict, config: dict, keep: int,
         sharded: bool = False):
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"step": step, "data": data_state, "world": d.world, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()
    if sharded:  # collective: every rank writes its own shards
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        if d.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    else:  # collective (FSDP gathers shards); only rank 0 writes the full state
        opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
        if d.is_main:
            torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict()}, tmp / "state.pt")
    _barrier()
    torch.save(_rng_state(), tmp / f"rng-{d.rank}.pt")
    _barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest").write_text(final.name)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(run_dir: Path) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / "latest"
    return marker.parent / marker.read_text().strip() if marker.exists() else None


def load(path: Path, d: Dist, model, optimizer, scheduler) -> dict:
    """Restores everything in place; returns meta (step, data position). RNG states are restored
    per rank when the world size matches (otherwise each rank keeps its fresh seed)."""
    if (path / "dcp").is_dir():  # sharded: read into this run's own layout, whatever the saving world size
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    else:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
    meta = json.loads((path / "meta.json").read_text())
    rng = path / f"rng-{d.rank}.pt"
    if meta["world"] == d.world and rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def find(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the latest one."""
    root = Path(run_dir) / "checkpoints"
    path = root / f"step-{step:07d}" if step is not None else latest(run_dir)
    if path is None or not ((path / "state.pt").exists() or (path / "dcp").is_dir()):
        have = sorted(p.name for p in root.glob("step-*")) if root.exists() else []
        raise FileNotFoundError(f"no checkpoint {'step ' + str(step) if step is not None else ''} under {root} "
                                f"(have: {', '.join(have) or 'none'})")
    return path


def load_run_model(run_dir: Path, step: int | None = None):
    """(model in eval mode, the run's Config, checkpoint path) from a run directory."""
    from train.config import load_config
    from train.model import CSM

    path = find(run_dir, step)
    cfg = load_config(None, json.loads((path / "meta.json").read_text())["config"])
    model = CSM(cfg.model)
    if (path / "dcp").is_dir():  # the model's part of a sharded checkpoint, in one process
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        model.load_state_dict(state["model"])
    else:
        model.load_state_dict(torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval(), cfg, path
