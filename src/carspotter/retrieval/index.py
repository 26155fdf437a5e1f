"""A gallery index: FAISS (any `index_factory` string) + the metadata that says what each vector is.

INDEX_DIR/
  index.faiss   the FAISS index (exact Flat by default; HNSW / IVF / PQ for large galleries)
  meta.csv      path,label,class_name,split of every gallery photo (row i = vector i)
  index.json    metric, index type, search settings, dim, n, and the model + preprocessing behind the vectors
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.rundir import (
    INDEX_FAISS,
    INDEX_FILES,
    INDEX_JSON,
    META_CSV,
    RunError,
    read_index_json,
    write_index_json,
)
from carspotter.utils import atomic_path, atomic_write_text, prepare_out_dir

METRICS = ("euclidean", "cosine")
META_COLS = ("path", "label", "class_name", "split")


class GalleryIndexError(ValueError):
    """An index directory is missing pieces or does not match its query vectors."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class GalleryIndex:
    """Search returns (distances, ids); cosine uses inner product on unit vectors and reports 1 - cos."""

    def __init__(self, index: Any, meta: list[dict[str, Any]], info: dict[str, Any]) -> None:
        self.index = index
        self.meta = meta
        self.info = info
        self.path: Path | None = None  # the index dir it was loaded from / saved to
        self._apply_search_params()

    @property
    def metric(self) -> str:
        return str(self.info["metric"])

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        meta: list[dict[str, Any]],
        metric: str = "euclidean",
        index_type: str = "Flat",
        info: dict[str, Any] | None = None,
        nprobe: int = 16,
        ef_search: int = 64,
        train_size: int | None = None,
        seed: int = 0,
    ) -> GalleryIndex:
        import faiss

        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        x = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
        if x.ndim != 2 or len(x) != len(meta):
            raise ValueError(f"embeddings {x.shape} and metadata ({len(meta)} rows) disagree")
        if metric == "cosine":
            x = _normalise(x)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(x.shape[1], index_type, faiss_metric)
        except RuntimeError as e:
            raise ValueError(f"--index-type {index_type!r}: not a FAISS index_factory string ({e})") from None
        _no_polysemous_training(index)
        if not index.is_trained:
            # IVF/PQ need a training sample: FAISS wants ~39 vectors per centroid; cap for speed.
            n_train = min(len(x), train_size or max(50_000, 39 * _nlist(index)))
            sample = x[np.random.default_rng(seed).choice(len(x), n_train, replace=False)]
            if len(sample) < _nlist(index):
                raise ValueError(
                    f"{index_type}: {len(x)} vectors cannot train {_nlist(index)} IVF lists; "
                    "use Flat or fewer lists"
                )
            index.train(sample)
        index.add(x)
        full_info = {
            **(info or {}),
            "metric": metric,
            "index_type": index_type,
            "nprobe": nprobe,
            "ef_search": ef_search,
            "dim": int(x.shape[1]),
            "n": len(x),
        }
        return cls(index, [dict(m) for m in meta], full_info)

    def _apply_search_params(self) -> None:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = int(self.info.get("nprobe", 16))
        hnsw = _find_hnsw(self.index)
        if hnsw is not None:
            hnsw.hnsw.efSearch = int(self.info.get("ef_search", 64))

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None:
            self.info["nprobe"] = nprobe
        if ef_search is not None:
            self.info["ef_search"] = ef_search
        self._apply_search_params()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) → distances (Q, k) float32 ascending, ids (Q, k) int64 (-1 where fewer than k exist)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.info["dim"]:
            raise GalleryIndexError(
                f"query vectors {q.shape} do not match the index's {self.info['dim']}-d vectors"
            )
        if self.metric == "cosine":
            q = _normalise(q)
        d, ids = self.index.search(q, int(k))
        # cosine: similarity → distance (still ascending); L2: FAISS returns squared distances
        d = 1.0 - d if self.metric == "cosine" else np.sqrt(np.maximum(d, 0.0))
        return d.astype(np.float32), ids.astype(np.int64)

    def labels(self) -> np.ndarray:
        return np.asarray([int(m["label"]) for m in self.meta], dtype=np.int64)

    def vectors(self) -> np.ndarray:
        """All stored vectors (exact for Flat/HNSW; PQ returns its approximation), always as numpy: once
        pytorch-metric-learning has imported faiss.contrib.torch_utils, faiss hands back torch tensors here."""
        out = self.index.reconstruct_n(0, self.index.ntotal)
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out, dtype=np.float32)

    def save(self, index_dir: str | Path, overwrite: bool = False) -> Path:
        index_dir = prepare_out_dir(Path(index_dir), overwrite=overwrite, marker=INDEX_JSON)
        self.write_files(index_dir)
        self.path = index_dir
        return index_dir

    def write_files(self, index_dir: Path) -> None:
        """Write index.faiss, meta.csv and index.json into an existing folder (each file atomically)."""
        import faiss

        with atomic_path(index_dir / INDEX_FAISS) as tmp:
            faiss.write_index(self.index, str(tmp))
        buf = io.StringIO()
        cols = list(META_COLS) + sorted({k for m in self.meta for k in m} - set(META_COLS))
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(self.meta)
        atomic_write_text(index_dir / META_CSV, buf.getvalue())
        write_index_json(index_dir, self.info)

    @classmethod
    def load(cls, index_dir: str | Path) -> GalleryIndex:
        import faiss

        index_dir = Path(index_dir)
        for name in INDEX_FILES:
            if not (index_dir / name).is_file():
                raise GalleryIndexError(
                    f"{index_dir}: not an index directory (no {name}); build one with `carspotter index`"
                )
        try:
            info = read_index_json(index_dir)
        except RunError as e:
            raise GalleryIndexError(str(e)) from None
        with (index_dir / META_CSV).open(newline="", encoding="utf-8") as f:
            meta = list(csv.DictReader(f))
        index = faiss.read_index(str(index_dir / INDEX_FAISS))
        if index.ntotal != len(meta):
            raise GalleryIndexError(
                f"{index_dir}: index.faiss has {index.ntotal} vectors but meta.csv {len(meta)} rows"
            )
        out = cls(index, meta, info)
        out.path = index_dir
        return out


def _nlist(index: Any) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def _find_hnsw(index: Any) -> Any:
    import faiss

    for cast in (faiss.downcast_index,):
        idx = cast(index)
        if hasattr(idx, "hnsw"):
            return idx
        base = getattr(idx, "base_index", None)
        if base is not None and hasattr(faiss.downcast_index(base), "hnsw"):
            return faiss.downcast_index(base)
    return None


def _no_polysemous_training(index: Any) -> None:
    """`index_factory("…,PQm")` turns on polysemous training, which only Hamming-filtered search uses; it made
    training IVF256,PQ16 on 20 k vectors 30x slower here (22 s vs 0.7 s). carspotter never searches that way."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    for idx in (index, ivf):
        if idx is None:
            continue
        idx = faiss.downcast_index(idx)
        if hasattr(idx, "do_polysemous_training"):
            idx.do_polysemous_training = False
