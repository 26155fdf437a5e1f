"""Classification over the union of a run's trained classes and a gallery's classes (enrolled ones too).

The classifier's softmax covers the classes it was trained on; the gallery's SimpleShot nearest-centroid
(retrieval.fewshot.GalleryClassifier) covers every class with photos in the index. The answer is the mixture
(1 - w)·classifier + w·gallery over the union of names (RESULTS.md "Open catalogue" measures w). A run
without a classifier (metric learning) answers from the gallery alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carspotter.retrieval.catalogue import label_names
from carspotter.retrieval.fewshot import GalleryClassifier, combine
from carspotter.retrieval.index import GalleryIndex

DEFAULT_GALLERY_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 0.1


def stored_vectors(index: GalleryIndex) -> np.ndarray:
    import faiss

    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.vectors()


class OpenClassifier:
    """Union-of-classes probabilities from (classifier probabilities or None, query embeddings)."""

    def __init__(
        self,
        index: GalleryIndex,
        clf_names: list[str] | None,
        gallery_weight: float = DEFAULT_GALLERY_WEIGHT,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.clf_names = list(clf_names or [])
        self.gallery_weight = gallery_weight
        self.gallery = GalleryClassifier.from_vectors(
            stored_vectors(index), index.labels(), label_names(index), temperature
        )
        self.names = self.clf_names + [n for n in self.gallery.names if n not in set(self.clf_names)]

    @property
    def extends_classifier(self) -> bool:
        """True when the gallery knows classes the classifier does not (or there is no classifier)."""
        return len(self.names) > len(self.clf_names)

    def probs(self, clf_probs: np.ndarray | None, query_emb: np.ndarray) -> np.ndarray:
        """(Q, len(self.names)) probabilities."""
        names, p = combine(
            clf_probs if self.clf_names else None,
            self.clf_names,
            self.gallery.probs(query_emb),
            self.gallery.names,
            self.gallery_weight,
        )
        if names != self.names:  # the gallery-only case orders by the gallery's own labels
            col = {n: i for i, n in enumerate(names)}
            p = p[:, [col[n] for n in self.names]]
        return p


def gallery_for_run(
    run_dir: str | Path,
    index_dir: str | Path,
    model: torch.nn.Module,
    info: Any,  # rundir.ModelInfo of run_dir
    device: str = "cpu",
    gallery_weight: float | None = None,
    temperature: float | None = None,
) -> tuple[OpenClassifier, Callable[[list[Any]], np.ndarray]]:
    """(OpenClassifier over the run's ∪ the gallery's classes, photos → query vectors like the gallery's).

    A gallery built from this very run embeds with the loaded `model`; any other with its own embedder."""
    from carspotter.retrieval.query import built_from_run, embed_queries, embedder_for_index

    index = GalleryIndex.load(index_dir)
    emb_model = model if built_from_run(index, run_dir) else embedder_for_index(index, device)
    oc = OpenClassifier(
        index,
        info.class_names if info.num_classes > 0 else None,
        DEFAULT_GALLERY_WEIGHT if gallery_weight is None else gallery_weight,
        DEFAULT_TEMPERATURE if temperature is None else temperature,
    )
    return oc, lambda images: embed_queries(index, emb_model, images, device)
