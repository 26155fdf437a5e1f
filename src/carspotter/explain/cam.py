"""Class-activation heat-maps (Grad-CAM, Grad-CAM++) for every backbone carspotter trains.

The CAM arithmetic and hooks are pytorch-grad-cam's (`grad-cam` on PyPI); this module adds what carspotter
needs around it:

- `target_layer(model)`: the layer to explain, picked per architecture and returned by name so it can be
  recorded (explain.json, the report, /api/explain);
- gradients flow back from the logits to that layer only: the parameters are treated as constants and the
  layer's output is made the one leaf that needs a gradient, so the cost is about one forward pass plus the
  head's backward, not a full backward pass (BENCHMARKS.md);
- the model is left exactly as it was (hooks removed, `requires_grad` flags restored, eval mode), so the
  predictions do not change (tests/test_explain.py);
- `Explainer` explains on a private, BatchNorm-folded copy (the fast eval path of models.fuse), so a
  service can explain on its own thread while the original model keeps classifying;
- `cam_to_photo` maps a heat-map from the network's input square back onto the user's photo (centre crop
  or squash), and `mass_inside` measures how much of it falls in a box. Both are for later users too (a
  CAM-derived car box, zooming).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

METHODS = ("gradcam", "gradcam++")
# What the CLI, the report and the service use. Grad-CAM++ weighs only the positive gradients, so it still
# shows where the class evidence lies when the class score is negative at every position; Grad-CAM then
# returns an empty map. On 20 real cars-small test photos of a frozen-Lite0 run Grad-CAM gave 11 empty maps,
# Grad-CAM++ none, all on the car (BENCHMARKS.md, benchmarks/explain_real.py).
DEFAULT_METHOD = "gradcam++"


class ExplainError(ValueError):
    """The model or the request cannot be explained; the message says which layer or argument."""


def target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the layer whose activations Grad-CAM weighs, picked per architecture.

    - scratch CNN: the last conv block (after its max-pool), the last map before the 4×4 pooling;
    - timm EfficientNet / Lite0: `bn2`, the post-activation 1280-channel map right before global pooling;
    - other timm CNNs: timm's own last feature stage (`feature_info[-1]`): `layer4` for ResNet-50,
      `features.norm5` for DenseNet-121, `stages.3` for ConvNeXt.
    Names are relative to `model` (a CarModel: `backbone.…`).
    """
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    name: str | None = None
    blocks = getattr(backbone, "blocks", None)
    if type(backbone).__name__ == "ScratchBackbone" and isinstance(blocks, nn.Sequential) and len(blocks):
        name = f"blocks.{len(blocks) - 1}"
    elif hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):  # timm EfficientNet family
        name = "bn2"
    else:
        info = getattr(backbone, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
            name = last.get("module")
    if not name:
        raise ExplainError(
            f"no Grad-CAM target layer known for {type(backbone).__name__}: not a scratch CNN and no timm "
            "feature_info; explain a CNN backbone"
        )
    return prefix + name, model.get_submodule(prefix + name)


def _cam_class(method: str) -> Any:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
    if method not in classes:
        raise ExplainError(f"method {method!r}: must be one of {METHODS}")
    return classes[method]


def _targets(class_idx: int | Sequence[int] | None, n: int) -> list[Any] | None:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if class_idx is None:
        return None  # pytorch-grad-cam explains each image's own top-1 class
    idx = [int(class_idx)] * n if isinstance(class_idx, int | np.integer) else [int(c) for c in class_idx]
    if len(idx) != n:
        raise ExplainError(f"class_idx has {len(idx)} entries for {n} images")
    return [ClassifierOutputTarget(c) for c in idx]


def explain_batch(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: int | Sequence[int] | None = None,
    method: str = "gradcam",
    layer: str | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """(heat-maps (B, H, W) float32 in [0, 1], logits (B, C)) from one forward and one partial backward.

    `images` is a preprocessed batch (B, 3, H, W); `class_idx` the class to explain per image (None: each
    image's top-1). The model's state is restored afterwards.
    """
    if images.ndim != 4:
        raise ExplainError(f"images must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        return np.zeros((0, *images.shape[2:]), np.float32), torch.zeros(0)
    name, module = (layer, model.get_submodule(layer)) if layer else target_layer(model)
    n_classes = getattr(model, "num_classes", None)
    if n_classes is not None and n_classes <= 0:
        raise ExplainError("a metric-learning run has no classifier to explain; explain a classification run")
    cam_cls = _cam_class(method)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    shape: list[tuple[int, ...]] = []

    def leaf(_m: nn.Module, _inp: Any, out: Any) -> Any:  # the one tensor autograd starts from
        if not isinstance(out, torch.Tensor):
            raise ExplainError(f"target layer {name} returns {type(out).__name__}, not a tensor")
        shape.append(tuple(out.shape))
        return out.detach().requires_grad_(True)

    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone()  # not an inference tensor, needs no gradient
        handle = module.register_forward_hook(leaf)  # before the CAM's own hooks, so they see the leaf
        cam = None
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            cam = cam_cls(model=model, target_layers=[module])
            heat = cam(input_tensor=x, targets=_targets(class_idx, x.shape[0]))
            logits = cam.outputs.detach()
        finally:
            handle.remove()
            if cam is not None:
                cam.activations_and_grads.release()
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)
    if shape and len(shape[0]) != 4:
        raise ExplainError(f"target layer {name} gives shape {shape[0]}, not a (B, C, h, w) map")
    return np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0), logits


def heatmaps(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: int | Sequence[int] | None = None,
    method: str = "gradcam",
) -> np.ndarray:
    """(B, H, W) heat-maps in [0, 1] at the input's resolution; 1 = where the class evidence is strongest."""
    return explain_batch(model, images, class_idx, method)[0]


class Explainer:
    """Heat-maps on a private BatchNorm-folded copy of `model`: the original is never hooked or touched,
    so another thread may keep using it; one explanation at a time (the lock)."""

    def __init__(
        self, model: nn.Module, method: str = DEFAULT_METHOD, fold: bool = True, img_size: int = 0
    ) -> None:
        _cam_class(method)
        self.method = method
        self.layer, _ = target_layer(model)
        work = copy.deepcopy(model).eval()
        self.folded = 0
        if fold and img_size > 0:
            from carspotter.models.fuse import fold_batchnorm

            example = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
            device = next(work.parameters()).device
            work, self.folded = fold_batchnorm(work, example.to(device))
        for p in work.parameters():
            p.requires_grad_(False)
        self.model = work
        self.lock = threading.Lock()

    def __call__(
        self, images: torch.Tensor, class_idx: int | Sequence[int] | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """(heat-maps (B, H, W), logits (B, C)) for a preprocessed batch."""
        with self.lock:
            return explain_batch(self.model, images, class_idx, self.method, self.layer)


# ---- from the network's input square back to the photo ---------------------------------------------------
def crop_region(
    photo_size: tuple[int, int], img_size: int, resize_size: int | None = None, crop_mode: str = "center"
) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of the photo region the network saw, in photo pixels (data.transforms.Preprocess:
    `resize_size` is the shorter side before the centre crop, its `resize_side`)."""
    w, h = photo_size
    if crop_mode == "squash":
        return 0.0, 0.0, float(w), float(h)
    if crop_mode != "center":
        raise ExplainError(f"crop_mode {crop_mode!r}: must be center or squash")
    resize = resize_size or round(img_size / 0.875)
    side = min(w, h) * img_size / resize  # the crop's side in photo pixels
    side_w, side_h = min(side, w), min(side, h)
    x1, y1 = (w - side_w) / 2, (h - side_h) / 2
    return x1, y1, x1 + side_w, y1 + side_h


def cam_to_photo(
    heat: np.ndarray,
    photo_size: tuple[int, int],
    resize_size: int | None = None,
    crop_mode: str = "center",
) -> np.ndarray:
    """A (H, W) input-square heat-map as a (photo_h, photo_w) map over the photo; 0 outside the crop."""
    import cv2

    w, h = photo_size
    x1, y1, x2, y2 = crop_region(photo_size, heat.shape[0], resize_size, crop_mode)
    out = np.zeros((h, w), np.float32)
    c1, r1, c2, r2 = round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)
    out[r1:r2, c1:c2] = cv2.resize(
        heat.astype(np.float32), (c2 - c1, r2 - r1), interpolation=cv2.INTER_LINEAR
    )
    return np.clip(out, 0.0, 1.0)


def mass_inside(heat: np.ndarray, box: Sequence[float]) -> float:
    """Share of the heat-map's total mass inside box (x1, y1, x2, y2) in its pixel coordinates (with
    fractional pixels at the edges); compare with `box_area_share` to see whether the map is on the box."""
    h, w = heat.shape
    total = float(heat.sum())
    if total <= 0:
        return 0.0
    x1, y1, x2, y2 = (float(v) for v in box)
    cols = np.clip(np.minimum(np.arange(w) + 1, x2) - np.maximum(np.arange(w), x1), 0, 1)
    rows = np.clip(np.minimum(np.arange(h) + 1, y2) - np.maximum(np.arange(h), y1), 0, 1)
    return float((heat * rows[:, None] * cols[None, :]).sum() / total)


def box_area_share(shape: tuple[int, int], box: Sequence[float]) -> float:
    """The box's share of an image of (h, w) pixels: the mass a uniform heat-map would put inside it."""
    return mass_inside(np.ones(shape, np.float32), box)


def heat_in_box(heat: np.ndarray, box: Sequence[float]) -> dict[str, float]:
    """How a (h, w) heat-map sits on box (x1, y1, x2, y2), in its pixel coordinates:

    - `inside`: the share of its mass inside the box (`mass_inside`); `area`: the box's share of the image, what
      a uniform map would put inside. inside / area is at most 1 / area (a large box caps it), so also
    - `density`: mass per unit area inside over mass per unit area outside (1 for a uniform map; inf when no
      mass lies outside; nan for a box that covers the image);
    - `hit`: 1.0 if the hottest pixel (its centre) lies in the box, the pointing game (a random pixel hits
      with probability `area`).
    """
    inside, area = mass_inside(heat, box), box_area_share(heat.shape, box)
    outside, rest = 1.0 - inside, 1.0 - area
    if rest <= 0:
        density = float("nan")
    else:
        density = (inside / area) / (outside / rest) if outside > 0 else float("inf")
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x1, y1, x2, y2 = (float(v) for v in box)
    hit = float(x1 <= c + 0.5 <= x2 and y1 <= r + 0.5 <= y2)
    return {"inside": inside, "area": area, "density": density, "hit": hit}


def overlay(photo: Any, heat: np.ndarray, alpha: float = 0.5) -> Any:
    """The photo (PIL RGB) with the photo-sized heat-map blended on in the 'jet' colour map (PIL RGB)."""
    from matplotlib import colormaps
    from PIL import Image

    if heat.shape != (photo.height, photo.width):
        raise ExplainError(f"heat-map {heat.shape} does not match the photo {photo.height}x{photo.width}")
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]  # (h, w, 3) in [0, 1]
    base = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    a = alpha * (0.25 + 0.75 * heat[..., None])  # cold regions stay readable
    mixed = (1 - a) * base + a * colour
    return Image.fromarray(np.clip(mixed * 255 + 0.5, 0, 255).astype(np.uint8))
