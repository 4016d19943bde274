"""Several processes (``torchrun``): joining the process group, this process's place in it, gathering.

Training splits each optimiser step's episodes across ranks and all-reduces the gradients
(``amt.train``); evaluation gives task ``t`` to rank ``t mod world`` and gathers the per-task results
(``amt.evaluate``). Without a process group everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

T = TypeVar("T")


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); True if this call created it.

    gloo on CPU, NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")
    return True


def close_distributed() -> None:
    """Leave the process group (after a barrier: without it the exit can crash while a peer still talks)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def world() -> tuple[int, int]:
    """(number of processes, this rank) of the default process group, or (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and shows progress."""
    return world()[1] == 0


def shard(n_tasks: int) -> range:
    """The task indices this process evaluates: ``t ≡ rank (mod world)`` (every task in a single process)."""
    size, rank = world()
    return range(rank, n_tasks, size)


def gather_by_index(local: dict[int, T]) -> dict[int, T]:
    """Union over ranks of per-index results (``{task index: result}``, disjoint across ranks), on every rank.

    Results travel as pickled Python objects (``all_gather_object``), so any picklable value works.
    """
    size, _ = world()
    if size == 1:
        return dict(local)
    parts: list[dict[int, T] | None] = [None] * size
    torch.distributed.all_gather_object(parts, local)
    out: dict[int, T] = {}
    for part in parts:
        out.update(part or {})
    return out
