"""Do the heat-maps lie on the car? Measured where the truth is known: the synthetic set's vehicle boxes.

For a trained run and a synthetic set (`carspotter data synth`: each vehicle's box in manifest.csv), every
test photo's heat-map of the predicted class is laid over the photo and scored against the true box:

- mass in box: the share of the heat-map's total mass inside the box (a map that ignored the car would put
  the box's share of the image area there: the uniform baseline), and the ratio of the two means. The ratio
  is bounded by 1 / area share (about 3 here, where cars cover a third of the photo), so also
- inside / outside density: heat-map mass per unit area inside the box over mass per unit area outside
  (1 for a uniform map, unbounded for a map on the car);
- pointing game: the share of photos whose hottest pixel lies in the box (a random pixel: the area share;
  the photo's centre: the share of boxes that hold it);
- CorLoc: the share of photos whose heat-map box (explain/box.py box_from_map with the library's defaults)
  has IoU ≥ 0.5 with the truth, against the centred 50 % box and the whole photo.

Every option is measured on the same trained model: target layers (--layers; default: the library's pick,
plus for EfficientNet `blocks.4` (8×8 at 128 px) and `blocks.5`/`blocks.6`), methods Grad-CAM, Grad-CAM++
and the plain CAM of explain/box.py (the feature map × classifier weights, for the library's box), and the
same network with random weights as the control.

    # the model: a synthetic set and a fine-tuned Lite0 (RESULTS.md / BENCHMARKS.md give the exact commands)
    python benchmarks/explain_localisation.py --run RUN --data SYNTH [--layers backbone.bn2 backbone.blocks.4]
    # or train here (frozen ImageNet Lite0 + linear head, or --finetune), one run per seed
    python benchmarks/explain_localisation.py --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors
    python benchmarks/explain_localisation.py --smoke   # seconds: a tiny scratch CNN on a tiny synthetic set
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.data.images import open_rgb
from carspotter.data.manifest import read_manifest, split_records
from carspotter.explain.box import activation_maps, box_from_map, centre_box, corloc, iou, normalise_maps
from carspotter.explain.cam import DEFAULT_METHOD, cam_to_photo, explain_batch, heat_in_box, target_layer
from carspotter.models.factory import create_model
from carspotter.models.loading import load_run

METHODS = ("gradcam", "gradcam++", "cam")


def candidate_layers(model: torch.nn.Module) -> list[str]:
    """The library's pick first, then finer / earlier maps worth comparing."""
    default = target_layer(model)[0]
    names = {n for n, _ in model.named_modules()}
    extra = [f"backbone.blocks.{i}" for i in (4, 5, 6)] + ["backbone.conv_head"]
    return [default] + [n for n in extra if n in names and n != default]


def heat_maps(
    model: torch.nn.Module, x: torch.Tensor, method: str, layer: str
) -> tuple[np.ndarray, torch.Tensor]:
    if method == "cam":  # explain/box.py: the plain CAM (or head-only Grad-CAM) of the unpooled feature map
        act = activation_maps(model, x)  # type: ignore[arg-type]
        return normalise_maps(act.maps, x.shape[-2:]).numpy(), act.logits
    return explain_batch(model, x, method=method, layer=layer)


def box_at_map_size(shape: tuple[int, int], box: Any, grid: tuple[int, int]) -> np.ndarray:
    """The best a `grid` map can do: the true box averaged down to the map's cells, upsampled (bilinear) and
    min-max scaled as Grad-CAM's maps are: the ceiling that the map's resolution puts on every score."""
    import cv2

    m = np.zeros(shape, np.float32)
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    m[y1:y2, x1:x2] = 1.0
    small = cv2.resize(m, grid[::-1], interpolation=cv2.INTER_AREA)
    o = cv2.resize(small, shape[::-1], interpolation=cv2.INTER_LINEAR)
    return (o - o.min()) / max(float(o.max() - o.min()), 1e-12)


def measure(
    model: torch.nn.Module,
    pre: Any,
    data: Path,
    method: str,
    layer: str,
    split: str = "test",
    grid: tuple[int, int] = (4, 4),
) -> dict:
    """Per-photo scores of one (model, method, layer) on `split`, aggregated. `pre`: the trained run's
    Preprocess (the random-weight control is fed exactly the same)."""
    recs = split_records(read_manifest(data), split)
    tf = pre.transform()
    rows, correct = [], []
    for i in range(0, len(recs), 32):
        batch = recs[i : i + 32]
        photos = [open_rgb(data / r.path) for r in batch]
        heat, logits = heat_maps(model, torch.stack([tf(p) for p in photos]), method, layer)
        for r, p, h, pred in zip(batch, photos, heat, logits.argmax(1).tolist(), strict=True):
            correct.append(pred == r.label)
            hp = cam_to_photo(h, p.size, pre.resize_side, pre.crop_mode)
            if hp.max() <= 0:  # an empty map (no positive evidence at this layer) says nothing about where
                continue
            s = heat_in_box(hp, r.bbox)
            w, h_ = p.size
            truth = (r.bbox[0] / w, r.bbox[1] / h_, r.bbox[2] / w, r.bbox[3] / h_)
            s["iou"] = float(iou(box_from_map(hp / hp.max(), 0.6, 0.1), truth))
            s["centre_hit"] = float(truth[0] <= 0.5 < truth[2] and truth[1] <= 0.5 < truth[3])
            s["centre_iou"] = float(iou(centre_box(0.5), truth))
            s["whole_iou"] = float(iou((0.0, 0.0, 1.0, 1.0), truth))
            prior = heat_in_box(centre_prior(hp.shape), r.bbox)  # a map that only knows cars sit mid-photo
            s["prior_inside"], s["prior_density"] = prior["inside"], prior["density"]
            oracle = heat_in_box(box_at_map_size(hp.shape, r.bbox, grid), r.bbox)
            s["oracle_inside"], s["oracle_hit"] = oracle["inside"], oracle["hit"]
            rows.append(s)
    return summarise(rows, len(correct), float(np.mean(correct)))


def centre_prior(shape: tuple[int, int], sd: float = 0.25) -> np.ndarray:
    """A Gaussian bump on the photo's centre (sd: a share of each side): the centre-bias baseline map."""
    ys, xs = ((np.arange(n) + 0.5) / n - 0.5 for n in shape)
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sd**2)).astype(np.float32)


def pooled_density(inside: np.ndarray, area: np.ndarray) -> float:
    """Mass per unit area inside the boxes over mass per unit area outside, pooled over photos."""
    return float((inside.sum() / area.sum()) / max((1 - inside).sum() / (1 - area).sum(), 1e-12))


def summarise(rows: list[dict[str, float]], n: int, acc: float) -> dict[str, float]:
    if not rows:
        return {"empty": 1.0, "acc": acc}
    col = lambda k: np.asarray([r[k] for r in rows])  # noqa: E731
    inside, area = col("inside"), col("area")
    return {
        "inside": float(inside.mean()),
        "area": float(area.mean()),
        "ratio": float(inside.mean() / area.mean()),
        "density": pooled_density(inside, area),
        "pointing": float(col("hit").mean()),
        "corloc": corloc(col("iou")),
        "centre_hit": float(col("centre_hit").mean()),
        "prior_ratio": float(col("prior_inside").mean() / area.mean()),
        "prior_density": pooled_density(col("prior_inside"), area),
        "oracle_ratio": float(col("oracle_inside").mean() / area.mean()),
        "oracle_density": pooled_density(col("oracle_inside"), area),
        "oracle_pointing": float(col("oracle_hit").mean()),
        "corloc_centre": corloc(col("centre_iou")),
        "corloc_whole": corloc(col("whole_iou")),
        "empty": 1 - len(rows) / n,
        "acc": acc,
    }


def measure_run(run: Path, data: Path, layers: list[str] | None, methods: list[str], seed: int = 0) -> dict:
    model, info = load_run(run)
    layers = layers or candidate_layers(model)
    cfg = apply_overrides(ExperimentConfig(), {"model.arch": info.model["arch"]})
    mcfg = type(cfg.model)(**{**info.model, "pretrained": False})
    torch.manual_seed(seed)
    untrained = create_model(mcfg, info.num_classes, model.preprocess.img_size).eval()  # random weights
    out: dict[str, dict] = {}
    shapes = {}
    feat: list[tuple[int, ...]] = []
    for layer in layers:
        feat.clear()
        hook = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: feat.append(tuple(o.shape)))
        with torch.no_grad():
            model(torch.zeros(1, 3, model.preprocess.img_size, model.preprocess.img_size))
        hook.remove()
        shapes[layer] = "×".join(map(str, feat[0][2:]))
        grid = (int(feat[0][2]), int(feat[0][3]))
        for method in methods:
            if method == "cam" and layer != layers[0]:
                continue  # the plain CAM is of the feature map only
            for who, m in (("trained", model), ("random weights", untrained)):
                key = f"{who} | {'feature map (CAM)' if method == 'cam' else layer} | {method}"
                out[key] = measure(m, model.preprocess, data, method, layer, grid=grid)
                r = out[key]
                print(f"{key:55s} in {r.get('inside', 0):.3f} area {r.get('area', 0):.3f} "
                      f"ratio {r.get('ratio', 0):.2f} dens {r.get('density', 0):.2f} "
                      f"point {r.get('pointing', 0):.3f} corloc {r.get('corloc', 0):.3f} "
                      f"empty {r['empty']:.3f} acc {r['acc']:.3f}", flush=True)  # fmt: skip
    return {"rows": out, "shapes": shapes}


def train_run(data: Path, out: Path, a: argparse.Namespace, seed: int) -> None:
    from carspotter.engine.train import fit

    common = {"img_size": a.size, "crop_mode": "squash", "batch_size": 32, "epochs": a.epochs, "device": "cpu",
              "train.amp": False, "seed": seed, "schedule.name": "cosine"}  # fmt: skip
    if a.arch == "scratch_cnn":
        model_cfg = {"model.arch": "scratch_cnn", "model.channels": [16, 32, 64], "model.batchnorm": True,
                     "model.hidden_dim": 64, "pretrained": False, "lr": 3e-3}  # fmt: skip
    else:
        model_cfg = {"model.arch": a.arch, "weights": str(a.weights), "lr": 1e-3,
                     "model.freeze": "none" if a.finetune else "backbone"}  # fmt: skip
    fit(apply_overrides(ExperimentConfig(), {**common, **model_cfg}), data, out, progress=False)


def print_table(results: list[dict]) -> None:
    def ms(v: list[float]) -> str:
        v = [x for x in v if x == x]
        if not v:
            return "–"
        return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

    print("map sizes at the input size:", results[0]["shapes"])
    print("| model | layer | method | mass in box | box area share | ratio | in/out density | pointing game "
          "| CorLoc (CAM box) | empty maps | test acc. |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in results[0]["rows"]:
        rs = [r["rows"][key] for r in results]
        cells = " | ".join(ms([r.get(k, float("nan")) for r in rs]) for k in
                           ("inside", "area", "ratio", "density", "pointing", "corloc", "empty", "acc"))  # fmt: skip
        print(f"| {key} | {cells} |")
    rs = [next(iter(r["rows"].values())) for r in results]
    print(f"baselines: uniform map: mass in box = area share {ms([r['area'] for r in rs])}, ratio 1, density 1, "
          f"pointing game (random pixel) {ms([r['area'] for r in rs])}; centre prior (Gaussian, sd 0.25 of the "
          f"side): ratio {ms([r['prior_ratio'] for r in rs])}, density {ms([r['prior_density'] for r in rs])}; "
          f"photo centre in box "
          f"{ms([r['centre_hit'] for r in rs])}; CorLoc centre 50 % box {ms([r['corloc_centre'] for r in rs])}, "
          f"whole photo {ms([r['corloc_whole'] for r in rs])}")  # fmt: skip
    key = next((k for k in results[0]["rows"] if k.startswith("trained") and k.endswith(f"| {DEFAULT_METHOD}")),
               next(iter(results[0]["rows"])))  # fmt: skip
    d = [r["rows"][key] for r in results]
    print(f"ceiling at the map size of {key.split(' | ')[1]}: the true box drawn at {results[0]['shapes'].get(key.split(' | ')[1], '?')} "
          f"cells: ratio {ms([r['oracle_ratio'] for r in d])}, density {ms([r['oracle_density'] for r in d])}, "
          f"pointing game {ms([r['oracle_pointing'] for r in d])}")  # fmt: skip
    print(f"RATIO mass in box / box area share ({key}): {ms([r['ratio'] for r in d])}; in/out density "
          f"{ms([r['density'] for r in d])}; pointing game {ms([r['pointing'] for r in d])}; CorLoc "
          f"{ms([r['corloc'] for r in d])} vs centre box {ms([r['corloc_centre'] for r in d])}, whole photo "
          f"{ms([r['corloc_whole'] for r in d])}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run to measure (with --data)")
    ap.add_argument(
        "--data", type=Path, help="the synthetic set it was trained on (its test split is scored)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", type=Path, help="ImageNet weights for --arch (.safetensors)")
    ap.add_argument("--finetune", action="store_true", help="train every layer (default: frozen backbone)")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", nargs="+", help="target layers (default: the library's pick + finer maps)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_line())
    from carspotter.data.synth import make_synthetic

    results = []
    if a.run:
        if not a.data:
            ap.error("--run needs --data (the synthetic set with boxes)")
        results.append(measure_run(a.run, a.data, a.layers, a.methods))
    else:
        if a.smoke:
            a.arch, a.classes, a.per_class, a.size, a.epochs, a.seeds = "scratch_cnn", 2, 10, 48, 2, [0]
        elif a.arch != "scratch_cnn" and not a.weights:
            ap.error(
                "--weights PATH (ImageNet weights for --arch) is needed; or --arch scratch_cnn, or --run"
            )
        with tempfile.TemporaryDirectory() as tmp:
            for seed in a.seeds:
                data = Path(tmp) / f"synth{seed}"
                make_synthetic(data, classes=a.classes, per_class=a.per_class, size=a.size, seed=seed)
                train_run(data, Path(tmp) / f"run{seed}", a, seed)
                results.append(measure_run(Path(tmp) / f"run{seed}", data, a.layers, a.methods, seed))
    print(
        f"\n{len(results)} run(s); heat-map of the predicted class; means over the photos whose map is not empty"
    )
    print_table(results)


if __name__ == "__main__":
    main()
