"""Retrieval examples for the report: a few query photos and their top-k gallery photos from an index dir.

With the index's run dir at hand, queries are held-out photos (test/val split of the prepared dir) embedded
by the same network; otherwise gallery photos are used as queries with their stored vectors (leave-one-out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carspotter.report.plots import GridCell, retrieval_grid

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


def _search_with_model(index: Any, info: dict[str, Any], queries: list[dict[str, Any]], k: int) -> Any:
    from carspotter.engine.checkpoint import load_run
    from carspotter.retrieval.embed import embed_images

    model, _ = load_run(info["run_dir"], "cpu")
    root = Path(info["data_root"])
    from carspotter.data.images import open_rgb

    images = [open_rgb(root / q["path"]) for q in queries]
    emb = embed_images(model, images, device="cpu")  # (Q, D)
    return index.search(np.ascontiguousarray(emb, dtype=np.float32), k)


def _search_leave_one_out(index_dir: Path, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    fi = faiss.read_index(str(index_dir / "index.faiss"))
    vecs = np.stack([fi.reconstruct(i) for i in ids]).astype(
        np.float32
    )  # (Q, D), already normalised if cosine
    d, found = fi.search(vecs, k + 1)
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
    if run_dir and (Path(run_dir) / "model.json").is_file() and (root / "manifest.csv").is_file():
        queries = _pick(_query_records(root, {str(m.get("split")) for m in meta}), n_queries)
    if queries:
        dist, ids = _search_with_model(index, info, queries, k)
        how = (
            f"{len(queries)} held-out {queries[0]['split']} photos embedded by {Path(run_dir).name}; "
            f"top-{k} of {len(meta)} gallery photos"
        )
        q_paths = [root / q["path"] for q in queries]
    else:
        chosen = _pick([dict(m, _id=i) for i, m in enumerate(meta)], n_queries)
        queries = chosen
        dist, ids = _search_leave_one_out(index_dir, [int(c["_id"]) for c in chosen], k)
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
    png = retrieval_grid(rows, f"Retrieval examples — {index_dir.name} ({metric})")
    return png, how
