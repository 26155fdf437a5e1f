"""kNN search strategies and kNN classification.

The search is a small callable `search(gallery, queries, k, metric) -> (distances, ids)`
(a pytorch-metric-learning style strategy object), FAISS by default; `brute_force_search` is the
slow obvious loop the tests compare it with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def evaluate_knn(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    k: int,
    metric: str = "euclidean",
    weighting: str = "majority",
    num_classes: int | None = None,
    search: SearchFn = faiss_search,
) -> dict[str, Any]:
    """Classification metrics of the kNN classifier; predict_time_s covers the search + vote only."""
    from carspotter.engine.evaluate import classification_metrics

    t0 = time.perf_counter()
    pred, probs = knn_classify(
        gallery_emb, gallery_labels, query_emb, k, metric, weighting, num_classes, search
    )
    seconds = time.perf_counter() - t0
    m = classification_metrics(np.asarray(query_labels), pred, probs, None)
    m.update(
        predict_time_s=seconds,
        images_per_s=len(query_emb) / seconds if seconds > 0 else None,
        n_images=len(query_emb),
        k=k,
        metric=metric,
        weighting=weighting,
    )
    return m


def evaluate_knn_run(
    run_dir: str | Path,
    data_dir: str | Path | None,
    k: int,
    metric: str = "euclidean",
    split: str = "test",
    gallery_split: str = "train",
    device: str = "cpu",
    weighting: str = "majority",
    batch_size: int = 64,
    num_workers: int = 0,
    source: str = "auto",
    tta: str = "none",
    normalize: bool = False,
) -> dict[str, Any]:
    """kNN on a run's embeddings (gallery: `gallery_split`, queries: `split`; "train+val" joins splits).

    `source` picks the layer (retrieval.embed.SOURCES), tta="flip" averages each photo's embedding with its
    mirror image's, `normalize` L2-normalises embeddings before the search (and the distance-weighted vote).
    Writes RUN_DIR/metrics_knn{k}_{metric}.json (suffixed with the non-default options).

    predict_time_s counts embedding the queries plus the search, as the reference study's predict time did.
    """
    from carspotter.engine.checkpoint import load_run, read_run_config
    from carspotter.retrieval.embed import embed_dataset, eval_transform
    from carspotter.utils import atomic_write_json, resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, info = load_run(run_dir, dev)
    if data_dir is None:
        data_dir = read_run_config(run_dir).data.root
    tf = eval_transform(model, info.resize_size, info.crop_mode)
    gallery = _splits_dataset(data_dir, gallery_split, tf)
    queries = _splits_dataset(data_dir, split, tf)
    if len(gallery) == 0 or len(queries) == 0:
        raise ValueError(f"{data_dir}: split {gallery_split!r} or {split!r} is empty")
    opts = {"source": source, "amp": info.amp, "tta": tta}
    g = embed_dataset(model, gallery, batch_size, dev, num_workers, **opts)
    t0 = time.perf_counter()
    q = embed_dataset(model, queries, batch_size, dev, num_workers, **opts)
    if normalize:
        g, q = l2_normalize(g), l2_normalize(q)
    embed_s = time.perf_counter() - t0
    m = evaluate_knn(
        g,
        np.asarray(gallery.labels),
        q,
        np.asarray(queries.labels),
        k,
        metric,
        weighting,
        num_classes=len(gallery.class_names),
    )
    _add_embed_time(m, embed_s, len(queries))
    m.update(
        split=split,
        gallery_split=gallery_split,
        n_gallery=len(gallery),
        source=source,
        tta=tta,
        normalize=normalize,
        amp=info.amp,
    )
    extra = [source if source != "auto" else "", "flip" if tta == "flip" else "", "l2" if normalize else ""]
    extra.append(weighting if weighting != "majority" else "")
    suffix = "".join(f"_{e}" for e in extra if e)
    atomic_write_json(run_dir / f"metrics_knn{k}_{metric}{suffix}.json", m)
    return m


def _add_embed_time(m: dict[str, Any], embed_s: float, n: int) -> None:
    """predict_time_s = embedding the queries + search and vote (the reference study's predict time)."""
    m["search_time_s"] = m["predict_time_s"]
    m["predict_time_s"] = embed_s + m["search_time_s"]
    m["images_per_s"] = n / m["predict_time_s"]


def _splits_dataset(data_dir: str | Path, split: str, transform: Any) -> Any:
    """A PreparedDataset over one split, "all", or several joined by "+" (e.g. the whole labelled
    "train+val" as a kNN gallery: a kNN classifier has nothing to select on val)."""
    from carspotter.data.dataset import PreparedDataset

    parts = split.split("+")
    ds = PreparedDataset(data_dir, "all" if len(parts) > 1 else split, transform)
    if len(parts) > 1:
        ds.records = [r for r in ds.records if r.split in parts]
        ds.split = split
    return ds


def evaluate_knn_index(
    index_dir: str | Path,
    data_dir: str | Path,
    k: int,
    split: str = "test",
    weighting: str = "majority",
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, Any]:
    """kNN-classify a split's photos against a saved gallery index (its metric, its embedder).

    This is how frozen features of a bare backbone get a kNN score without a training run.
    Writes INDEX_DIR/metrics_knn{k}_{split}.json.
    """
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.retrieval.index import GalleryIndex
    from carspotter.retrieval.query import embedder_for_index, query_transform
    from carspotter.utils import atomic_write_json, resolve_device

    index_dir = Path(index_dir)
    dev = resolve_device(device)
    index = GalleryIndex.load(index_dir)
    model = embedder_for_index(index, dev)
    gallery_names = index.info.get("class_names") or []
    queries = _splits_dataset(data_dir, split, query_transform(index, model))
    if len(queries) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no photos")
    if list(queries.class_names) != list(gallery_names):
        raise ValueError(
            f"{data_dir}: its class names differ from those of the gallery in {index_dir}; "
            "kNN labels would not line up (index and evaluate the same prepared dataset)"
        )
    t0 = time.perf_counter()
    q = embed_dataset(
        model,
        queries,
        batch_size,
        dev,
        num_workers,
        index.info.get("embed_source", "auto"),
        amp=index.info.get("amp", "auto"),
        tta=index.info.get("embed_tta", "none"),
    )
    embed_s = time.perf_counter() - t0

    def search_index(_g: Any, qs: np.ndarray, kk: int, _metric: str) -> tuple[np.ndarray, np.ndarray]:
        return index.search(qs, kk)

    m = evaluate_knn(
        np.empty((0, q.shape[1]), dtype=np.float32),
        index.labels(),
        q,
        np.asarray(queries.labels),
        k,
        index.metric,
        weighting,
        num_classes=len(gallery_names),
        search=search_index,
    )
    _add_embed_time(m, embed_s, len(queries))
    m.update(split=split, gallery_split=index.info.get("split"), n_gallery=index.info.get("n"))
    atomic_write_json(index_dir / f"metrics_knn{k}_{split.replace('+', '-')}.json", m)
    return m
