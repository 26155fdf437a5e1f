"""Classification over the union of a run's trained classes and a gallery's classes (enrolled ones too).

The classifier's softmax covers the classes it was trained on; the gallery's SimpleShot nearest-centroid
(retrieval.fewshot.GalleryClassifier) covers every class with photos in the index. The answer is the mixture
(1 - w)·classifier + w·gallery over the union of names (RESULTS.md "Open catalogue" measures w). A run
without a classifier (metric learning) answers from the gallery alone.
"""

from __future__ import annotations

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


def predict_with_index(
    run_dir: str | Path,
    index_dir: str | Path,
    paths: list[str | Path],
    k: int = 5,
    device: str = "cpu",
    gallery_weight: float = DEFAULT_GALLERY_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[dict[str, Any]]:
    """Top-k over trained + gallery (incl. enrolled) classes: [{"path", "top": [{label, class_name, prob}]}].

    `label` is the position in the union (the run's classes first, then the gallery's other classes).
    """
    from carspotter.data.images import open_rgb
    from carspotter.models.loading import load_run
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    model, info = load_run(run_dir, device)
    index = GalleryIndex.load(index_dir)
    src = index.info.get("run_dir")
    same = bool(src) and Path(src).resolve() == Path(run_dir).resolve()
    emb_model = model if same else embedder_for_index(index, device)
    has_clf = info.num_classes > 0
    oc = OpenClassifier(index, info.class_names if has_clf else None, gallery_weight, temperature)
    images = [open_rgb(Path(p)) for p in paths]
    clf = None
    if has_clf:
        tf = model.preprocess.transform()
        x = torch.stack([tf(im) for im in images]).to(device)
        with torch.inference_mode():
            clf = model(x).float().softmax(dim=1).cpu().numpy()
    probs = oc.probs(clf, embed_queries(index, emb_model, images, device))
    out = []
    for path, row in zip(paths, probs, strict=True):
        top = np.argsort(-row, kind="stable")[: min(k, len(row))]
        out.append(
            {
                "path": str(path),
                "top": [{"label": int(c), "class_name": oc.names[c], "prob": float(row[c])} for c in top],
            }
        )
    return out
