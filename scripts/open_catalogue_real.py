"""Open catalogue on real photos (RESULTS.md "Open catalogue", part b): a gallery from a run trained on classes
1-98, then `enrol` 5 photos each of 10 classes from 99-196 it has never seen, then classify every other photo of
those 10 classes over the union (98 + 10 classes) — the answer `predict --index` / `serve` give.

    python scripts/open_catalogue_real.py RUN --data /work/prepared/cars-small-retrieval --gallery-split val \
        --work /tmp/open-catalogue --out open_catalogue.json

Uses the library's own paths: build_index_from_run, catalogue.enrol (photo files, copied + resized),
engine.batch_predict.predict_with_index. Also reports 1-NN over the same gallery for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--gallery-split", default="val", help="the trained classes' photos in the gallery")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", required=True, help="a scratch folder (index + photo copies), created anew")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from carspotter.data.manifest import read_manifest
    from carspotter.engine.batch_predict import predict_with_index
    from carspotter.retrieval.build import build_index_from_run
    from carspotter.retrieval.catalogue import enrol, photos_from_paths
    from carspotter.retrieval.index import GalleryIndex

    work, data = Path(args.work), Path(args.data)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    index_dir = work / "index"
    build_index_from_run(args.run, data, args.gallery_split, "cosine", "Flat", index_dir, device="cpu")
    t_index = time.perf_counter() - t0
    recs = [r for r in read_manifest(data) if r.split == "test"]
    rng = np.random.default_rng(args.seed)
    names = sorted({r.class_name for r in recs})
    chosen = sorted(rng.choice(names, args.classes, replace=False).tolist())
    to_enrol, rest = [], []  # Photo objects, not class folders: names like "Ram C/V Cargo Van" hold a "/"
    for name in chosen:
        photos = [r for r in recs if r.class_name == name]
        pick = set(rng.choice(len(photos), args.shots, replace=False).tolist())
        for i, r in enumerate(photos):
            if i in pick:
                to_enrol += photos_from_paths(name, [data / r.path])
            else:
                rest.append((data / r.path, name))
    t0 = time.perf_counter()
    res, _ = enrol(index_dir, to_enrol)
    t_enrol = time.perf_counter() - t0
    # every other photo of the 10 classes, embedded once: nearest-centroid over the union (the answer of
    # `predict --index` / `serve` for a run without a classifier) and 1-NN over the same gallery
    from carspotter.data.images import open_rgb
    from carspotter.retrieval.open_classify import OpenClassifier
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    t0 = time.perf_counter()
    idx = GalleryIndex.load(index_dir)
    model = embedder_for_index(idx)
    q = np.concatenate([embed_queries(idx, model, [open_rgb(p) for p, _ in rest[i : i + 64]])
                        for i in range(0, len(rest), 64)])  # fmt: skip
    t_embed = time.perf_counter() - t0
    truth = np.asarray([n for _, n in rest])
    oc = OpenClassifier(idx, None)
    order = np.argsort(-oc.probs(None, q), axis=1, kind="stable")[:, :5]
    names_arr = np.asarray(oc.names)
    top1 = float(np.mean(names_arr[order[:, 0]] == truth))
    top5 = float(np.mean([t in names_arr[o] for o, t in zip(order, truth, strict=True)]))
    among = float(np.mean(np.isin(names_arr[order[:, 0]], chosen)))
    _, ids = idx.search(q, 1)
    nn1 = float(np.mean([idx.meta[int(i)]["class_name"] == t for i, t in zip(ids[:, 0], truth, strict=True)]))
    # the product path (`predict --index`) on a sample agrees with the computation above
    check = predict_with_index(args.run, index_dir, [p for p, _ in rest[:16]], k=1)
    agree = float(
        np.mean([c["top"][0]["class_name"] == names_arr[o[0]] for c, o in zip(check, order, strict=False)])
    )
    result = {
        "run": str(Path(args.run).resolve()), "data": str(data.resolve()), "gallery_split": args.gallery_split,
        "gallery_trained_photos": len(idx.meta) - res.photos_added, "gallery_classes": len({m["class_name"] for m in idx.meta}),
        "enrolled_classes": chosen, "shots": args.shots, "photos_enrolled": res.photos_added,
        "queries": len(rest), "top1_nearest_centroid": top1, "top5_nearest_centroid": top5,
        "top1_in_enrolled_set": among, "top1_1nn": nn1, "predict_with_index_agrees": agree,
        "index_s": t_index, "enrol_s": t_enrol, "embed_queries_s": t_embed, "seed": args.seed,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
