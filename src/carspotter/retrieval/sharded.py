"""Embedding sharded over torchrun ranks: rank r embeds items r, r+N, r+2N …; every rank gets all vectors.

With one process (no torchrun) this is a plain call, so `index` and `enrol` have one code path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carspotter.engine.distributed import DistInfo, gather_by_index


def shard_ids(n: int, dist: DistInfo) -> np.ndarray:
    """This rank's item positions (strided, so ranks get equal shares ±1)."""
    return np.arange(dist.rank, n, dist.world_size, dtype=np.int64)


def embed_sharded(embed: Callable[[np.ndarray], np.ndarray], n: int, dist: DistInfo) -> np.ndarray:
    """`embed(ids) -> (len(ids), D)` on this rank's shard; → all n vectors in item order (on every rank)."""
    ids = shard_ids(n, dist)
    vecs = np.ascontiguousarray(embed(ids), dtype=np.float32)
    if not dist.enabled:
        return vecs
    out = gather_by_index({"index": ids, "vec": vecs}, dist)
    if len(out["index"]) != n:
        raise RuntimeError(f"sharded embedding gathered {len(out['index'])} of {n} vectors")
    return out["vec"]
