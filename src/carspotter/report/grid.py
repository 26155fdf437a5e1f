"""Retrieval examples for the report: a few query photos and their top-k gallery photos from an index dir.

With the index's run dir at hand, queries are held-out photos (test/val split of the prepared dir) embedded
by the same network; otherwise gallery photos are used as queries with their stored vectors (leave-one-out).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.report.plots import GridCell, retrieval_grid

log = logging.getLogger(__name__)
THUMB = 112


def _thumb(path: Path) -> Any:
    from carspotter.data.images import ImageError, open_rgb

    try:
        img = open_rgb(path)
    except (ImageError, OSError):
        return None
    img.thumbnail((THUMB, THUMB))
    return img


def _pick(candidates: list[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n photos of n different classes, chosen reproducibly."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(candidates))
    seen: set[str] = set()
    out = []
    for i in order:
        c = candidates[int(i)]
        if str(c["label"]) not in seen:
            seen.add(str(c["label"]))
            out.append(c)
        if len(out) == n:
            break
    return out


def _query_records(data_root: Path, gallery_splits: set[str]) -> list[dict[str, Any]]:
    from carspotter.data.manifest import read_manifest

    records = read_manifest(data_root)
    for split in ("test", "val"):
        held = [r for r in records if r.split == split and split not in gallery_splits]
        if held:
            return [
                {"path": r.path, "label": r.label, "class_name": r.class_name, "split": r.split} for r in held
            ]
    return []


def _search_with_model(index: Any, queries: list[dict[str, Any]], k: int) -> Any:
    """Embed held-out photos with the network that made the index, then search it."""
    from carspotter.data.images import open_rgb
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    model = embedder_for_index(index, "cpu")
    root = Path(index.info["data_root"])
    images = [open_rgb(root / q["path"]) for q in queries]
    emb = embed_queries(index, model, images)  # (Q, D)
    return index.search(emb, k)


def _search_leave_one_out(index: Any, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery photos as queries with their stored vectors; each query's own entry is dropped."""
    vecs = np.ascontiguousarray(index.vectors()[ids], dtype=np.float32)  # (Q, D)
    d, found = index.search(vecs, k + 1)
    out_d, out_i = [], []
    for q, row_d, row_i in zip(ids, d, found, strict=True):
        keep = [(a, b) for a, b in zip(row_d, row_i, strict=True) if b != q and b >= 0][:k]
        out_d.append([a for a, _ in keep])
        out_i.append([b for _, b in keep])
    return np.asarray(out_d, dtype=np.float32), np.asarray(out_i, dtype=np.int64)


def retrieval_examples(index_dir: str | Path, n_queries: int = 4, k: int = 5) -> tuple[bytes, str]:
    """(PNG bytes, a sentence saying how the queries were chosen). Raises on an unusable index."""
    index_dir = Path(index_dir)
    from carspotter.retrieval.index import GalleryIndex

    index = GalleryIndex.load(index_dir)
    info, meta = dict(index.info), list(index.meta)
    root = Path(info.get("data_root", ""))
    run_dir = info.get("run_dir")
    queries: list[dict[str, Any]] = []
    if (root / "manifest.csv").is_file():
        queries = _pick(_query_records(root, {str(m.get("split")) for m in meta}), n_queries)
    who = Path(run_dir).name if run_dir else str(info.get("backbone", "the index's network"))
    searched = None
    if queries:
        try:
            searched = _search_with_model(index, queries, k)
        except (OSError, ValueError) as e:  # the run/weights are not on this machine: fall back below
            log.info("retrieval examples: cannot embed new queries (%s); using gallery photos", e)
    if searched is not None:
        dist, ids = searched
        how = (
            f"{len(queries)} held-out {queries[0]['split']} photos embedded by {who}; "
            f"top-{k} of {len(meta)} gallery photos"
        )
        q_paths = [root / q["path"] for q in queries]
    else:
        chosen = _pick([dict(m, _id=i) for i, m in enumerate(meta)], n_queries)
        queries = chosen
        dist, ids = _search_leave_one_out(index, [int(c["_id"]) for c in chosen], k)
        how = f"{len(queries)} gallery photos as queries (themselves excluded); top-{k} of {len(meta)}"
        q_paths = [root / q["path"] for q in queries]
    rows = []
    for q, qp, drow, irow in zip(queries, q_paths, dist, ids, strict=True):
        row = [GridCell(_thumb(qp), str(q.get("class_name", q["label"])))]
        for d, i in zip(drow, irow, strict=True):
            if i < 0:
                continue
            g = meta[int(i)]
            row.append(
                GridCell(
                    _thumb(root / g["path"]),
                    str(g.get("class_name", g["label"])),
                    correct=str(g["label"]) == str(q["label"]),
                    distance=float(d),
                )
            )
        rows.append(row)
    metric = info.get("metric", "")
    png = retrieval_grid(rows, f"Retrieval: {who} embeddings, {metric} distance ({index_dir.name}/)")
    return png, how
