"""Embedding sharded over torchrun ranks: rank r embeds items r, r+N, r+2N …; every rank gets all vectors.

`dist` is anything with rank / world_size / enabled / is_main (engine.distributed.DistInfo; the CLI makes it):
retrieval sits below engine, so this talks to torch.distributed directly. With one process (no torchrun) it is
a plain call, so `index` and `enrol` have one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SingleProcess:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return False

    @property
    def is_main(self) -> bool:
        return True


SINGLE = SingleProcess()


def shard_ids(n: int, dist: Any) -> np.ndarray:
    """This rank's item positions (strided, so ranks get equal shares ±1)."""
    return np.arange(dist.rank, n, dist.world_size, dtype=np.int64)


def broadcast(obj: Any, dist: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def embed_sharded(embed: Callable[[np.ndarray], np.ndarray], n: int, dist: Any) -> np.ndarray:
    """`embed(ids) -> (len(ids), D)` on this rank's shard; → all n vectors in item order (on every rank)."""
    ids = shard_ids(n, dist)
    vecs = np.ascontiguousarray(embed(ids), dtype=np.float32)
    if not dist.enabled:
        return vecs
    import torch.distributed as tdist

    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, (ids, vecs))
    all_ids = np.concatenate([p[0] for p in parts])
    all_vecs = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_ids, kind="stable")
    if len(all_ids) != n or not (all_ids[order] == np.arange(n)).all():
        raise RuntimeError(f"sharded embedding gathered {len(all_ids)} vectors for {n} items")
    return all_vecs[order]
