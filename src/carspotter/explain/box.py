"""Where the car is: a box from the network's own class-activation map, from the forward pass it already ran.

With global average pooling followed by linear layers (every timm CNN here: ResNet, DenseNet, EfficientNet),
the logit of class c is the spatial mean of  w_c · f(x, y)  plus a constant, so that product, the class
activation map (CAM, Zhou et al. 2016), says how much each position votes for c. It needs the unpooled feature
map (`CarModel.feature_map`) and the classifier weights, nothing more: no second forward, no gradient.
Where the head is not linear after pooling (the scratch CNN's hidden FC + ReLU), the map is Grad-CAM
(Selvaraju et al. 2017) computed by one backward through the small head only.

The box: min-max normalise the map, keep positions ≥ `threshold`, take the largest connected region
(scipy.ndimage.label), add `margin` of its size on each side. Boxes are normalised (x1, y1, x2, y2) in [0, 1]
of the *photo* the user gave, not of the square the network saw (`view_window` maps one to the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from carspotter.models.factory import CarModel

Box = tuple[float, float, float, float]  # normalised x1, y1, x2, y2
WHOLE: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class BoxSettings:
    """How a map becomes a box. Defaults measured on the synthetic val split (RESULTS.md, benchmarks/localisation.py)."""

    threshold: float = 0.6  # share of the normalised map's range a position needs to count as "car"
    margin: float = 0.1  # added on each side, as a share of the box's width / height

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"box threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"box margin must be in [0, 1], got {self.margin}")


@dataclass
class Activation:
    logits: torch.Tensor  # (B, C) float32
    maps: torch.Tensor  # (B, h, w) float32, the raw class-activation map of `classes`
    classes: torch.Tensor  # (B,) the class each map is for (the top-1 unless given)
    method: str  # "cam" | "grad-cam"


def class_weights(model: CarModel) -> torch.Tensor:
    """(C, F): the linear map from pooled backbone features to logits (classifier ∘ embedding, biases dropped)."""
    w = model.classifier.weight
    if model.embedding is not None:
        w = w @ model.embedding.weight  # (C, D) @ (D, F)
    return w


def _is_mean_pool(fm: torch.Tensor, pooled: torch.Tensor) -> bool:
    """Does the backbone pool by a plain spatial mean? (Then the plain CAM is exact.) Checked on the data."""
    if fm.ndim != 4 or pooled.ndim != 2 or fm.shape[1] != pooled.shape[1]:
        return False
    mean = fm.float().mean(dim=(2, 3))
    tol = 2e-2 * float(mean.abs().max()) + 1e-5  # loose enough for bf16 autocast
    return bool(torch.allclose(mean, pooled.float(), rtol=2e-2, atol=tol))


def activation_maps(model: CarModel, x: torch.Tensor, classes: torch.Tensor | None = None) -> Activation:
    """One forward: logits and the class-activation map of each image's top-1 class (or of `classes`)."""
    if not isinstance(model.classifier, torch.nn.Linear):
        raise ValueError(
            "this model has no classifier (a metric-learning run): it has no class activation map"
        )
    with torch.no_grad():
        fm = model.feature_map(x)
    return maps_from_feature_map(model, fm, classes)


def maps_from_feature_map(
    model: CarModel, fm: torch.Tensor, classes: torch.Tensor | None = None
) -> Activation:
    """`activation_maps` from a feature map already computed (`model.feature_map(x)`): no backbone forward."""
    if not isinstance(model.classifier, torch.nn.Linear):
        raise ValueError(
            "this model has no classifier (a metric-learning run): it has no class activation map"
        )
    if fm.ndim != 4:
        raise ValueError(
            f"{type(model.backbone).__name__} gives no spatial feature map (shape {tuple(fm.shape)})"
        )
    with torch.no_grad():
        pooled = model.pool_map(fm)
        logits = model.forward_head(pooled).float()
    cls = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
    if _is_mean_pool(fm, pooled):
        with torch.no_grad():
            w = class_weights(model).float()[cls]  # (B, F)
            maps = torch.einsum("bchw,bc->bhw", fm.float(), w)
        return Activation(logits, maps, cls, "cam")
    # Grad-CAM through the head only: the backbone's forward is reused, the backward is a few small layers.
    with torch.inference_mode(False), torch.enable_grad():
        fmg = (
            fm.detach().clone().float().requires_grad_(True)
        )  # clones: normal tensors even under inference_mode
        out = model.forward_head(model.pool_map(fmg))
        (grad,) = torch.autograd.grad(out.gather(1, cls.clone()[:, None]).sum(), fmg)
        maps = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * fmg).sum(dim=1)).detach()
    return Activation(logits, maps, cls, "grad-cam")


def normalise_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) → (B, H, W) upsampled (bilinear) and min-max scaled to [0, 1] per image."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(dim=1).values[:, None, None]
    hi = up.flatten(1).max(dim=1).values[:, None, None]
    return (up - lo) / (hi - lo).clamp_min(1e-12)


def box_from_map(cam: np.ndarray, threshold: float, margin: float) -> Box:
    """A normalised [0,1] map (H, W) → the box of its largest region ≥ threshold, plus margin, in [0, 1] units."""
    cam = np.asarray(cam, dtype=np.float32)
    h, w = cam.shape
    mask = cam >= threshold
    if not mask.any():  # a flat map: nothing stands out
        return WHOLE
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (1 + int(np.argmax(sizes)))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x1, x2 = cols[0] / w, (cols[-1] + 1) / w
    y1, y2 = rows[0] / h, (rows[-1] + 1) / h
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return (max(0.0, x1 - mx), max(0.0, y1 - my), min(1.0, x2 + mx), min(1.0, y2 + my))


def view_window(width: int, height: int, img_size: int, resize_side: int | None, crop_mode: str) -> Box:
    """The part of a width×height photo the eval transform shows the network, normalised.

    `resize_side` is the shorter side before the centre crop (`Preprocess.resize_side`; None: img_size / 0.875).
    """
    if crop_mode == "squash":
        return WHOLE
    r = resize_side or round(img_size / 0.875)
    # torchvision: the shorter side → r, the longer → int(r · long / short); then a centred img_size crop
    if width <= height:
        nw, nh = r, int(r * height / width)
    else:
        nw, nh = int(r * width / height), r
    left, top = round((nw - img_size) / 2.0), round((nh - img_size) / 2.0)
    return (
        max(0.0, left / nw),
        max(0.0, top / nh),
        min(1.0, (left + img_size) / nw),
        min(1.0, (top + img_size) / nh),
    )


def to_photo(box: Box, window: Box) -> Box:
    """A box normalised to the network's view → normalised to the whole photo."""
    wx1, wy1, wx2, wy2 = window
    sx, sy = wx2 - wx1, wy2 - wy1
    return (wx1 + box[0] * sx, wy1 + box[1] * sy, wx1 + box[2] * sx, wy1 + box[3] * sy)


def photo_boxes(
    maps: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    preprocess: Any,
    settings: BoxSettings | None = None,
) -> np.ndarray:
    """(N, h, w) raw maps over the network's view → (N, 4) boxes normalised to each photo of `sizes` (w, h).

    `preprocess` is the run's eval transform (data.transforms.Preprocess: img_size, resize_side, crop_mode).
    """
    settings = settings or BoxSettings()
    size = int(preprocess.img_size)
    norm = normalise_maps(maps, size).cpu().numpy()
    out = np.empty((len(sizes), 4), dtype=np.float64)
    for i, (w, h) in enumerate(sizes):
        b = box_from_map(norm[i], settings.threshold, settings.margin)
        out[i] = to_photo(b, view_window(w, h, size, preprocess.resize_side, preprocess.crop_mode))
    return out


def iou(a: Box | np.ndarray, b: Box | np.ndarray) -> np.ndarray:
    """Intersection over union of boxes (…, 4) in the same units; broadcasts."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda z: np.clip(z[..., 2] - z[..., 0], 0, None) * np.clip(z[..., 3] - z[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def corloc(ious: np.ndarray, at: float = 0.5) -> float:
    """Correct localisation: the share of photos whose box has IoU ≥ `at` with the truth."""
    ious = np.asarray(ious, dtype=np.float64)
    return float((ious >= at).mean()) if ious.size else float("nan")


def centre_box(share: float = 0.5) -> Box:
    """The baseline box: the centred `share` of each side of the photo."""
    lo = (1 - share) / 2
    return (lo, lo, 1 - lo, 1 - lo)


def box_area(box: Box | np.ndarray) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
