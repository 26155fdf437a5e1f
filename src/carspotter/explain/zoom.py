"""A second look: classify once, crop the original photo to the CAM box, classify the crop, combine the two.

The crop is taken from the photo the user gave (not from the network's already-resized square), widened
towards a square around the box where the photo allows (so the model's own eval transform, which keeps the
aspect and centre-crops, loses little of the box), and then goes through that same transform: the zoomed
look sees a photo framed like the training photos, only tighter.

Combining (`ZoomSettings.combine`):
  mean  average the two looks' logits (a two-view test-time ensemble)
  zoom  the zoomed look alone
  gate  the average where the box is small (area < `gate_area` of the photo), else the first look alone;
        photos whose box covers most of the frame then skip the second forward altogether
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from carspotter.explain.box import (
    Box,
    BoxSettings,
    activation_maps,
    box_area,
    photo_boxes,
)
from carspotter.models.factory import CarModel

COMBINES = ("mean", "zoom", "gate")


@dataclass(frozen=True)
class ZoomSettings:
    """How the two looks are combined. Defaults chosen by measurement on cars-small val (RESULTS.md): there
    `gate` at 0.5 matched `mean`'s accuracy with a second look for only a quarter of the photos."""

    combine: str = "gate"
    gate_area: float = 0.5
    # context kept around the box for the crop, as a share of the box's size on each side: the network was
    # trained on whole frames, and on the synthetic set a crop tight to the box lost the cars' ends
    margin: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"zoom margin must be in [0, 2], got {self.margin}")
        if self.combine not in COMBINES:
            raise ValueError(f"zoom combine must be one of {COMBINES}, got {self.combine!r}")
        if not 0.0 < self.gate_area <= 1.0:
            raise ValueError(f"zoom gate_area must be in (0, 1], got {self.gate_area}")


@dataclass
class Looks:
    """The result of looking at N photos (once, or twice with zoom)."""

    logits: torch.Tensor  # (N, C) the answer: combined where zoomed, else the first look
    first: torch.Tensor  # (N, C) the first look
    boxes: np.ndarray  # (N, 4) CAM boxes, normalised to each photo
    second: torch.Tensor | None = None  # (N, C) the zoomed look (rows of photos not zoomed repeat `first`)
    zoomed: np.ndarray | None = None  # (N,) bool: which photos had a second look
    method: str = "cam"
    seconds: dict[str, float] = field(default_factory=dict)  # "first", "second": wall time of each look


def zoom_rect(width: int, height: int, box: Box) -> tuple[int, int, int, int]:
    """The pixel rectangle (l, t, r, b) the second look classifies: `box` widened towards a square around it."""
    w, h = width, height
    x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cw, ch = min(w, max(bw, bh)), min(h, max(bh, bw))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = min(max(cx - cw / 2, 0.0), w - cw)
    top = min(max(cy - ch / 2, 0.0), h - ch)
    x0, y0 = round(left), round(top)
    x1, y1 = max(x0 + 1, round(left + cw)), max(y0 + 1, round(top + ch))
    return x0, y0, min(x1, w), min(y1, h)


def zoom_crop(img: Image.Image, box: Box, margin: float = 0.0) -> Image.Image:
    """The original photo cropped for the second look (see `zoom_rect`), `margin` of context around the box."""
    return img.crop(zoom_rect(img.width, img.height, expand(box, margin)))


def expand(box: Box, margin: float) -> Box:
    """`box` grown by `margin` of its width / height on each side, clipped to the photo."""
    mx, my = margin * (box[2] - box[0]), margin * (box[3] - box[1])
    return (max(0.0, box[0] - mx), max(0.0, box[1] - my), min(1.0, box[2] + mx), min(1.0, box[3] + my))


class Looker:
    """Runs the looks for a loaded run: `looker(images)` → `Looks`. Not thread-safe (one model, one thread)."""

    def __init__(
        self,
        model: CarModel,
        info: Any,  # rundir.ModelInfo: class names
        box: BoxSettings | None = None,
        zoom: ZoomSettings | None = None,
        device: str | torch.device = "cpu",
        autocast: torch.dtype | None = None,
        tta: str = "none",
    ) -> None:
        from carspotter.models.inference import normalize_tta, with_tta

        self.model, self.info = model, info
        self.tta = normalize_tta(tta)
        self.forward = with_tta(model, self.tta)  # the run's test-time augmentation, as evaluate runs it
        self.box = box or BoxSettings()
        self.zoom = zoom
        self.device = torch.device(device)
        self.autocast = autocast
        self.preprocess = model.preprocess
        self.transform: Callable[[Image.Image], torch.Tensor] = model.preprocess.transform()
        self.img_size = int(model.preprocess.img_size)

    def _batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from carspotter.data.transforms import single_thread

        with single_thread():
            return torch.stack([self.transform(im) for im in images]).to(self.device)

    def _ctx(self) -> Any:
        dt = self.autocast or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dt, enabled=self.autocast is not None)

    def boxes_for(self, images: Sequence[Image.Image], maps: torch.Tensor) -> np.ndarray:
        """(N, h, w) raw maps of the network's view → (N, 4) boxes normalised to each photo."""
        return photo_boxes(maps, [im.size for im in images], self.preprocess, self.box)

    def __call__(self, images: Sequence[Image.Image]) -> Looks:
        t0 = time.perf_counter()
        x = self._batch(images)
        with self._ctx():
            act = activation_maps(self.model, x)
        first = act.logits.float().cpu()
        if self.tta != "none":  # the box comes from the photo as given; the answer from every view
            with torch.no_grad(), self._ctx():
                first = (first + self.model(torch.flip(x, dims=(3,))).float().cpu()) / 2
        boxes = self.boxes_for(images, act.maps)
        t1 = time.perf_counter()
        looks = Looks(first, first, boxes, method=act.method, seconds={"first": t1 - t0, "second": 0.0})
        if self.zoom is None:
            return looks
        if self.zoom.combine == "gate":
            zoomed = box_area(boxes) < self.zoom.gate_area
        else:
            zoomed = np.ones(len(images), dtype=bool)
        second = first.clone()
        idx = np.flatnonzero(zoomed)
        if idx.size:
            crops = [zoom_crop(images[i], tuple(boxes[i]), self.zoom.margin) for i in idx]  # type: ignore[arg-type]
            with torch.no_grad(), self._ctx():
                second[torch.as_tensor(idx)] = self.forward(self._batch(crops)).float().cpu()
        if self.zoom.combine == "zoom":
            logits = second
        else:
            logits = (first + second) / 2
        looks.logits, looks.second, looks.zoomed = logits, second, zoomed
        looks.seconds["second"] = time.perf_counter() - t1
        return looks


def rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in box]


def predict_with_box(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    k: int = 5,
    zoom: ZoomSettings | None = None,
    box: BoxSettings | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Top-k per photo (calibrated), with where the car is: [{"path", "top", "box": [x1, y1, x2, y2], "zoomed"}].

    The short form of `predict --zoom` (engine.batch_predict.predict_files with a Looker), one look at full
    precision, no test-time augmentation."""
    from functools import partial

    from carspotter.engine.batch_predict import predict_files, top_lists
    from carspotter.rundir import RunError, read_model_info

    if read_model_info(run_dir).num_classes <= 0:
        raise RunError(f"{run_dir}: a metric-learning run has no classifier; use `carspotter search` instead")
    looker = partial(Looker, box=box, zoom=zoom, device=device)
    rows = predict_files(run_dir, [Path(p) for p in paths], k=k, device=device, tta="none", looker=looker)
    return top_lists(rows)


def mcnemar(first_ok: np.ndarray, second_ok: np.ndarray) -> dict[str, float]:
    """Paired comparison of two answer sets on the same photos: discordant counts and the exact two-sided p."""
    from scipy.stats import binomtest

    b = int(np.sum(first_ok & ~second_ok))  # right only at first
    c = int(np.sum(~first_ok & second_ok))  # right only with zoom
    p = float(binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0
    return {"only_first_right": b, "only_zoom_right": c, "mcnemar_p": p}


def paired_bootstrap(
    first_ok: np.ndarray, second_ok: np.ndarray, n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval of accuracy(second) − accuracy(first), resampling photos (pairs kept)."""
    rng = np.random.default_rng(seed)
    d = second_ok.astype(np.float64) - first_ok.astype(np.float64)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    means = d[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def zoom_comparison(labels: np.ndarray, first: torch.Tensor, final: torch.Tensor) -> dict[str, Any]:
    """Accuracy of one look vs the zoomed answer on the same photos, with McNemar and a bootstrap CI."""
    y = np.asarray(labels)
    a = first.argmax(1).numpy() == y
    z = final.argmax(1).numpy() == y
    lo, hi = paired_bootstrap(a, z)
    return {
        "accuracy_one_look": float(a.mean()),
        "accuracy_zoom": float(z.mean()),
        "gain": float(z.mean() - a.mean()),
        "gain_ci95": [lo, hi],
        **mcnemar(a, z),
    }


def load_for_split(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "cpu",
    crop_bbox: bool | None = None,
    check_classes: bool = True,
) -> tuple[CarModel, Any, Any, Any]:
    """(model, model info, PreparedDataset split, run config or None): a classification run and the photos
    to score it on, checked to share its classes. `data_dir` defaults to the run's own data, `crop_bbox` to
    its own setting (localisation passes False: it needs the whole photos its boxes refer to; and it scores
    boxes, not classes, so it may skip `check_classes`)."""
    from carspotter.data.dataset import PreparedDataset
    from carspotter.models.loading import load_run
    from carspotter.rundir import CONFIG, RunError, read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir) if (run_dir / CONFIG).is_file() else None
    if data_dir is None:
        if cfg is None:
            raise RunError(f"{run_dir}: no {CONFIG} to say which data it was trained on; pass the data")
        data_dir = cfg.data.root
    model, info = load_run(run_dir, device)
    if info.num_classes <= 0:
        raise RunError(f"{run_dir}: a metric-learning run has no classifier: no CAM box, no second look")
    if crop_bbox is None:
        crop_bbox = bool(cfg.data.crop_bbox) if cfg is not None else False
    ds = PreparedDataset(Path(data_dir), split, crop_bbox=crop_bbox)
    if check_classes and ds.class_names != info.class_names:
        raise RunError(
            f"{data_dir}: its classes differ from the {len(info.class_names)} the run {run_dir} was trained on"
        )
    return model, info, ds, cfg


def evaluate_zoom(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 32,
    zoom: ZoomSettings | None = None,
    box: BoxSettings | None = None,
    limit: int | None = None,
) -> Any:  # rundir.EvalResult
    """Evaluate a run with the second look → metrics (+ predictions CSV with the boxes); writes nothing.

    `.save()` writes RUN_DIR/metrics_zoom_<split>[@<data>].json and predictions_zoom_<split>[@<data>].csv, so
    the one-look result files are kept. One pass gives both looks of every photo: the gain is a paired
    comparison on the same run, and the one-look figures equal `evaluate`'s (same transform, same weights).
    """
    from carspotter.engine.evaluate import _predictions_csv
    from carspotter.models.inference import autocast_dtype
    from carspotter.retrieval.metrics import classification_metrics
    from carspotter.rundir import (
        EvalResult,
        RunError,
        data_tag,
        zoom_metrics_name,
        zoom_predictions_name,
    )
    from carspotter.utils import resolve_device

    run_dir = Path(run_dir)
    dev = torch.device(resolve_device(device))
    model, info, ds, cfg = load_for_split(run_dir, data_dir, split, str(dev))
    data_dir = ds.root
    tag = data_tag(data_dir, cfg.data.root if cfg is not None else None)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise RunError(f"{data_dir}: split {split!r} has no images")
    zoom = zoom or ZoomSettings()
    # the run's recorded precision (model.json), as evaluate, predict and serve run it
    looker = Looker(model, info, box, zoom, dev, autocast_dtype(info.amp, dev))
    firsts, finals, seconds, boxes, zoomed = [], [], [], [], []
    t_first = t_second = 0.0
    for s in range(0, n, batch_size):
        images = [ds.load_image(i) for i in range(s, min(n, s + batch_size))]
        looks = looker(images)
        firsts.append(looks.first)
        finals.append(looks.logits)
        seconds.append(looks.second)
        boxes.append(looks.boxes)
        zoomed.append(looks.zoomed)
        t_first += looks.seconds["first"]
        t_second += looks.seconds["second"]
    first, final = torch.cat(firsts), torch.cat(finals)
    labels = np.asarray(ds.labels[:n])
    probs = final.softmax(dim=1).numpy()
    loss = torch.nn.functional.cross_entropy(final, torch.as_tensor(labels)).item()
    metrics: dict[str, Any] = {
        **classification_metrics(labels, probs.argmax(1), probs, loss),
        **zoom_comparison(labels, first, final),
        "combine_alternatives": combine_alternatives(
            labels, first, torch.cat(seconds), np.concatenate(boxes), zoom
        ),
        "zoom": asdict(zoom),
        "box": asdict(looker.box),
        "cam_method": looks.method,
        "share_zoomed": float(np.concatenate(zoomed).mean()),
        "mean_box_area": float(box_area(np.concatenate(boxes)).mean()),
        "time_first_look_s": t_first,
        "time_second_look_s": t_second,
        "time_ratio": (t_first + t_second) / t_first if t_first > 0 else None,
        "n_images": n,
        "split": split,
        "device": str(dev),
    }
    if tag:
        metrics["data"] = str(data_dir)
    csv_text = _with_boxes(_predictions_csv(ds.paths[:n], labels, probs), np.concatenate(boxes))
    files = {zoom_metrics_name(split, tag): None, zoom_predictions_name(split, tag): csv_text}
    return EvalResult(metrics, run_dir, files)


def combine_alternatives(
    labels: np.ndarray, first: torch.Tensor, second: torch.Tensor, boxes: np.ndarray, zoom: ZoomSettings
) -> dict[str, float] | None:
    """Accuracy of every way to combine the same two looks (so one pass chooses the default)."""
    if zoom.combine == "gate":  # photos with a large box had no second look
        return None
    y = torch.as_tensor(labels)
    acc = lambda lg: float((lg.argmax(1) == y).float().mean())  # noqa: E731
    mean = (first + second) / 2
    out = {"one_look": acc(first), "mean": acc(mean), "zoom": acc(second)}
    area = torch.as_tensor(box_area(boxes))
    for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        gate = area < a
        out[f"gate@{a}"] = acc(torch.where(gate[:, None], mean, first))
        out[f"gate@{a}_share_zoomed"] = float(gate.float().mean())
    return out


def _with_boxes(pred_csv: str, boxes: np.ndarray) -> str:
    """predictions.csv + the CAM box columns box_x1..box_y2 (normalised)."""
    rows = list(csv.reader(io.StringIO(pred_csv)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(rows[0] + ["box_x1", "box_y1", "box_x2", "box_y2"])
    for r, b in zip(rows[1:], boxes, strict=True):
        w.writerow(r + [f"{v:.4f}" for v in b])
    return buf.getvalue()


def localisation(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    box: BoxSettings | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    centre_share: float = 0.5,
) -> dict[str, Any]:
    """Mean IoU and CorLoc (IoU ≥ 0.5) of the CAM box against the manifest's true boxes, and of two
    baselines: the centred box (`centre_share` of each side) and the whole photo. Photos without a box are skipped.
    """
    from carspotter.explain.box import WHOLE, centre_box, corloc, iou
    from carspotter.rundir import RunError

    model, info, ds, _ = load_for_split(
        run_dir, data_dir, split, device, crop_bbox=False, check_classes=False
    )
    idx = [i for i, r in enumerate(ds.records) if r.bbox is not None]
    if not idx:
        raise RunError(f"{data_dir}: no photo of split {split!r} has a box (x1,y1,x2,y2 in manifest.csv)")
    looker = Looker(model, info, box, None, device)
    truth, pred = [], []
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        images = [ds.load_image(i) for i in chunk]
        pred.append(looker(images).boxes)
        for i, im in zip(chunk, images, strict=True):
            x1, y1, x2, y2 = ds.records[i].bbox  # type: ignore[misc]
            truth.append((x1 / im.width, y1 / im.height, x2 / im.width, y2 / im.height))
    t, p = np.asarray(truth), np.concatenate(pred)
    out: dict[str, Any] = {"n_images": len(idx), "split": split, "box": asdict(looker.box)}
    for name, boxes in (
        ("cam", p),
        ("centre", np.asarray(centre_box(centre_share))),
        ("whole", np.asarray(WHOLE)),
    ):
        ious = iou(boxes, t)
        out[name] = {"mean_iou": float(np.mean(ious)), "corloc": corloc(ious)}
    out["ious"] = iou(p, t)
    return out
