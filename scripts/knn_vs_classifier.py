"""kNN on a classification run's embeddings against the run's own classifier, from one embedding pass.

`carspotter evaluate RUN --knn` embeds gallery and queries again for every option; this script embeds each
split once (pooled features, plain and flip-averaged; logits are the linear head applied to the features), then
scores a grid of kNN settings with the same `retrieval.knn.evaluate_knn` the CLI uses, the classifier on the
same features, kNN accuracy against k, and kNN accuracy against the number of gallery photos per class
(random per-class subsets of the gallery, several seeds).

    python scripts/knn_vs_classifier.py RUN --data PREPARED [--cache emb.npz] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def embed_splits(run: Path, data: Path, cache: Path | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.is_file():
        return dict(np.load(cache))
    import torch

    from carspotter.data.dataset import splits_dataset
    from carspotter.models.loading import load_run
    from carspotter.retrieval.embed import embed_dataset

    model, info = load_run(run, "cpu")
    tf = model.preprocess.transform()
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        ds = splits_dataset(data, split, tf)
        out[f"{split}_labels"] = np.asarray(ds.labels)
        for tta in ("none", "flip"):
            t0 = time.perf_counter()
            f = embed_dataset(model, ds, source="features", amp=info.amp, tta=tta)
            with torch.inference_mode():
                logits = model.eval().forward_head(torch.from_numpy(f)).float().numpy()
            out[f"{split}_features_{tta}"] = f
            out[f"{split}_logits_{tta}"] = logits  # the head is linear: head(mean feature) = mean logits
            print(
                f"embedded {split} tta={tta}: {len(ds)} photos, {time.perf_counter() - t0:.0f} s", flush=True
            )
    if cache is not None:
        np.savez(cache, **out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, help="npz of the embeddings (written once, then read)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per gallery-size point")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from carspotter.engine.calibration import load_calibration
    from carspotter.retrieval.knn import evaluate_knn
    from carspotter.retrieval.search import l2_normalize
    from carspotter.rundir import read_run_config

    e = embed_splits(args.run, args.data, args.cache)
    r = read_run_config(args.run).retrieval
    c = e["train_logits_none"].shape[1]
    yq = e["test_labels"]
    res: dict[str, object] = {"run": str(args.run), "data": str(args.data)}

    cal = load_calibration(args.run)
    for tta in ("none", "flip"):
        pred = cal.mask(torch.from_numpy(e[f"test_logits_{tta}"])).argmax(1).numpy()
        acc = float((pred == yq).mean())
        res[f"classifier_tta-{tta}"] = acc
        print(f"classifier (tta {tta}): top-1 {100 * acc:.2f} %")

    def gallery(split: str, src: str, tta: str) -> tuple[np.ndarray, np.ndarray]:
        parts = split.split("+")
        g = np.concatenate([e[f"{p}_{src}_{tta}"] for p in parts])
        return g, np.concatenate([e[f"{p}_labels"] for p in parts])

    def knn(k: int, metric: str, weighting: str, gsplit: str, src: str, tta: str, l2: bool) -> float:
        g, yg = gallery(gsplit, src, tta)
        q = e[f"test_{src}_{tta}"]
        if l2:
            g, q = l2_normalize(g), l2_normalize(q)
        return float(evaluate_knn(g, yg, q, yq, k, metric, weighting, num_classes=c)["accuracy"])

    base = {
        "k": r.k,
        "metric": r.metric,
        "weighting": r.weighting,
        "gsplit": r.gallery_split,
        "src": "features",
        "tta": "none",
        "l2": False,
    }
    variants = [("run defaults", {})]
    variants += [(f"k={k}", {"k": k}) for k in (1, 3, 10)]
    variants += [
        ("cosine", {"metric": "cosine"}),
        ("--l2", {"l2": True}),
        ("--weighting distance", {"weighting": "distance"}),
        ("--gallery-split train+val", {"gsplit": "train+val"}),
        ("--embed-source logits", {"src": "logits"}),
        ("--tta flip", {"tta": "flip"}),
    ]
    variants += [
        ("cosine --tta flip", {"metric": "cosine", "tta": "flip"}),
        (
            "k=10 cosine distance train+val (no flip)",
            {"k": 10, "metric": "cosine", "weighting": "distance", "gsplit": "train+val"},
        ),
        (
            "k=10 cosine distance train flip",
            {"k": 10, "metric": "cosine", "weighting": "distance", "tta": "flip"},
        ),
    ]
    for k in (1, 3, 5, 10):
        variants.append(
            (
                f"k={k} cosine distance train+val flip",
                {"k": k, "metric": "cosine", "weighting": "distance", "gsplit": "train+val", "tta": "flip"},
            )
        )
    for k in (1, 5, 10):
        variants.append(
            (
                f"k={k} logits cosine distance train+val flip",
                {
                    "k": k,
                    "metric": "cosine",
                    "weighting": "distance",
                    "gsplit": "train+val",
                    "tta": "flip",
                    "src": "logits",
                },
            )
        )
    rows = []
    for name, over in variants:
        s = base | over
        acc = knn(**s)
        rows.append({"variant": name, **s, "accuracy": acc})
        print(f"{name:<45} {100 * acc:6.2f} %", flush=True)
    res["variants"] = rows

    # the best grid setting against the classifier, paired on the same photos, at matched TTA
    from carspotter.explain.zoom import mcnemar, paired_bootstrap
    from carspotter.retrieval.search import knn_classify

    paired = {}
    for tta in ("none", "flip"):
        clf = cal.mask(torch.from_numpy(e[f"test_logits_{tta}"])).argmax(1).numpy() == yq
        g, yg = gallery("train+val", "features", tta)
        kn = knn_classify(g, yg, e[f"test_features_{tta}"], 10, "cosine", "distance", c)[0] == yq
        m, (lo, hi) = mcnemar(clf, kn), paired_bootstrap(clf, kn)  # kNN − classifier, same photos
        paired[tta] = {
            "classifier": float(clf.mean()),
            "knn_k10_cosine_distance_trainval": float(kn.mean()),
            "classifier_only": m["only_first_right"],
            "knn_only": m["only_zoom_right"],
            "mcnemar_p": m["mcnemar_p"],
            "diff_ci95_pt": [100 * lo, 100 * hi],
        }
        print(f"paired, tta {tta}: {paired[tta]}", flush=True)
    res["paired"] = paired

    curve = {}
    for metric in ("euclidean", "cosine"):
        for k in (1, 2, 3, 5, 7, 10, 15, 20, 30):
            curve[f"{metric}_k{k}"] = knn(k, metric, "majority", "train", "features", "none", False)
        print(metric, " ".join(f"k{k.split('_k')[1]}={100 * v:.1f}" for k, v in curve.items() if metric in k))
    res["accuracy_vs_k"] = curve

    # gallery size: keep a random fraction of each class's train photos; kNN (cosine, majority) vs classifier
    g_all, yg_all = gallery("train", "features", "none")
    q = e["test_features_none"]
    by_class = [np.flatnonzero(yg_all == lab) for lab in np.unique(yg_all)]
    sizes = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        for k in (1, 5):
            accs = []
            for seed in range(args.seeds if frac < 1 else 1):
                rng = np.random.default_rng(seed)
                keep = np.concatenate(
                    [idx[rng.permutation(len(idx))[: max(1, round(frac * len(idx)))]] for idx in by_class]
                )
                m = evaluate_knn(g_all[keep], yg_all[keep], q, yq, k, "cosine", "majority", num_classes=c)
                accs.append(m["accuracy"])
            per_class = len(keep) / len(by_class)
            row = {"fraction": frac, "per_class": per_class, "k": k, "accuracy": float(np.mean(accs))}
            row["sd"] = float(np.std(accs))
            sizes.append(row)
            print(
                f"gallery {per_class:5.1f}/class k={k}: {100 * row['accuracy']:.2f} ± {100 * row['sd']:.2f} %"
            )
    res["accuracy_vs_gallery_size"] = sizes
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
