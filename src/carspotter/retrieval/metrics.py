"""The metrics of carspotter: classification (checked against scikit-learn) and retrieval.

Both engine (training, evaluate) and retrieval (kNN, indexes) import them from here.

Retrieval metrics on the Cars196 protocol: Recall@K and MAP@R, every query excluded from its own results.

Recall@K (as in the metric-learning papers): the fraction of queries with at least one same-class photo among
their K nearest. MAP@R (Musgrave et al. 2020): for a query with R other same-class photos,
(1/R) Σ_{i≤R} P@i · [i-th neighbour is correct].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, top_k_accuracy_score

from carspotter.retrieval.search import SearchFn, brute_force_search, faiss_search


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None = None, loss: float | None = None
) -> dict[str, float | None]:
    """accuracy, top-5 accuracy, and macro F1/precision/recall over the classes present in `y_true`."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    out: dict[str, float | None] = {
        "loss": None if loss is None else float(loss),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top5_accuracy": None,
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "precision_macro": float(
            precision_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "recall_macro": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
    }
    if probs is not None:
        n_classes = probs.shape[1]
        if n_classes <= 5:
            out["top5_accuracy"] = 1.0
        else:
            out["top5_accuracy"] = float(
                top_k_accuracy_score(y_true, probs, k=5, labels=np.arange(n_classes))
            )
    return out


def drop_self(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row (query i is gallery item i); keep the first k others."""
    n = ids.shape[0]
    keep = ids != np.arange(n)[:, None]
    # a row that did not contain itself (exact ties) drops its last entry instead
    missing_self = keep.all(axis=1)
    keep[missing_self, -1] = False
    out_ids = ids[keep].reshape(n, -1)[:, :k]
    out_d = dists[keep].reshape(n, -1)[:, :k]
    return out_ids, out_d


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    metric: str = "euclidean",
    ks: Sequence[int] = (1, 2, 4, 8),
    search: SearchFn = faiss_search,
) -> dict[str, Any]:
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
    y = np.asarray(labels, dtype=np.int64)  # (N,)
    n = len(y)
    if n < 2:
        raise ValueError("retrieval metrics need at least two embeddings")
    counts = np.bincount(y)
    r = counts[y] - 1  # (N,) other same-class items per query
    depth = int(min(n - 1, max(max(ks), int(r.max()))))
    d, ids = search(emb, emb, depth + 1, metric)  # (N, depth+1) includes self
    ids, _ = drop_self(ids, d, depth)  # (N, depth)
    hit = y[np.clip(ids, 0, None)] == y[:, None]  # (N, depth) bool
    hit &= ids >= 0
    out: dict[str, Any] = {}
    for k in ks:
        out[f"recall_at_{k}"] = float(hit[:, :k].any(axis=1).mean())
    # MAP@R over queries that have at least one other photo of their class
    ranks = np.arange(1, depth + 1)[None, :]  # (1, depth)
    within_r = ranks <= r[:, None]  # (N, depth)
    rel = hit & within_r
    prec_at_i = np.cumsum(rel, axis=1) / ranks
    ap = (prec_at_i * rel).sum(axis=1) / np.maximum(r, 1)
    valid = r > 0
    out["map_at_r"] = float(ap[valid].mean()) if valid.any() else 0.0
    out.update(n=int(n), metric=metric, n_queries_with_positives=int(valid.sum()))
    return out


def brute_force_retrieval_metrics(
    embeddings: np.ndarray, labels: Sequence[int], metric: str = "euclidean", ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[str, float]:
    """The slow obvious loop the fast path is tested against."""
    y = np.asarray(labels)
    n = len(y)
    recalls = {k: 0 for k in ks}
    aps = []
    for i in range(n):
        _, order = brute_force_search(np.delete(embeddings, i, axis=0), embeddings[i : i + 1], n - 1, metric)
        others = np.delete(y, i)[order[0]]
        for k in ks:
            recalls[k] += int((others[:k] == y[i]).any())
        r = int((others == y[i]).sum())
        if r:
            correct = others[:r] == y[i]
            aps.append(sum(correct[: j + 1].sum() / (j + 1) for j in range(r) if correct[j]) / r)
    res = {f"recall_at_{k}": recalls[k] / n for k in ks}
    res["map_at_r"] = float(np.mean(aps)) if aps else 0.0
    return res
