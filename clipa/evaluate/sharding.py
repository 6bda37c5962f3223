"""Splitting evaluation over the processes of a group and gathering the results.

Every process takes every world-th item (rank, rank + world, ...), so N processes each decode and
encode 1/N of the data; results are gathered back in the original order, so the numbers equal a
1-process run. Outside a process group these are no-ops. (open_clip_train evaluates on rank 0 only.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Subset


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launcher():
    """Join the process group torchrun / accelerate launch describe in the environment (nothing to
    join for a plain `clipa ...`); returns the accelerate Accelerator (device, is_main_process)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def shard(dataset):
    """This process's slice of a map-style dataset."""
    rank, world = rank_world()
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


def shard_range(n: int) -> range:
    rank, world = rank_world()
    return range(rank, n, world)


def gather_batches(index_batches: list[torch.Tensor], *column_batches: list[torch.Tensor]):
    """All processes' (index, columns...) batches, concatenated and sorted by index; None if no
    process produced any. Batches are gathered as lists (a process may have none at all)."""
    _, world = rank_world()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (index_batches, column_batches))
        index_batches = [t for part in parts for t in part[0]]
        column_batches = tuple([t for part in parts for t in part[1][c]] for c in range(len(column_batches)))
    if not index_batches:
        return None
    index = torch.cat(index_batches)
    order = index.argsort()
    return (index[order], *(torch.cat(columns)[order] for columns in column_batches))


def sum_over_processes(tensor: torch.Tensor, device) -> torch.Tensor:
    _, world = rank_world()
    if world == 1:
        return tensor
    tensor = tensor.to(device)  # NCCL reduces on the GPU; gloo on the CPU
    dist.all_reduce(tensor)
    return tensor.cpu()


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every process (e.g. a feature cache every process can see)."""
    _, world = rank_world()
    if world == 1:
        return flag
    value = [None] * world
    dist.all_gather_object(value, bool(flag))
    return all(value)
