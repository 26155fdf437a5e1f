"""Evidence photos: the gallery photos a prediction rests on, per class.

For "why Audi TTS Coupe and not TT RS" a person wants the nearest gallery photos *of the predicted class*
and the nearest photo *of the runner-up*, side by side, with their distances. The query is embedded
exactly like the gallery (retrieval.query.embed_queries: the index's own preprocessing and embedding
source), and the index is searched wider and wider until every asked class has its photos (exact for Flat
indexes, as exact as the index otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from carspotter.retrieval.index import GalleryIndex, GalleryIndexError


def check_same_classes(index: GalleryIndex, class_names: Sequence[str], where: str = "the index") -> None:
    """Evidence by class only makes sense when the gallery's labels are the model's labels."""
    names = index.info.get("class_names")
    if names is not None and list(names) != list(class_names):
        raise GalleryIndexError(
            f"{where} labels {len(names)} classes that differ from the model's {len(class_names)}; "
            "build the index over the run's own dataset (`carspotter index RUN --data DATA`)"
        )


def nearest_of_classes(
    index: GalleryIndex, query: np.ndarray, wanted: dict[int, int]
) -> dict[int, list[dict[str, Any]]]:
    """For one query vector (D,), `wanted[c]` nearest gallery photos of each class c, nearest first.

    Each hit: {"id", "path", "class_id", "class_name", "distance"}. A class with fewer gallery photos than
    asked gets what there is.
    """
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    n = len(index.meta)
    found: dict[int, list[dict[str, Any]]] = {c: [] for c in wanted}
    if n == 0 or not wanted:
        return found
    labels = index.labels()
    available = {c: int((labels == c).sum()) for c in wanted}
    k = min(n, max(64, 8 * sum(wanted.values())))
    while True:
        dist, ids = index.search(q, k)
        found = {c: [] for c in wanted}
        for d, i in zip(dist[0].tolist(), ids[0].tolist(), strict=True):
            if i < 0:
                continue
            c = int(labels[i])
            if c in found and len(found[c]) < wanted[c]:
                m = index.meta[i]
                found[c].append(
                    {"id": int(i), "path": str(m["path"]), "class_id": c, "class_name": str(m["class_name"]),
                     "distance": float(d)}
                )  # fmt: skip
        if all(len(found[c]) >= min(wanted[c], available[c]) for c in wanted) or k >= n:
            return found
        k = min(n, 4 * k)


def evidence(
    index: GalleryIndex, query: np.ndarray, top1: int, runner_up: int | None, k: int = 3
) -> list[dict[str, Any]]:
    """[{"role": "top1"|"runner-up", "class_id", "hits": [...]}]: k photos of the predicted class, 1 of the
    runner-up (None: a one-class model)."""
    if k < 1:
        raise ValueError(f"k {k}: need at least one evidence photo")
    wanted = {int(top1): int(k)}
    if runner_up is not None and int(runner_up) != int(top1):
        wanted[int(runner_up)] = 1
    found = nearest_of_classes(index, query, wanted)
    out = [{"role": "top1", "class_id": int(top1), "hits": found[int(top1)]}]
    if len(wanted) > 1:
        out.append({"role": "runner-up", "class_id": int(runner_up), "hits": found[int(runner_up)]})  # type: ignore[arg-type]
    return out
