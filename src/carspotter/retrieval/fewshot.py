"""Few-shot classification on embeddings: SimpleShot nearest-centroid, 1-NN, and the episode protocol.

SimpleShot (Wang et al. 2019) "CL2N": L2-normalise every vector, subtract a mean vector, L2-normalise again;
a class is the mean of its (transformed) support vectors and a query goes to the nearest centroid (Euclidean).
1-NN uses the same transformed vectors, so the two differ only in centroid vs. nearest single photo.
The same arithmetic classifies queries against a gallery with enrolled classes (`GalleryClassifier`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("nearest_centroid", "1nn")


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cl2n(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """L2-normalise, centre on `mean` (a mean of L2-normalised vectors), L2-normalise again."""
    return l2n(l2n(x) - np.asarray(mean, dtype=np.float32)[None, :])


def centre_of(x: np.ndarray) -> np.ndarray:
    """The centring vector for `cl2n`: the mean of the L2-normalised vectors (the gallery or support set)."""
    return l2n(x).mean(axis=0)


def class_centroids(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes (C,), centroids (C, D)): the mean vector of each label present, labels sorted."""
    labels = np.asarray(labels, dtype=np.int64)
    classes, inv = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(classes), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, x)
    counts = np.bincount(inv, minlength=len(classes))[:, None]
    return classes, (sums / counts).astype(np.float32)


def sq_dists(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(Q, C) squared Euclidean distances, computed as |q|² + |c|² - 2 q·c (clipped at 0)."""
    q64, c64 = np.asarray(q, np.float64), np.asarray(c, np.float64)
    d = (q64**2).sum(1)[:, None] + (c64**2).sum(1)[None, :] - 2.0 * q64 @ c64.T
    return np.maximum(d, 0.0)


def nearest_centroid(
    support: np.ndarray, support_labels: np.ndarray, queries: np.ndarray, mean: np.ndarray | None = None
) -> np.ndarray:
    """Predicted labels (Q,) by SimpleShot nearest-centroid; `mean` defaults to the support set's."""
    mean = centre_of(support) if mean is None else mean
    classes, cent = class_centroids(cl2n(support, mean), support_labels)
    return classes[sq_dists(cl2n(queries, mean), cent).argmin(1)]


def one_nn(
    support: np.ndarray, support_labels: np.ndarray, queries: np.ndarray, mean: np.ndarray | None = None
) -> np.ndarray:
    """Predicted labels (Q,): the label of the single nearest support vector (same CL2N space), exact FAISS."""
    from carspotter.retrieval.search import faiss_search

    mean = centre_of(support) if mean is None else mean
    _, ids = faiss_search(cl2n(support, mean), cl2n(queries, mean), 1, "euclidean")
    return np.asarray(support_labels, dtype=np.int64)[ids[:, 0]]


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (1.96 · sd / √n; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def sample_episode(labels: np.ndarray, shots: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(support ids, query ids): `shots` random photos of every class with more than `shots`, the rest query."""
    labels = np.asarray(labels)
    support, query = [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        if len(ids) <= shots:
            continue  # no query photo would be left for this class
        pick = rng.permutation(ids)
        support.append(pick[:shots])
        query.append(pick[shots:])
    if not support:
        raise ValueError(f"no class has more than {shots} photos; use fewer shots")
    return np.sort(np.concatenate(support)), np.sort(np.concatenate(query))


def run_episodes(
    emb: np.ndarray, labels: np.ndarray, shots: Sequence[int], episodes: int, seed: int = 0
) -> dict[str, Any]:
    """The few-shot protocol on cached embeddings: per shot count, `episodes` random support sets.

    Each episode enrols `shots` photos per class into an empty gallery (the centring mean is the support
    set's own: nothing about the queries is used) and classifies every other photo of those classes.
    """
    emb, labels = np.asarray(emb, np.float32), np.asarray(labels, np.int64)
    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for s in shots:
        if s < 1:
            raise ValueError(f"--shots must be positive integers, got {s}")
        accs: dict[str, list[float]] = {m: [] for m in METHODS}
        n_classes = n_queries = 0
        for _ in range(episodes):
            sup, qry = sample_episode(labels, int(s), rng)
            mean = centre_of(emb[sup])
            for m, fn in (("nearest_centroid", nearest_centroid), ("1nn", one_nn)):
                pred = fn(emb[sup], labels[sup], emb[qry], mean)
                accs[m].append(float((pred == labels[qry]).mean()))
            n_classes, n_queries = len(np.unique(labels[sup])), len(qry)
        row: dict[str, Any] = {
            "shots": int(s),
            "episodes": episodes,
            "classes": n_classes,
            "queries": n_queries,
        }
        for m in METHODS:
            mu, ci = mean_ci95(accs[m])
            row[m] = {"accuracy": mu, "ci95": ci, "per_episode": accs[m]}
        out[str(s)] = row
    return out


@dataclass
class GalleryClassifier:
    """Nearest-centroid over every class in a gallery (trained, indexed and enrolled photos alike).

    Probabilities: softmax(-d² / temperature) over the classes' squared CL2N distances (d² ∈ [0, 4]).
    """

    labels: np.ndarray  # (C,) the label of each centroid
    names: list[str]  # (C,) class names, aligned with labels
    centroids: np.ndarray  # (C, D) in CL2N space
    mean: np.ndarray  # (D,) centring vector
    temperature: float = 0.1

    @classmethod
    def from_vectors(
        cls, vectors: np.ndarray, labels: np.ndarray, label_names: dict[int, str], temperature: float = 0.1
    ) -> GalleryClassifier:
        if len(vectors) == 0:
            raise ValueError("the gallery is empty: nothing to classify against")
        mean = centre_of(vectors)
        classes, cent = class_centroids(cl2n(vectors, mean), labels)
        names = [label_names.get(int(c), f"class {int(c)}") for c in classes]
        return cls(classes, names, cent, mean, temperature)

    def probs(self, queries: np.ndarray) -> np.ndarray:
        """(Q, C) class probabilities, columns in `self.labels` order."""
        logits = -sq_dists(cl2n(queries, self.mean), self.centroids) / self.temperature
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)


def combine(
    clf_probs: np.ndarray | None,
    clf_names: Sequence[str],
    gallery_probs: np.ndarray,
    gallery_names: Sequence[str],
    gallery_weight: float = 0.5,
) -> tuple[list[str], np.ndarray]:
    """(union names, (Q, U) probabilities): (1 - w)·classifier + w·gallery, classes matched by name.

    The classifier puts no mass on classes it never saw (enrolled ones); the gallery covers every class with
    photos. With no classifier (a metric-learning run) the answer is the gallery's alone.
    """
    if not 0.0 <= gallery_weight <= 1.0:
        raise ValueError(f"gallery weight must be in [0, 1], got {gallery_weight}")
    if clf_probs is None or len(clf_names) == 0:
        return list(gallery_names), np.asarray(gallery_probs, np.float32)
    names = list(clf_names) + [n for n in gallery_names if n not in set(clf_names)]
    col = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(gallery_probs), len(names)), dtype=np.float64)
    out[:, : len(clf_names)] += (1.0 - gallery_weight) * np.asarray(clf_probs, np.float64)
    gcols = np.asarray([col[n] for n in gallery_names], dtype=np.int64)
    out[:, gcols] += gallery_weight * np.asarray(gallery_probs, np.float64)  # gallery names are unique
    return names, out.astype(np.float32)


def embed_split(
    target: str | None,
    data_dir: str,
    split: str = "test",
    *,
    backbone: str | None = None,
    weights: str | None = None,
    img_size: int = 224,
    crop_mode: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embed a prepared split ONCE with a run, an index's network, or a bare backbone → (emb, labels, about).

    The episodes then run on these cached vectors (no photo is embedded twice).
    """
    import dataclasses
    import time
    from pathlib import Path

    from carspotter.data.dataset import splits_dataset
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.utils import resolve_device

    dev = resolve_device(device)
    source = "auto"
    about: dict[str, Any] = {"data": str(Path(data_dir).resolve()), "split": split}
    if (target is None) == (backbone is None):
        raise ValueError("give either RUN_OR_INDEX or --backbone NAME (with --weights PATH when offline)")
    if backbone is not None:
        from carspotter.models.loading import backbone_model

        model = backbone_model(backbone, weights, img_size)
        pre = model.preprocess
        about.update(backbone=backbone, weights=weights, img_size=img_size)
    elif (Path(target) / "index.json").is_file():  # type: ignore[arg-type]
        from carspotter.retrieval.index import GalleryIndex
        from carspotter.retrieval.query import embedder_for_index, index_preprocess

        index = GalleryIndex.load(target)  # type: ignore[arg-type]
        model = embedder_for_index(index, dev)
        pre = index_preprocess(index, model)
        source = index.info.get("embed_source") or "auto"
        about.update(index=str(Path(target).resolve()))  # type: ignore[arg-type]
    elif (Path(target) / "model.json").is_file():  # type: ignore[arg-type]
        from carspotter.models.loading import load_run

        model, _ = load_run(target, dev)  # type: ignore[arg-type]
        pre = model.preprocess
        about.update(run=str(Path(target).resolve()))  # type: ignore[arg-type]
    else:
        raise FileNotFoundError(f"{target}: neither a run directory (model.json) nor an index (index.json)")
    if crop_mode is not None:
        pre = dataclasses.replace(pre, crop_mode=crop_mode)
    about["preprocess"] = pre.to_dict()
    tf = pre.transform()
    ds = splits_dataset(data_dir, split, tf)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no photos")
    t0 = time.perf_counter()
    emb = embed_dataset(model, ds, batch_size, dev, 0, source)
    about.update(n_images=len(ds), n_classes=len(set(ds.labels)), embed_s=time.perf_counter() - t0)
    return emb, np.asarray(ds.labels, dtype=np.int64), about
