"""Process groups and model wrapping: one process, DDP or FSDP2 (`fully_shard`), set by parallel.mode."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from train.config import Config


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group, together, before the process exits. Left to interpreter exit, a
    gloo rank now and then aborted in its threads' teardown ("terminate called without an active
    exception", exit code -6) after its work was done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mode_of(cfg: Config, d: Dist) -> str:
    mode = cfg.parallel.mode
    if mode == "auto":
        mode = "ddp" if d.world > 1 else "none"
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel.mode must be auto, none, ddp or fsdp, got '{mode}'")
    if mode != "none" and d.world == 1 and not dist.is_initialized():
        mode = "none"  # one process: nothing to wrap
    return mode


def parallelize(model: nn.Module, cfg: Config, d: Dist) -> nn.Module:
    """Activation checkpointing and compile per block (state-dict keys stay unchanged), then wrap."""
    for stack in (model.backbone, model.decoder):
        stack.activation_checkpointing = cfg.train.activation_checkpointing
        if cfg.train.compile:
            for block in stack.layers:
                block.compile()
    mode = mode_of(cfg, d)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if d.device.type == "cuda" and cfg.train.dtype == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if mp else {}
        units = [block for stack in (model.backbone, model.decoder) for block in stack.layers] + [model]
        for unit in units:
            fully_shard(unit, **kw)
            # SUM + divide instead of ReduceOp.AVG, which gloo (CPU) does not implement: it sums.
            unit.set_force_sum_reduction_for_comms(True)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "backbone") else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
