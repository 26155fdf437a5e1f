"""Data-parallel plumbing for `torchrun`: env → process group, rank-0-only writes, gathers without padding.

`torchrun --nproc_per_node=N -m carspotter train …` sets RANK / WORLD_SIZE / LOCAL_RANK; with those absent
everything here degrades to a single process, so the engine has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from carspotter.utils import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun job (gloo on CPU, nccl on CUDA); return (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = resolve_device(device)
    if world <= 1:
        return DistInfo(), torch.device(name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if name.startswith("cuda"):
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, owns), dev


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (train loss/accuracy totals)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value on every rank (e.g. a failure message, so all ranks stop together)."""
    from carspotter.retrieval.sharded import broadcast  # the one implementation (retrieval sits below engine)

    return broadcast(obj, info)


def gather_by_index(parts: dict[str, np.ndarray], info: DistInfo) -> dict[str, np.ndarray]:
    """Concatenate per-sample arrays from all ranks, drop the sampler's padding duplicates, sort by index.

    `parts["index"]` holds each row's dataset index; every rank receives the full, deduplicated result.
    """
    if info.enabled:
        gathered: list[dict[str, np.ndarray] | None] = [None] * info.world_size
        dist.all_gather_object(gathered, parts)
        parts = {k: np.concatenate([g[k] for g in gathered if g is not None]) for k in parts}
    _, first = np.unique(parts["index"], return_index=True)  # sorted unique indices, first occurrence each
    return {k: v[first] for k, v in parts.items()}
