"""kNN search strategies, the vote, and kNN classification: pure functions of arrays, no files, no models.

The search is a small callable `search(gallery, queries, k, metric) -> (distances, ids)`
(a pytorch-metric-learning style strategy object), FAISS by default; `brute_force_search` is the
slow obvious loop the tests compare it with. `retrieval.knn` evaluates a run or an index with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SearchFn = Callable[[np.ndarray, np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]
WEIGHTINGS = ("majority", "distance")


def faiss_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search: (Q, k) distances ascending (L2, or 1 - cos) and (Q, k) gallery ids."""
    from carspotter.retrieval.index import GalleryIndex

    meta = [{} for _ in range(len(gallery))]
    index = GalleryIndex.build(gallery, meta, metric=metric, index_type="Flat")
    return index.search(queries, min(k, len(gallery)))


def brute_force_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """One query at a time, in float64, with a stable sort: slow, obvious, the reference for tests."""
    g = np.asarray(gallery, dtype=np.float64)
    if metric == "cosine":
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    dists, ids = [], []
    for q in np.asarray(queries, dtype=np.float64):
        if metric == "cosine":
            q = q / max(np.linalg.norm(q), 1e-12)
            d = 1.0 - g @ q
        else:
            d = np.sqrt(((g - q) ** 2).sum(axis=1))
        order = np.argsort(d, kind="stable")[:k]
        dists.append(d[order])
        ids.append(order)
    return np.asarray(dists, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def vote(
    neighbor_labels: np.ndarray, neighbor_dists: np.ndarray, num_classes: int, weighting: str = "majority"
) -> np.ndarray:
    """(Q, k) labels + distances → (Q, C) scores. Ties go to the class whose first neighbour is nearest."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    q, k = neighbor_labels.shape
    w = np.ones((q, k)) if weighting == "majority" else 1.0 / (np.asarray(neighbor_dists, np.float64) + 1e-8)
    scores = np.zeros((q, num_classes), dtype=np.float64)
    valid = neighbor_labels >= 0
    rows = np.repeat(np.arange(q), k).reshape(q, k)
    np.add.at(scores, (rows[valid], neighbor_labels[valid]), w[valid])
    # tie-break: a bonus far smaller than any vote, larger for nearer ranks (rank 0 nearest)
    bonus = np.broadcast_to(1e-9 * (k - np.arange(k)) / k, (q, k))
    best_rank_bonus = np.zeros_like(scores)
    np.maximum.at(best_rank_bonus, (rows[valid], neighbor_labels[valid]), bonus[valid])
    return scores + best_rank_bonus


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): euclidean on these ranks like cosine."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_classify(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    query_emb: np.ndarray,
    k: int,
    metric: str = "euclidean",
    weighting: str = "majority",
    num_classes: int | None = None,
    search: SearchFn = faiss_search,
) -> tuple[np.ndarray, np.ndarray]:
    """→ predictions (Q,) and normalised vote scores (Q, C)."""
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    c = int(num_classes or gallery_labels.max() + 1)
    d, ids = search(gallery_emb, query_emb, k, metric)  # (Q, k)
    nl = np.where(ids >= 0, gallery_labels[np.clip(ids, 0, None)], -1)
    scores = vote(nl, d, c, weighting)
    pred = scores.argmax(1)
    probs = scores / np.maximum(scores.sum(1, keepdims=True), 1e-12)
    return pred, probs
