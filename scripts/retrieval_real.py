"""Frozen-feature retrieval figures on real photos, for each candidate preprocessing (validation, not a test).

Reproduces the reference figures of ../shared/README.md for the frozen EfficientNet-Lite0 at 128 px, cosine:
  - kNN k=1 from the shared `train` split (our prepared train + val) to its `test` split: 12.2 % top-1
  - Recall@1 over classes 99-196, all their photos (the retrieval-protocol prepared test split): 22.4 %
and says which 128x128 preprocessing matches: the library's eval transform (resize the shorter side to
round(128 / 0.875) = 146, centre crop; what `carspotter index` uses), the same with bicubic, a plain squash of
the 128x96 photo to 128x128, or resize-shorter-to-128 + centre crop.

    .venv/bin/python scripts/retrieval_real.py --small /work/prepared/cars-small \
        --retrieval /work/prepared/cars-small-retrieval \
        --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2 as T

from carspotter.data.dataset import PreparedDataset
from carspotter.retrieval.build import backbone_model
from carspotter.retrieval.embed import embed_dataset, eval_transform
from carspotter.retrieval.knn import evaluate_knn
from carspotter.retrieval.metrics import retrieval_metrics

MODES = ("eval-transform", "crop-bicubic", "squash-bicubic", "squash-bilinear", "short128-crop")


def transform(mode: str, model, size: int):
    p = model.preprocess
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(list(p.mean), list(p.std))]
    bic = T.InterpolationMode.BICUBIC
    if mode == "eval-transform":
        return eval_transform(model)
    head = {
        "crop-bicubic": [
            T.Resize(round(size / 0.875), interpolation=bic, antialias=True),
            T.CenterCrop(size),
        ],
        "squash-bicubic": [T.Resize((size, size), interpolation=bic, antialias=True)],
        "squash-bilinear": [T.Resize((size, size), antialias=True)],
        "short128-crop": [T.Resize(size, interpolation=bic, antialias=True), T.CenterCrop(size)],
    }[mode]
    return T.Compose([T.PILToTensor(), *head, *tail])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--small", type=Path, required=True, help="cars-small prepared with --protocol classification"
    )
    ap.add_argument("--retrieval", type=Path, required=True, help="the same photos, --protocol retrieval")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    model = backbone_model(args.backbone, args.weights, args.img_size)
    small_all = PreparedDataset(args.small, "all", None)
    ret_test = PreparedDataset(args.retrieval, "test", None)
    name = [Path(r.path).name for r in small_all.records]  # official file names join the two prepared dirs
    row_of = {n: i for i, n in enumerate(name)}
    ret_rows = np.array([row_of[Path(r.path).name] for r in ret_test.records])
    split = np.array([r.split for r in small_all.records])
    y = np.asarray(small_all.labels)
    gal, qry = np.isin(split, ["train", "val"]), split == "test"
    results = {}
    for mode in args.modes:
        ds = PreparedDataset(args.small, "all", transform(mode, model, args.img_size))
        t0 = time.perf_counter()
        emb = embed_dataset(model, ds, 64, "cpu", args.num_workers, "features")  # (8144, 1280)
        embed_s = time.perf_counter() - t0
        knn = evaluate_knn(emb[gal], y[gal], emb[qry], y[qry], 1, "cosine", num_classes=196)
        knn_train_only = evaluate_knn(
            emb[split == "train"], y[split == "train"], emb[qry], y[qry], 1, "cosine"
        )
        ret = retrieval_metrics(emb[ret_rows], np.asarray(ret_test.labels), "cosine")
        results[mode] = {
            "knn1_cosine_accuracy": knn["accuracy"],
            "knn1_cosine_accuracy_gallery_train_only": knn_train_only["accuracy"],
            **{k: ret[k] for k in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")},
            "embed_s": embed_s,
            "n_gallery": int(gal.sum()),
            "n_queries": int(qry.sum()),
            "n_retrieval": len(ret_rows),
        }
        r = results[mode]
        print(
            f"{mode:16s} kNN1 {100 * r['knn1_cosine_accuracy']:5.1f} % (ref 12.2; train-only gallery "
            f"{100 * r['knn1_cosine_accuracy_gallery_train_only']:.1f})  R@1 99-196 "
            f"{100 * r['recall_at_1']:5.1f} % (ref 22.4)  R@2/4/8 {100 * r['recall_at_2']:.1f}/"
            f"{100 * r['recall_at_4']:.1f}/{100 * r['recall_at_8']:.1f}  MAP@R {100 * r['map_at_r']:.2f}  "
            f"[{len(emb)} photos embedded in {embed_s:.0f} s]",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
