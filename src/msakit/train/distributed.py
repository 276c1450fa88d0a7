"""Distributed data-parallel training (PyTorch DDP) under torchrun.

    torchrun --nproc-per-node 2 -m msakit train --config ... --out runs/x
    # several machines: the same command on each, with torchrun's usual rendezvous arguments
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --master-addr HOST0 --master-port 29500 \\
        -m msakit train ...

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) and joins
the process group once: `gloo` on CPU, `nccl` on GPUs (each process then uses cuda:LOCAL_RANK),
and leaves it at interpreter exit (`atexit`): a gloo process that exits still in its group can
abort with SIGABRT ("terminate called without an active exception") when its worker threads
are torn down with the interpreter (pytorch/pytorch#179291).
Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op and training is the ordinary
one-process loop.

What the loop does with it (msakit/train/loop.py):
- `data.batch_size` stays the GLOBAL batch. Each epoch's global batches are exactly those of a
  one-process run (same seed, same order); each is cut into `world` contiguous shards, one per
  process (`data.base.to_loader(shard=...)`). With the mean-reduced losses the models return and
  DDP's gradient averaging, a step is the one-process step whenever the shards are equal in size
  (uneven shards weigh each process's mean equally). This is a sampler of our own rather than
  torch's `DistributedSampler`: that one interleaves samples, so its global batches differ from
  a one-process run's, and it pads the split by repeating samples.
- Validation and test: each process predicts its shards of the split, `gather()` collects them,
  and every process computes the metrics on the whole split, each sample exactly once (no
  padding), so early stopping and selection agree across processes.
- Only rank 0 writes checkpoints, logs, predictions and results; on `--resume` rank 0 reads
  last.pt and `broadcast()`s it, so the output folder need not be shared between machines.
- Dropout: rank 0 keeps the one-process random stream; other ranks reseed (seed, rank, epoch).
- Refused under DDP (TrainingError naming the reason): models with their own `training_step`
  (they call backward/step themselves), with `on_after_backward` (per-process gradient edits
  would make the replicas diverge), or declaring `ddp_unsupported = "<why>"` (state updated in
  the forward pass, which DDP's buffer broadcast from rank 0 would overwrite).
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.active else None


def current() -> Context:
    """The process group this process belongs to (Context() when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def main_process() -> bool:
    """Rank 0, or no torchrun at all (also before the process group is joined)."""
    return current().main if current().active else int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join torchrun's process group (once) if WORLD_SIZE > 1; returns it and this process's
    device (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return current(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
        # the CLI quiets ranks > 0 from its start; this is for callers of the Python API
        quiet = logging.getLogger("msakit").getEffectiveLevel() > logging.DEBUG  # -v: every rank speaks
        if dist.get_rank() > 0 and quiet:  # one log, one table: rank 0 speaks
            logging.getLogger("msakit").setLevel(logging.WARNING)
    return current(), device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_supported(model: nn.Module, model_name: str) -> None:
    """Raise ValueError naming the reason when `model` cannot train under DDP."""
    reason = getattr(model, "ddp_unsupported", None)
    if hasattr(model, "training_step"):
        reason = "it has its own training step (its own backward and optimiser steps)"
    elif hasattr(model, "on_after_backward"):
        reason = "it edits gradients after backward, per process, so the replicas would diverge"
    if reason:
        raise ValueError(f"model {model_name!r} cannot train with torchrun/DDP: {reason}; "
                         "train it in one process")


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP wrapper whose forward all-reduces the gradients in backward."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (just [value] without a process group)."""
    ctx = current()
    if not ctx.active:
        return [value]
    values: list[Any] = [None] * ctx.world
    dist.all_gather_object(values, value)
    return values


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the processes (`values` itself without a process group). Every
    process's loss is the mean over its shard of the batch, so with equal shards their mean is
    the one-process loss of the batch (uneven shards weigh each process equally, as DDP's
    gradient average does)."""
    every = gather(values)
    return {key: sum(v[key] for v in every) / len(every) for key in values}


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every process."""
    if not current().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reseed(seed: int, epoch: int) -> None:
    """Ranks > 0 draw their own dropout masks; rank 0 keeps the one-process stream."""
    ctx = current()
    if ctx.active and not ctx.main:
        torch.manual_seed((seed * 1_000_003 + ctx.rank * 10_007 + epoch) % 2**63)
