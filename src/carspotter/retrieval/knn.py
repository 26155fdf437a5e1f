"""kNN classification as an evaluation: on a run's embeddings, or of a split against a saved index.

The search and the vote are pure functions in `retrieval.search`; the metrics in `retrieval.metrics`. These
functions embed photos and return an `EvalResult` (the metrics, plus the file name they belong under);
they write nothing — the CLI saves it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.data.dataset import splits_dataset
from carspotter.retrieval.metrics import classification_metrics
from carspotter.retrieval.search import (
    WEIGHTINGS,
    SearchFn,
    brute_force_search,
    faiss_search,
    knn_classify,
    l2_normalize,
    vote,
)
from carspotter.rundir import EvalResult, data_tag, knn_metrics_name

__all__ = [
    "WEIGHTINGS",
    "SearchFn",
    "brute_force_search",
    "evaluate_knn",
    "evaluate_knn_index",
    "evaluate_knn_run",
    "faiss_search",
    "knn_classify",
    "l2_normalize",
    "vote",
]


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
) -> EvalResult:
    """kNN on a run's embeddings (gallery: `gallery_split`, queries: `split`; "train+val" joins splits).

    `source` picks the layer (retrieval.embed.SOURCES), tta="flip" averages each photo's embedding with its
    mirror image's, `normalize` L2-normalises embeddings before the search (and the distance-weighted vote);
    embeddings run at the run's precision (model.json amp).

    Saved (by the caller) as RUN_DIR/metrics_<split>_knn<k>_<metric>[…].json (rundir.knn_metrics_name).
    predict_time_s counts embedding the queries plus the search, as the reference study's predict time did.
    """
    from carspotter.models.loading import load_run
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.rundir import CONFIG, read_run_config
    from carspotter.utils import resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, info = load_run(run_dir, dev)
    own_root = read_run_config(run_dir).data.root if (run_dir / CONFIG).is_file() else None
    data_dir = data_dir or own_root
    if not data_dir:
        raise ValueError(f"{run_dir}: no {CONFIG} naming its data; pass --data PREPARED_DIR")
    tf = model.preprocess.transform()
    gallery = splits_dataset(data_dir, gallery_split, tf)
    queries = splits_dataset(data_dir, split, tf)
    if len(gallery) == 0 or len(queries) == 0:
        raise ValueError(f"{data_dir}: split {gallery_split!r} or {split!r} is empty")
    opts: dict[str, Any] = {"source": source, "amp": info.amp, "tta": tta}
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
    m.update(split=split, gallery_split=gallery_split, n_gallery=len(gallery), data=str(data_dir))
    m.update(source=source, tta=tta, normalize=normalize, amp=info.amp)
    options = tuple(o for o in (source if source != "auto" else "", tta if tta != "none" else "") if o)
    options += ("l2",) if normalize else ()
    name = knn_metrics_name(split, k, metric, weighting, gallery_split, data_tag(data_dir, own_root), options)
    return EvalResult(m, run_dir, {name: None})


def _add_embed_time(m: dict[str, Any], embed_s: float, n: int) -> None:
    """predict_time_s = embedding the queries + search and vote (the reference study's predict time)."""
    m["search_time_s"] = m["predict_time_s"]
    m["predict_time_s"] = embed_s + m["search_time_s"]
    m["images_per_s"] = n / m["predict_time_s"]


def evaluate_knn_index(
    index_dir: str | Path,
    data_dir: str | Path,
    k: int,
    split: str = "test",
    weighting: str = "majority",
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
) -> EvalResult:
    """kNN-classify a split's photos against a saved gallery index (its metric, its embedder).

    This is how frozen features of a bare backbone get a kNN score without a training run.
    Saved (by the caller) as INDEX_DIR/metrics_<split>_knn<k>[…].json.
    """
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.retrieval.index import GalleryIndex
    from carspotter.retrieval.query import embedder_for_index, query_transform
    from carspotter.utils import resolve_device

    index_dir = Path(index_dir)
    dev = resolve_device(device)
    index = GalleryIndex.load(index_dir)
    model = embedder_for_index(index, dev)
    gallery_names = index.info.get("class_names") or []
    queries = splits_dataset(data_dir, split, query_transform(index, model))
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
    m.update(
        split=split, gallery_split=index.info.get("split"), n_gallery=index.info.get("n"), data=str(data_dir)
    )
    name = knn_metrics_name(split, k, None, weighting, None, data_tag(data_dir, index.info.get("data_root")))
    return EvalResult(m, index_dir, {name: None})
