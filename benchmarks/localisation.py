"""How well the CAM box finds the car, where the truth is known (the synthetic set records each car's box).

For a trained run and a prepared dataset with boxes (`carspotter data synth`): the class-activation maps are
computed once per photo; box settings (threshold × margin) are chosen on the tuning split (best CorLoc, then
mean IoU), and the test split reports mean IoU and CorLoc (share of photos with IoU ≥ 0.5) of
  - the CAM box with the chosen settings, and with the library's defaults (explain/box.py BoxSettings),
  - the centre box (the centred 50 % of each side, and the centred share tuned on the tuning split),
  - the whole photo.

    python benchmarks/localisation.py --run RUN --data SYNTH_DIR [--tune-split val --split test]
    python benchmarks/localisation.py --smoke        # seconds: a tiny trained model on a tiny synthetic set
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

from carspotter.explain.box import (
    WHOLE,
    BoxSettings,
    activation_maps,
    box_from_map,
    centre_box,
    corloc,
    iou,
    normalise_maps,
    to_photo,
    view_window,
)
from carspotter.explain.zoom import load_for_split

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
CENTRE_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)


def maps_and_truth(run: Path, data: Path, split: str, batch: int = 32) -> dict[str, Any]:
    """Normalised CAMs (N, S, S), view windows, true boxes (normalised), labels and top-1 of every boxed photo."""
    model, _, ds, _ = load_for_split(
        run, data, split, crop_bbox=False
    )  # whole photos: the boxes refer to them
    tf = model.preprocess.transform()
    s = model.preprocess.img_size
    idx = [i for i, r in enumerate(ds.records) if r.bbox is not None]
    maps, wins, truth, preds = [], [], [], []
    for b in range(0, len(idx), batch):
        chunk = idx[b : b + batch]
        imgs = [ds.load_image(i) for i in chunk]
        act = activation_maps(model, torch.stack([tf(im) for im in imgs]))
        maps.append(normalise_maps(act.maps, s).numpy())
        preds.append(act.logits.argmax(1).numpy())
        for i, im in zip(chunk, imgs, strict=True):
            wins.append(
                view_window(im.width, im.height, s, model.preprocess.resize_side, model.preprocess.crop_mode)
            )
            x1, y1, x2, y2 = ds.records[i].bbox  # type: ignore[misc]
            truth.append((x1 / im.width, y1 / im.height, x2 / im.width, y2 / im.height))
    labels = np.asarray([ds.records[i].label for i in idx])
    return {
        "maps": np.concatenate(maps),
        "wins": wins,
        "truth": np.asarray(truth),
        "labels": labels,
        "pred": np.concatenate(preds),
        "method": act.method,
    }


def cam_boxes(m: dict[str, Any], settings: BoxSettings) -> np.ndarray:
    return np.asarray(
        [
            to_photo(box_from_map(c, settings.threshold, settings.margin), w)
            for c, w in zip(m["maps"], m["wins"], strict=True)
        ]
    )


def score(boxes: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ious = iou(boxes, truth)
    return {"mean_iou": float(ious.mean()), "corloc": corloc(ious)}


def run_benchmark(run: Path, data: Path, tune_split: str, split: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    tune = maps_and_truth(run, data, tune_split)
    grid = []
    for t in THRESHOLDS:
        for mg in MARGINS:
            sc = score(cam_boxes(tune, BoxSettings(t, mg)), tune["truth"])
            grid.append({"threshold": t, "margin": mg, **sc})
    best = max(grid, key=lambda g: (g["corloc"], g["mean_iou"]))
    best_share = max(
        CENTRE_SHARES, key=lambda sh: score(np.asarray(centre_box(sh)), tune["truth"])["mean_iou"]
    )
    test = maps_and_truth(run, data, split)
    chosen, default = BoxSettings(best["threshold"], best["margin"]), BoxSettings()
    n = len(test["truth"])
    rows = {
        f"CAM box (tuned: t={chosen.threshold}, m={chosen.margin})": score(
            cam_boxes(test, chosen), test["truth"]
        ),
        f"CAM box (defaults: t={default.threshold}, m={default.margin})": score(
            cam_boxes(test, default), test["truth"]
        ),
        "centre box (50 % of each side)": score(np.tile(centre_box(0.5), (n, 1)), test["truth"]),
        f"centre box (tuned share {best_share})": score(
            np.tile(centre_box(best_share), (n, 1)), test["truth"]
        ),
        "whole photo": score(np.tile(WHOLE, (n, 1)), test["truth"]),
    }
    correct = test["pred"] == test["labels"]
    tuned_ious = iou(cam_boxes(test, chosen), test["truth"])
    return {
        "run": str(run),
        "data": str(data),
        "tune_split": tune_split,
        "split": split,
        "n_tune": len(tune["truth"]),
        "n_test": n,
        "cam_method": test["method"],
        "test_accuracy": float(correct.mean()),
        "corloc_when_right": corloc(tuned_ious[correct]) if correct.any() else None,
        "corloc_when_wrong": corloc(tuned_ious[~correct]) if (~correct).any() else None,
        "tuned": best,
        "grid": grid,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['run']} on {r['data']}: settings tuned on {r['tune_split']} ({r['n_tune']} photos), "
          f"reported on {r['split']} ({r['n_test']} photos); map: {r['cam_method']}")  # fmt: skip
    print(f"{'box':58s} {'mean IoU':>9s} {'CorLoc':>8s}")
    for name, sc in r["rows"].items():
        print(f"{name:58s} {sc['mean_iou']:9.3f} {sc['corloc']:8.3f}")
    print(f"test top-1 {r['test_accuracy']:.3f}; CorLoc when the class is right {r['corloc_when_right']}, "
          f"when wrong {r['corloc_when_wrong']}")  # fmt: skip
    print("tuning grid (threshold, margin → CorLoc / mean IoU on the tuning split):")
    for g in r["grid"]:
        print(f"  t={g['threshold']:.2f} m={g['margin']:.2f}  {g['corloc']:.3f} / {g['mean_iou']:.3f}")
    cam = next(iter(r["rows"].values()))["corloc"]
    whole, centre = r["rows"]["whole photo"]["corloc"], r["rows"]["centre box (50 % of each side)"]["corloc"]
    ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else f"inf ({a:.3f} vs 0)"  # noqa: E731
    print(f"RATIO CorLoc CAM box / whole photo: {ratio(cam, whole)}; CAM / centre 50 %: {ratio(cam, centre)}")


def smoke() -> dict[str, Any]:
    """A 2-epoch scratch CNN on a tiny synthetic set: proves the script runs end to end."""
    from carspotter.config import ExperimentConfig, apply_overrides
    from carspotter.data.synth import make_synthetic
    from carspotter.engine.train import fit

    tmp = Path(tempfile.mkdtemp())
    make_synthetic(tmp / "data", classes=3, per_class=10, size=48, val_fraction=0.2, test_fraction=0.2)
    over = {"model.arch": "scratch_cnn", "model.channels": [8, 16], "model.hidden_dim": 16, "pretrained": False,
            "img_size": 48, "batch_size": 8, "device": "cpu", "train.amp": False, "epochs": 2}  # fmt: skip
    fit(apply_overrides(ExperimentConfig(), over), tmp / "data", tmp / "run", progress=False)
    return run_benchmark(tmp / "run", tmp / "data", "val", "test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--tune-split", default="val")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path, help="Also write the full result here (refuses to overwrite).")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    print(machine_line())
    if a.smoke:
        r = smoke()
    else:
        if a.run is None or a.data is None:
            ap.error("give --run RUN and --data PREPARED_DIR (with boxes), or --smoke")
        r = run_benchmark(a.run, a.data, a.tune_split, a.split)
    print_report(r)
    if a.json:
        if a.json.exists():
            sys.exit(f"{a.json}: exists; not overwritten")
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
