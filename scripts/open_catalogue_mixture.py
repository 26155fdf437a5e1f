"""How to combine a classifier with gallery evidence (RESULTS.md "Open catalogue"): sweep the gallery weight w of
(1 - w)·classifier + w·nearest-centroid over the union of classes, on real photos.

A classification run trained on classes 1-98 (its head has an output for every class name of the dataset, but
classes 99-196 never had a positive example); a gallery of its training split's photos (classes 1-98); 10 classes
of 99-196 enrolled with 5 photos each. Queries: the val photos of classes 1-98 (seen by neither the classifier's
training nor the gallery) and every other photo of the 10 enrolled classes. Every photo is embedded once; each w
reuses the cached classifier probabilities and embeddings.

    python scripts/open_catalogue_mixture.py RUN --data /work/prepared/cars-small-retrieval --out mixture.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--gallery-split", default="train")
    ap.add_argument("--query-split", default="val")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="one choice of enrolled classes and photos per seed")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,0.9,1")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import faiss

    from carspotter.data.images import open_rgb
    from carspotter.data.manifest import read_manifest
    from carspotter.models.loading import load_run
    from carspotter.retrieval.build import build_index_from_run
    from carspotter.retrieval.catalogue import (
        EnrolResult,
        Plan,
        apply_enrolment,
        embed_photos,
        photos_from_paths,
    )
    from carspotter.retrieval.index import GalleryIndex
    from carspotter.retrieval.open_classify import OpenClassifier
    from carspotter.retrieval.query import embed_queries

    data = Path(args.data)
    t0 = time.perf_counter()
    model, info = load_run(args.run)
    index = build_index_from_run(model, data, args.gallery_split, "cosine", "Flat")  # in memory
    recs = read_manifest(data)
    test = [r for r in recs if r.split == "test"]
    tf = model.preprocess.transform()

    def run_queries(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Classifier probabilities and gallery embeddings of photos, in chunks of 64."""
        clf, emb = [], []
        for i in range(0, len(paths), 64):
            imgs = [open_rgb(p) for p in paths[i : i + 64]]
            with torch.inference_mode():
                clf.append(model(torch.stack([tf(im) for im in imgs])).float().softmax(1).numpy())
            emb.append(embed_queries(index, model, imgs))
        return np.concatenate(clf), np.concatenate(emb)

    trained_q = [
        r for r in recs if r.split == args.query_split
    ]  # seen by neither the classifier nor the gallery
    clf_t, emb_t = run_queries([data / r.path for r in trained_q])
    base_meta, base_n = list(index.meta), index.index.ntotal
    rows = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        chosen = sorted(
            rng.choice(sorted({r.class_name for r in test}), args.classes, replace=False).tolist()
        )
        to_enrol, new_q = [], []
        for name in chosen:
            photos = [r for r in test if r.class_name == name]
            pick = set(rng.choice(len(photos), args.shots, replace=False).tolist())
            for i, r in enumerate(photos):
                if i in pick:
                    to_enrol += photos_from_paths(name, [data / r.path])
                else:
                    new_q.append(r)
        g = GalleryIndex(faiss.clone_index(index.index), list(base_meta), dict(index.info))
        assert g.index.ntotal == base_n
        labels = [g.info["class_names"].index(p.class_name) for p in to_enrol]  # the dataset's labels
        plan = Plan(
            to_enrol, labels, EnrolResult(added={n: args.shots for n in chosen}), list(range(len(to_enrol)))
        )
        apply_enrolment(Path(args.out).parent / ".no-such-index", g, plan, embed_photos(g, model, to_enrol))
        clf_n, emb_n = run_queries([data / r.path for r in new_q])
        truth = np.asarray([r.class_name for r in trained_q] + [r.class_name for r in new_q])
        group = np.asarray(["trained"] * len(trained_q) + ["enrolled"] * len(new_q))
        clf_p, q = np.concatenate([clf_t, clf_n]), np.concatenate([emb_t, emb_n])
        for w in [float(x) for x in args.weights.split(",")]:
            oc = OpenClassifier(g, info.class_names, gallery_weight=w)
            ok = np.asarray(oc.names)[oc.probs(clf_p, q).argmax(1)] == truth
            rows.append({"seed": seed, "gallery_weight": w, "top1_trained": float(ok[group == "trained"].mean()),
                         "top1_enrolled": float(ok[group == "enrolled"].mean()), "top1_all": float(ok.mean()),
                         "n_trained": int((group == "trained").sum()), "n_enrolled": int((group == "enrolled").sum())})  # fmt: skip
            print(rows[-1], flush=True)
    out = {"run": str(Path(args.run).resolve()), "data": str(data.resolve()), "gallery_split": args.gallery_split,
           "query_split": args.query_split, "shots": args.shots, "n_gallery_trained": base_n, "rows": rows,
           "seconds": time.perf_counter() - t0}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
