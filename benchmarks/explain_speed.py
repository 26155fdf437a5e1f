"""Explanation time per photo against a classify call, for EfficientNet-Lite0 @128 and ResNet-50 @224 (CPU).

Per model (random weights: timing only), one photo at a time, as the service handles a single client:
- classify: the service's classify path (eval transform + forward under inference_mode);
- explain + evidence: `PhotoExplainer.explain` as /api/explain runs it: eval transform, Grad-CAM on the
  folded copy, overlay on the photo, the query vector (from the same pass) and the evidence search in an
  --index-size photo Flat gallery; and the same without an index;
- naive Grad-CAM: pytorch-grad-cam used as its README shows (all parameters requiring gradients, so the
  backward pass runs through the whole network), for the reason the partial backward exists;
- Grad-CAM++ (the other method offered).
Goal: explain ≤ 3× classify. Prints best and median of --reps after warm-up, and the load average.

    python benchmarks/explain_speed.py --image /work/prepared/cars-small/images/test/00011.jpg
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import goal, machine_line, timeit

from carspotter.config import ModelConfig
from carspotter.explain.cam import explain_batch
from carspotter.explain.photo import PhotoExplainer
from carspotter.models.factory import create_model

N_CLASSES = 196


def _info(model: torch.nn.Module) -> SimpleNamespace:
    """What PhotoExplainer reads from a run's model.json (rundir.ModelInfo), for a bare model."""
    from carspotter.rundir import ModelInfo

    p = model.preprocess.to_dict()
    return ModelInfo({}, N_CLASSES, [f"class {i}" for i in range(N_CLASSES)], p)  # type: ignore[return-value]


def _index(model: torch.nn.Module, n: int):  # -> GalleryIndex
    from carspotter.retrieval.index import GalleryIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, model.embed_dim)).astype(np.float32)
    meta = [{"path": f"x{i}.jpg", "label": i % N_CLASSES, "class_name": f"class {i % N_CLASSES}", "split": "train"}
            for i in range(n)]  # fmt: skip
    names = [f"class {i}" for i in range(N_CLASSES)]
    return GalleryIndex.build(vecs, meta, info={"class_names": names, "run_dir": "/bench-run"})


def bench(arch: str, size: int, photo: Image.Image, reps: int, index_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, pretrained=False), N_CLASSES, size).eval()
    info = _info(model)
    tf = model.preprocess.transform()
    index = _index(model, index_size) if index_size else None
    px = PhotoExplainer(model, info, index, run_dir="/bench-run", method="gradcam")  # the run's own index
    px_bare = PhotoExplainer(model, info, None, method="gradcam")
    px_pp = PhotoExplainer(model, info, None, method="gradcam++")

    def classify() -> None:
        with torch.inference_mode():
            model(tf(photo)[None]).softmax(1)

    naive_model = create_model(ModelConfig(arch=arch, pretrained=False), N_CLASSES, size).eval()

    def naive() -> None:
        from pytorch_grad_cam import GradCAM

        layer = naive_model.get_submodule(px.layer)
        with GradCAM(model=naive_model, target_layers=[layer]) as cam:
            cam(input_tensor=tf(photo)[None], targets=None)

    runs = {
        "classify": classify,
        "explain + evidence (Grad-CAM)": lambda: px.explain([photo]),
        "explain, no index (Grad-CAM)": lambda: px_bare.explain([photo]),
        "explain, no index (Grad-CAM++)": lambda: px_pp.explain([photo]),
        "heat-map only (folded copy)": lambda: explain_batch(
            px.explainer.model, tf(photo)[None], layer=px.layer
        ),
        "naive pytorch-grad-cam": naive,
    }
    out = {}
    for name, fn in runs.items():
        for _ in range(2):
            fn()
        t = timeit(fn, reps)
        out[name] = (min(t), statistics.median(t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="a photo (default: a generated 128×96 car drawing)")
    ap.add_argument("--models", default="tf_efficientnet_lite0@128,resnet50@224")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the service runs 1)")
    ap.add_argument("--index-size", type=int, default=8000, help="Flat gallery for evidence search (0: none)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.image:
        photo = Image.open(a.image).convert("RGB")
    else:
        from carspotter.data.synth import class_catalogue, render

        photo = render(class_catalogue(1)[0], np.random.default_rng(0), 128)[0].resize((128, 96))
    print(machine_line())
    print(f"photo {photo.size[0]}x{photo.size[1]}, 1 photo per call, {a.reps} reps, gallery {a.index_size}")
    for spec in a.models.split(","):
        arch, size = spec.split("@")
        res = bench(arch, int(size), photo, a.reps, a.index_size)
        base = res["classify"][0]
        print(f"\n{arch} @{size}")
        print(f"| {'call':30s} | best ms | median ms | best / classify |")
        for name, (best, med) in res.items():
            print(f"| {name:30s} | {1000 * best:7.1f} | {1000 * med:9.1f} | {best / base:6.2f}x |")
        ratio = res["explain + evidence (Grad-CAM)"][0] / base
        print(
            f"goal explain ≤ 3x classify: {ratio:.2f}x → {goal(ratio <= 3)}   ({machine_line().split('; ')[-1]})"
        )


if __name__ == "__main__":
    main()
