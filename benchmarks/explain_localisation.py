"""Do the heat-maps lie on the car? Measured where the truth is known: the synthetic set's vehicle boxes.

For each seed: `data synth` (boxes recorded in manifest.csv), train a classifier on it, then for every test
photo compute the heat-map of the predicted class over the photo and the share of its mass inside the
vehicle's box. A heat-map that ignored the car would put about the box's share of the image area inside
(the uniform baseline); the same network with random weights is the control that shows the training is
what moves the mass. Grad-CAM and Grad-CAM++ side by side; mean ± sd over seeds.

Default model: ImageNet EfficientNet-Lite0 (--weights, frozen) + a linear head trained on the synthetic
classes, which trains in minutes on a CPU; `--arch scratch_cnn` trains the small scratch CNN instead
(much slower to reach a useful accuracy on this fine-grained set).

    python benchmarks/explain_localisation.py --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.data.images import open_rgb
from carspotter.data.manifest import read_manifest, split_records
from carspotter.data.synth import make_synthetic
from carspotter.engine.train import fit
from carspotter.explain.cam import box_area_share, cam_to_photo, explain_batch, mass_inside
from carspotter.models.factory import create_model
from carspotter.models.loading import load_run


def measure(model: torch.nn.Module, pre, data: Path, method: str, layer: str | None) -> dict[str, float]:
    """`pre`: the trained run's Preprocess (the random-weight control is fed exactly the same)."""
    recs = split_records(read_manifest(data), "test")
    tf = pre.transform()
    inside, share, correct = [], [], []
    for i in range(0, len(recs), 32):
        batch = recs[i : i + 32]
        photos = [open_rgb(data / r.path) for r in batch]
        heat, logits = explain_batch(model, torch.stack([tf(p) for p in photos]), method=method, layer=layer)
        for r, p, h, pred in zip(batch, photos, heat, logits.argmax(1).tolist(), strict=True):
            hp = cam_to_photo(h, p.size, pre.resize_side, pre.crop_mode)
            correct.append(pred == r.label)
            if hp.sum() <= 0:  # an empty map (no positive evidence at this layer) says nothing about where
                continue
            inside.append(mass_inside(hp, r.bbox))
            share.append(box_area_share(hp.shape, r.bbox))
    n = len(correct)
    return {"inside": float(np.mean(inside)) if inside else float("nan"),
            "area": float(np.mean(share)) if share else float("nan"),
            "empty": 1 - len(inside) / n, "acc": float(np.mean(correct))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", type=Path, help="ImageNet weights for --arch (.safetensors)")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layer", help="target layer (default: explain.cam.target_layer's pick)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_line())
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            data = Path(tmp) / f"synth{seed}"
            make_synthetic(data, classes=a.classes, per_class=a.per_class, size=a.size, seed=seed)
            common = {
                "img_size": a.size,
                "crop_mode": "squash",
                "batch_size": 32,
                "epochs": a.epochs,
                "device": "cpu",
                "train.amp": False,
                "seed": seed,
                "schedule.name": "cosine",
            }
            if a.arch == "scratch_cnn":
                model_cfg = {
                    "model.arch": "scratch_cnn",
                    "model.channels": [16, 32, 64],
                    "model.batchnorm": True,
                    "model.hidden_dim": 64,
                    "pretrained": False,
                    "lr": 3e-3,
                }
            else:
                if not a.weights:
                    ap.error("--weights PATH (ImageNet weights for --arch) is needed; or --arch scratch_cnn")
                model_cfg = {
                    "model.arch": a.arch,
                    "weights": str(a.weights),
                    "model.freeze": "backbone",
                    "lr": 1e-3,
                }
            cfg = apply_overrides(ExperimentConfig(), {**common, **model_cfg})  # fmt: skip
            fit(cfg, data, Path(tmp) / f"run{seed}", progress=False)
            model, info = load_run(Path(tmp) / f"run{seed}")
            torch.manual_seed(seed)
            rand = apply_overrides(cfg, {"weights": None, "pretrained": False})
            untrained = create_model(rand.model, info.num_classes, a.size).eval()  # random weights throughout
            for method in ("gradcam", "gradcam++"):
                for name, m in ((f"trained, {method}", model), (f"untrained (control), {method}", untrained)):
                    r = measure(m, model.preprocess, data, method, a.layer)
                    rows.setdefault(name, []).append(r)
                    print(f"seed {seed} {name:32s} inside {r['inside']:.3f}  box area {r['area']:.3f}  "
                          f"empty maps {r['empty']:.3f}  acc {r['acc']:.3f}", flush=True)  # fmt: skip

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"

    print(
        f"\n{len(a.seeds)} seeds, {a.classes} classes × {a.per_class} photos at {a.size} px, {a.epochs} epochs"
    )
    print(f"target layer: {a.layer or 'default'}; means over the photos whose heat-map is not empty")
    print(
        "| model, method | heat-map mass inside the box | box share of the image | ratio | empty maps | test accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        ratio = [r["inside"] / r["area"] for r in rs]
        print(f"| {name} | {ms([r['inside'] for r in rs])} | {ms([r['area'] for r in rs])} | {ms(ratio)} | "
              f"{ms([r['empty'] for r in rs])} | {ms([r['acc'] for r in rs])} |")  # fmt: skip


if __name__ == "__main__":
    main()
