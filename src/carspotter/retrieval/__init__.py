"""Retrieval: embeddings, FAISS gallery indexes, kNN classification, Recall@K / MAP@R, metric losses."""

from __future__ import annotations

from typing import Any


def evaluate_index(index_dir: Any, ks: tuple[int, ...] = (1, 2, 4, 8)) -> Any:
    """Score an index dir's photos against each other → an EvalResult to `.save()` (retrieval.build)."""
    from carspotter.retrieval.build import evaluate_index as _evaluate_index

    return _evaluate_index(index_dir, ks)
