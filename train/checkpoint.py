"""Checkpoints that resume exactly: model, optimizer, scheduler, step, data position, RNG states.

Layout: RUN_DIR/checkpoints/step-0000100/{state.pt, rng-<rank>.pt, meta.json} and
RUN_DIR/checkpoints/latest (name of the newest complete one). state.pt holds full (unsharded)
state dicts, written by rank 0, so a run can resume with another parallel mode or world size.
With train.checkpoint_format=sharded, model and optimizer go instead to dcp/ through
torch.distributed.checkpoint (each rank writes its own shards, nothing is gathered; DCP reshards on
load, so any world size resumes it) and the scheduler to scheduler.pt. Everything is loaded with
weights_only=True: no arbitrary unpickling.

Asynchronous saves (sharded format, train.async_checkpoint): save() copies this rank's shards to host
memory (dcp.async_save's staging, the only part training waits for), writes meta, scheduler and RNG into
the .tmp- directory, and returns while DCP writes dcp/ from a background thread over its own gloo group
(never the training group: a collective from another thread would interleave with the step's). The
directory is renamed to step-N and `latest` updated only in wait(), after every rank has the write's
result; save() and the end of training call wait(). A run killed mid-write leaves a .tmp- directory
that resume never reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from train.parallel import Dist

log = logging.getLogger("train")


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


def async_mode(sharded: bool, requested: bool) -> tuple[bool, str]:
    """(save asynchronously?, the sentence the run logs about it): never a silent fallback."""
    if not sharded:
        return False, "full (state.pt gathered on rank 0), synchronous (train.async_checkpoint is for the sharded format)"
    if not requested:
        return False, "sharded (torch.distributed.checkpoint), synchronous (train.async_checkpoint: false)"
    if not hasattr(dcp, "async_save"):
        return False, f"sharded, SYNCHRONOUS: torch {torch.__version__} has no torch.distributed.checkpoint.async_save"
    return True, "sharded, asynchronous (dcp.async_save: training goes on while each checkpoint is written)"


class _Pending:
    """An asynchronous save in flight: DCP's future and where its directory goes when it completes."""

    def __init__(self, future, tmp: Path, final: Path, keep: int, d: Dist, staged_s: float):
        self.future, self.tmp, self.final, self.keep, self.d = future, tmp, final, keep, d
        self.t0, self.staged_s = time.perf_counter(), staged_s


_PENDING: list[_Pending] = []  # at most one: save() waits for the previous one first
_GROUP: list = []  # the gloo group of the background writes, made once per default process group


def _checkpoint_group():
    """A gloo group for DCP's background collectives (None in one process: DCP needs none there)."""
    if not dist.is_initialized():
        return None
    if not _GROUP or _GROUP[0][0] is not dist.group.WORLD:
        _GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]  # collective: every rank, same step
    return _GROUP[0][1]


def save(run_dir: Path, d: Dist, model, optimizer, scheduler, step: int, data_state: dict, config: dict, keep: int,
         sharded: bool = False, asynchronous: bool = False) -> Path:
    """Writes step `step`'s checkpoint; returns its directory. With `asynchronous` (sharded only) that
    directory exists, and `latest` names it, only once wait() has seen the write finish."""
    wait()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"step": step, "data": data_state, "world": d.world, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()
    future = None
    if sharded:  # collective: every rank writes its own shards
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if asynchronous:  # staged to host memory here; written by a background thread
            t = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=str(tmp / "dcp"), process_group=_checkpoint_group())
            staged_s = time.perf_counter() - t
        else:
            dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        if d.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    else:  # collective (FSDP gathers shards); only rank 0 writes the full state
        opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
        if d.is_main:
            torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict()}, tmp / "state.pt")
    _barrier()
    torch.save(_rng_state(), tmp / f"rng-{d.rank}.pt")
    if future is not None:
        _PENDING.append(_Pending(future, tmp, final, keep, d, staged_s))
        if d.is_main:
            log.info("checkpoint step %d: staged in %.2f s, writing in the background", step, staged_s)
        return final
    _complete(tmp, final, keep, d)
    return final


def wait() -> Path | None:
    """Waits for the asynchronous save in flight, if any, then marks it complete (rename, `latest`,
    pruning): collective, every rank calls it. Returns its directory. A failed write raises and leaves
    `latest` where it was."""
    if not _PENDING:
        return None
    p = _PENDING.pop()
    t = time.perf_counter()
    p.future.result()
    _complete(p.tmp, p.final, p.keep, p.d)
    if p.d.is_main:
        log.info("checkpoint %s complete: staged %.2f s, written %.2f s later (%.2f s waited for it)", p.final.name,
                 p.staged_s, time.perf_counter() - p.t0, time.perf_counter() - t)
    return p.final


@contextlib.contextmanager
def saving():
    """Around a training loop: the save in flight is complete when the block ends. If the block raises,
    one process still completes it (what was written is good); several abandon it, as waiting needs
    every rank: its .tmp- directory stays, never resumed from."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            _PENDING.clear()
        else:
            wait()
        raise
    wait()


def _complete(tmp: Path, final: Path, keep: int, d: Dist) -> None:
    _barrier()
    if d.is_main:
        root = final.parent
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest").write_text(final.name)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


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
