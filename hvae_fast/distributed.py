"""Data-parallel training under torchrun: torch.distributed with DistributedDataParallel.

`hvae-fast train` calls `setup()`; outside torchrun (WORLD_SIZE unset or 1) it returns
None and nothing here is used. Under torchrun every rank runs the same loop on the same
shuffled order (the same seeded generator) and takes its slice of each global batch,
as DistributedSampler would: with batch b per rank, one step on N ranks sees the same
N*b examples as one step of a single process with batch N*b.
"""
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self):
        """Only rank 0 writes checkpoints, logs and pictures."""
        return self.rank == 0


def setup():
    """Joins the process group torchrun describes (nccl on GPUs, gloo on CPUs), or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Context(dist.get_rank(), dist.get_world_size(), device)


def wrap(module, ctx):
    """DDP around module; BatchNorm becomes SyncBatchNorm where torch supports it (CUDA)."""
    if ctx.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        warnings.warn("SyncBatchNorm needs CUDA: on CPU ranks each BatchNorm normalizes with its own "
                      "rank's batch statistics", RuntimeWarning)
    module.to(ctx.device)
    return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def shard(rows, ctx):
    """This rank's slice of a global batch (equal slices; the last may be shorter)."""
    per = math.ceil(len(rows) / ctx.world)
    return rows[ctx.rank * per:(ctx.rank + 1) * per]


def every_rank_has_rows(n, ctx):
    """False when a global batch of n rows leaves some rank empty (such a batch is skipped)."""
    return n >= ctx.world and math.ceil(n / ctx.world) * (ctx.world - 1) < n


def all_sum(values, ctx):
    """Sums a list of floats over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module, ctx):
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    for b in module.buffers():
        dist.broadcast(b.data, 0)


def gather_rng(state, ctx):
    """Every rank's RNG state, rank by rank (each draws its own noise; a resume restores each)."""
    states = [None] * ctx.world
    dist.all_gather_object(states, {k: v for k, v in state.items() if k != "shuffle"})
    return states


def gather(obj, ctx):
    """Every rank's obj (picklable), rank by rank."""
    objs = [None] * ctx.world
    dist.all_gather_object(objs, obj)
    return objs


def barrier(ctx):
    if ctx is not None:
        dist.barrier()


def teardown(ctx, together=True):
    """Leaves the process group; with together, after every rank got here.

    gloo can abort a rank (std::terminate) that destroys its group while a peer is still busy
    (rank 0 writing, say), so a clean exit waits for all. A rank leaving on an error it alone
    met passes together=False: the others would never come."""
    if ctx is not None and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
