"""Open-set scores compared on real data: max calibrated probability, energy, and kNN distance to the gallery.

The kNN scores are the cosine similarity / negative euclidean distance from a photo's pooled backbone feature
to its nearest training photo (higher = more like a known class); msp and energy come from the run's
calibrated logits. Known photos are the evaluation set's photos of classes the run was trained on, unknown
ones the rest (as `evaluate` does). `--split` may join splits with "+": for a run trained on the retrieval
protocol's classes 1–98, `--data cars-small-retrieval --split val+test` = its held-out known photos (val)
+ the unseen classes 99–196 (test), with no combined manifest to prepare.

    python scripts/openset_knn.py RUN --gallery TRAIN_PREPARED --data EVAL_PREPARED [--split test] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--gallery", type=Path, required=True, help="the run's training data (its train split)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import faiss
    import torch

    from carspotter.data.dataset import splits_dataset
    from carspotter.engine.calibration import load_calibration
    from carspotter.engine.predict_logits import class_mapping
    from carspotter.engine.trust import open_set_metrics
    from carspotter.models.loading import load_run
    from carspotter.retrieval.embed import embed_dataset

    model, info = load_run(args.run)
    cal = load_calibration(args.run)
    tf = model.preprocess.transform()
    gal = splits_dataset(args.gallery, "train", tf)
    ev = splits_dataset(args.data, args.split, tf)
    g = embed_dataset(model, gal, source="features")
    q = embed_dataset(model, ev, source="features")
    with torch.inference_mode():
        logits = model.forward_head(torch.from_numpy(q)).float()
    labels = class_mapping(ev.class_names, info.class_names)[np.asarray(ev.labels)]
    if cal.known_labels is not None:
        labels = np.where(np.isin(labels, cal.known_labels), labels, -1)
    known = labels >= 0
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(gn.shape[1])
    index.add(np.ascontiguousarray(gn, dtype=np.float32))
    sim, _ = index.search(np.ascontiguousarray(qn, dtype=np.float32), 1)
    l2 = faiss.IndexFlatL2(g.shape[1])
    l2.add(np.ascontiguousarray(g, dtype=np.float32))
    d2, _ = l2.search(np.ascontiguousarray(q, dtype=np.float32), 1)
    scores = {
        "msp": cal.scores(logits, "msp").numpy(),
        "energy": cal.scores(logits, "energy").numpy(),
        "knn_cosine": sim[:, 0],  # similarity to the nearest training photo: higher = known
        "knn_euclidean": -np.sqrt(np.maximum(d2[:, 0], 0)),  # minus the L2 distance to it
    }
    out: dict[str, object] = {
        "run": str(args.run),
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
    }
    for k, s in scores.items():
        m = open_set_metrics(s[known], s[~known])
        out[k] = m
        print(f"{k:<11} AUROC {m['auroc']:.4f}  FPR@95%TPR {m['fpr_at_95tpr']:.4f}")
    print(f"known {out['n_known']}, unknown {out['n_unknown']}, gallery {len(gal)} train photos")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
