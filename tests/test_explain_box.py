"""Where the car is (explain/box.py) and the second look (explain/zoom.py): maths against slow references,
the CAM against pytorch_grad_cam, the box mapped through the real eval transform, and a trained tiny model
whose box must find the object better than the whole photo does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carspotter.config import ModelConfig
from carspotter.data.manifest import Record, write_manifest
from carspotter.data.transforms import Preprocess
from carspotter.explain.box import (
    WHOLE,
    BoxSettings,
    activation_maps,
    box_from_map,
    corloc,
    iou,
    normalise_maps,
    to_photo,
    view_window,
)
from carspotter.explain.zoom import Looker, ZoomSettings, localisation, predict_with_box, zoom_crop, zoom_rect
from carspotter.models.factory import create_model
from carspotter.models.loading import load_run
from conftest import TINY_OVERRIDES, make_tiny_run


# ---------------------------------------------------------------- box maths
def _slow_largest_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """4-connected components by breadth-first search; the largest one's (c1, r1, c2, r2), inclusive."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not seen[r, c]:
                comp, q = [], deque([(r, c)])
                seen[r, c] = True
                while q:
                    y, x = q.popleft()
                    comp.append((y, x))
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            q.append((ny, nx))
                if len(comp) > len(best):
                    best = comp
    if not best:
        return None
    ys, xs = [p[0] for p in best], [p[1] for p in best]
    return min(xs), min(ys), max(xs), max(ys)


def test_box_from_map_matches_a_slow_connected_components_loop() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(4, 20, size=2)
        cam = rng.random((h, w)).astype(np.float32) ** 3  # sparse bright spots: several regions
        t = float(rng.uniform(0.3, 0.8))
        ref = _slow_largest_box(cam >= t)
        got = box_from_map(cam, t, 0.0)
        if ref is None:
            assert got == WHOLE
            continue
        c1, r1, c2, r2 = ref
        # ties between equally large regions may pick either; then only the size must agree
        exp = (c1 / w, r1 / h, (c2 + 1) / w, (r2 + 1) / h)
        mask = cam >= t
        from scipy import ndimage

        sizes = np.bincount(ndimage.label(mask)[0].ravel())[1:]
        if (sizes == sizes.max()).sum() == 1:
            assert np.allclose(got, exp), (trial, got, exp)


def test_box_margin_threshold_and_flat_map() -> None:
    cam = np.zeros((10, 10), np.float32)
    cam[2:5, 4:8] = 1.0  # rows 2..4, cols 4..7
    cam[8, 0] = 1.0  # a smaller region elsewhere
    assert np.allclose(box_from_map(cam, 0.5, 0.0), (0.4, 0.2, 0.8, 0.5))
    assert np.allclose(box_from_map(cam, 0.5, 0.25), (0.3, 0.125, 0.9, 0.575))  # 0.25 of 0.4 / 0.3 each side
    assert box_from_map(np.zeros((5, 5)), 0.5, 0.1) == WHOLE
    with pytest.raises(ValueError, match="threshold"):
        BoxSettings(threshold=1.5)


def test_iou_and_corloc() -> None:
    a = (0.0, 0.0, 0.5, 0.5)
    assert iou(a, a) == pytest.approx(1.0)
    assert iou(a, (0.5, 0.5, 1.0, 1.0)) == pytest.approx(0.0)
    assert iou(a, (0.25, 0.0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert iou(a, WHOLE) == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    x = np.sort(rng.random((50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    y = np.sort(rng.random((50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    assert np.allclose(iou(x, y), iou(y, x))
    assert corloc(np.array([0.2, 0.5, 0.7, 0.49])) == 0.5


@pytest.mark.parametrize(
    "crop_mode,size", [("center", (200, 100)), ("center", (90, 160)), ("squash", (200, 100))]
)
def test_view_window_matches_the_real_eval_transform(crop_mode: str, size: tuple[int, int]) -> None:
    """Encode x and y in the photo's colours, run the model's eval transform, read back what it kept."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    arr = np.stack([(xs + 0.5) / w * 255, (ys + 0.5) / h * 255, np.zeros_like(xs)], -1).astype(np.uint8)
    pre = Preprocess(32, (0, 0, 0), (1, 1, 1), crop_mode=crop_mode)
    x = pre.transform()(Image.fromarray(arr))  # (3, 32, 32) in [0, 1]
    win = view_window(w, h, 32, pre.resize_side, crop_mode)
    seen = (
        float(x[0, :, 0].mean()),
        float(x[1, 0, :].mean()),
        float(x[0, :, -1].mean()),
        float(x[1, -1, :].mean()),
    )
    px = 1.0 / min(w, h) * 2  # a pixel or two of the photo, after resampling
    assert abs(seen[0] - win[0]) < 2 * px and abs(seen[2] - win[2]) < 2 * px
    assert abs(seen[1] - win[1]) < 2 * px and abs(seen[3] - win[3]) < 2 * px
    assert to_photo((0.0, 0.0, 1.0, 1.0), win) == win


# ---------------------------------------------------------------- the maps, against pytorch_grad_cam
def _gradcam_lib(
    model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, classes: list[int]
) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(
            input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes]
        )  # (B, H, W) in [0, 1]


def test_plain_cam_is_exact_and_agrees_with_pytorch_grad_cam() -> None:
    """EfficientNet-Lite0 (GAP + linear): our map is the plain CAM, from the same forward; Grad-CAM of the
    last feature layer equals ReLU(CAM) up to scale, so after normalising both they must agree."""
    torch.manual_seed(0)
    for embed in (None, 24):
        model = create_model(
            ModelConfig(arch="tf_efficientnet_lite0", pretrained=False, embed_dim=embed), 5, 64
        )
        model.eval()
        x = torch.randn(2, 3, 96, 96)
        act = activation_maps(model, x)
        assert act.method == "cam"
        assert torch.allclose(act.logits, model(x), atol=1e-5)
        fm = model.backbone.forward_features(x)
        w = model.classifier.weight if embed is None else model.classifier.weight @ model.embedding.weight
        manual = torch.einsum("bchw,bc->bhw", fm, w[act.classes])
        assert torch.allclose(act.maps, manual, atol=1e-4)
        ours = normalise_maps(torch.relu(act.maps), 96).numpy()
        lib = _gradcam_lib(model, model.backbone.bn2, x, act.classes.tolist())
        assert np.abs(ours - lib).max() < 0.02, np.abs(ours - lib).max()


def test_grad_cam_of_the_scratch_head_agrees_with_pytorch_grad_cam(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="scratch_cnn", channels=[8, 16, 16], hidden_dim=16), 4, 32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():  # as the server calls it: Grad-CAM must still work
        act = activation_maps(model, x)
    assert act.method == "grad-cam" and torch.allclose(act.logits, model(x), atol=1e-5)
    ours = normalise_maps(act.maps, 32).numpy()
    lib = _gradcam_lib(model, model.backbone.blocks[-1], x, act.classes.tolist())
    assert np.abs(ours - lib).max() < 0.02


# ---------------------------------------------------------------- the second look
def test_zoom_rect_stays_in_the_photo_and_holds_the_box() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(20, 300, size=2))
        a, b = np.sort(rng.random(2)), np.sort(rng.random(2))
        box = (a[0], b[0], a[1], b[1])
        x0, t, r, btm = zoom_rect(w, h, box)
        assert 0 <= x0 < r <= w and 0 <= t < btm <= h
        # the box is inside the crop (to a pixel), and the crop is no less square than the box allows
        assert x0 <= box[0] * w + 1 and r >= box[2] * w - 1 and t <= box[1] * h + 1 and btm >= box[3] * h - 1
        bw, bh = (box[2] - box[0]) * w, (box[3] - box[1]) * h
        assert (r - x0) >= min(w, max(bw, bh)) - 1 and (btm - t) >= min(h, max(bw, bh)) - 1
    img = Image.new("RGB", (100, 50))
    assert zoom_crop(img, (0.1, 0.2, 0.3, 0.6)).size == (20, 20)


def test_looker_combines_the_two_looks(tmp_path: Path) -> None:
    run = make_tiny_run(tmp_path / "run")
    model, info = load_run(run)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40 + 5 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    one = Looker(model, info)(imgs)
    assert one.second is None and one.boxes.shape == (3, 4)
    assert np.all(one.boxes[:, 0] < one.boxes[:, 2]) and np.all((one.boxes >= 0) & (one.boxes <= 1))
    mean = Looker(model, info, zoom=ZoomSettings("mean"))(imgs)
    assert torch.allclose(mean.first, one.first, atol=1e-6)
    assert torch.allclose(mean.logits, (mean.first + mean.second) / 2, atol=1e-6)
    # the second look is the model on the crops, nothing else
    crops = [zoom_crop(im, tuple(b), ZoomSettings().margin) for im, b in zip(imgs, mean.boxes, strict=True)]
    with torch.no_grad():
        direct = model(torch.stack([model.preprocess.transform()(c) for c in crops]))
    assert torch.allclose(mean.second, direct, atol=1e-5)
    zoom = Looker(model, info, zoom=ZoomSettings("zoom"))(imgs)
    assert torch.allclose(zoom.logits, direct, atol=1e-5)
    gate = Looker(model, info, zoom=ZoomSettings("gate", gate_area=1e-6))(imgs)  # every box is larger
    assert not gate.zoomed.any() and torch.equal(gate.logits, gate.first)
    with pytest.raises(ValueError, match="combine"):
        ZoomSettings("max")


# ---------------------------------------------------------------- a trained model finds the object
def _patch_dataset(root: Path, n_per_class: int = 30, size: int = 32, seed: int = 0) -> Path:
    """Classes are the colour of a 10-px square at a random place on a noisy grey photo; its box is recorded."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 40), (40, 60, 230), (230, 210, 30)]
    (root / "images").mkdir(parents=True)
    recs = []
    for c, col in enumerate(colours):
        for i in range(n_per_class):
            arr = rng.normal(120, 25, (size, size, 3))
            x, y = (int(v) for v in rng.integers(0, size - 10, size=2))
            arr[y : y + 10, x : x + 10] = col
            rel = f"images/c{c}_{i:03d}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / rel)
            split = "train" if i < n_per_class * 2 // 3 else ("val" if i < n_per_class * 5 // 6 else "test")
            recs.append(Record(rel, c, f"Colour {c}", split, (x, y, x + 10, y + 10)))
    write_manifest(root, recs)
    return root


def test_trained_cam_box_finds_the_object(tmp_path: Path) -> None:
    from carspotter.config import ExperimentConfig, apply_overrides
    from carspotter.engine.train import fit

    data = _patch_dataset(tmp_path / "data")
    over = {**TINY_OVERRIDES, "epochs": 6, "model.channels": [16, 32], "crop_mode": "squash", "lr": 3e-3}
    cfg = apply_overrides(ExperimentConfig(), over)
    cfg.data.aug.random_crop = False
    fit(cfg, data, tmp_path / "run", progress=False)
    loc = localisation(tmp_path / "run", data, "test", BoxSettings(0.5, 0.0))
    boxes_ok = loc["ious"] >= 0
    assert boxes_ok.all() and loc["n_images"] == 20
    # the object covers 10 % of the photo: the whole-photo box has IoU 0.1; a box that found it does better
    assert loc["whole"]["mean_iou"] == pytest.approx(0.0977, abs=1e-3)
    assert loc["cam"]["mean_iou"] > 2 * loc["whole"]["mean_iou"], loc
    # broken on purpose: the same network untrained has no idea where the patch is
    untrained = tmp_path / "untrained"
    make_tiny_run(untrained, n_classes=4, crop_mode="squash")
    assert load_run(untrained)[0].preprocess.crop_mode == "squash"
    base = localisation(untrained, data, "test", BoxSettings(0.5, 0.0))
    assert loc["cam"]["mean_iou"] > base["cam"]["mean_iou"] + 0.05, (loc["cam"], base["cam"])


# ---------------------------------------------------------------- the command line
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carspotter", *args], capture_output=True, text=True, timeout=300
    )


def test_predict_json_and_evaluate_zoom(tmp_path: Path, tiny_prepared: Path) -> None:
    run = make_tiny_run(tmp_path / "run")
    (run / "config.yaml").write_text(f"data:\n  root: {tiny_prepared}\n  img_size: 32\n")
    photo = str(tiny_prepared / "images" / "c1_000.jpg")
    res = _cli("predict", str(run), photo, "--json", "--k", "2", "--zoom", "--zoom-combine", "mean")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out) == 1 and len(out[0]["predictions"]) == 2 and out[0]["zoomed"] is True
    x1, y1, x2, y2 = out[0]["box"]
    assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    # the library call without zoom gives the same classes as the plain predict path
    from carspotter.engine.evaluate import predict_images

    plain = predict_images(run, [photo], k=3)[0]["top"]
    boxed = predict_with_box(run, [photo], k=3)[0]["top"]
    assert [t["label"] for t in plain] == [t["label"] for t in boxed]
    assert np.allclose([t["prob"] for t in plain], [t["prob"] for t in boxed], atol=1e-5)

    (run / "metrics_test.json").write_text('{"accuracy": 0.123}')
    res = _cli("evaluate", str(run), "--zoom", "--device", "cpu", "--zoom-combine", "mean")
    assert res.returncode == 0, res.stderr
    m = json.loads((run / "metrics_zoom_test.json").read_text())
    assert json.loads((run / "metrics_test.json").read_text()) == {"accuracy": 0.123}  # one-look result kept
    assert m["n_images"] == 8 and m["zoom"]["combine"] == "mean" and m["share_zoomed"] == 1.0
    assert m["accuracy"] == m["accuracy_zoom"] and -1 <= m["gain"] <= 1 and m["time_ratio"] > 1
    # the one-look figures are evaluate's own (same transform, same weights)
    assert _cli("evaluate", str(run), "--device", "cpu").returncode == 0
    assert json.loads((run / "metrics_test.json").read_text())["accuracy"] == pytest.approx(
        m["accuracy_one_look"]
    )
    header = (run / "predictions_zoom_test.csv").read_text().splitlines()[0]
    assert header.endswith("box_x1,box_y1,box_x2,box_y2")
    bad = _cli("evaluate", str(run), "--zoom", "--zoom-combine", "max")
    assert bad.returncode != 0 and "combine" in bad.stderr and "Traceback" not in bad.stderr
