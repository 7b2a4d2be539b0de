"""Data-parallel evaluation under `torchrun` / `accelerate launch`: shard by rank, gather on rank 0."""
from __future__ import annotations

import os
from typing import Any


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> tuple[int, int]:
    """Join the process group when launched with several processes; (rank, world size)."""
    rank, size = world()
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            import torch

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, size


def device_for_rank(device: str) -> str:
    rank_local = int(os.environ.get("LOCAL_RANK", 0))
    return f"cuda:{rank_local}" if device == "cuda" and world()[1] > 1 else device


def gather(obj: Any) -> list[Any] | None:
    """Every rank's object on rank 0 (None elsewhere); the object itself when not distributed."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
