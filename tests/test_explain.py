"""Heat-maps: pytorch-grad-cam against a slow hand-written Grad-CAM, the target layer per architecture,
the model left untouched (same logits), the folded eval path giving the same maps, photo mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carspotter.config import ModelConfig
from carspotter.explain.cam import (
    Explainer,
    ExplainError,
    box_area_share,
    cam_to_photo,
    crop_region,
    explain_batch,
    heatmaps,
    mass_inside,
    target_layer,
)
from carspotter.models.factory import create_model


def scratch(n_classes: int = 5, size: int = 32, batchnorm: bool = True) -> nn.Module:
    cfg = ModelConfig(
        arch="scratch_cnn", channels=[8, 16], hidden_dim=16, batchnorm=batchnorm, pretrained=False
    )
    torch.manual_seed(0)
    m = create_model(cfg, n_classes, size)
    with torch.no_grad():  # non-trivial BN statistics, so folding them is a real change
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def reference_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM written out the slow, obvious way: one image at a time, activations A of the layer and
    dy_c/dA by autograd, weights = spatial mean of the gradient, ReLU(Σ_k w_k A_k), bilinear upsampling to
    the input size, then min-max scaling to [0, 1]."""
    out = []
    for i, c in enumerate(classes):
        store: dict[str, torch.Tensor] = {}

        def grab(_m: nn.Module, _i: object, o: torch.Tensor, store: dict = store) -> torch.Tensor:
            store["a"] = o.detach().clone().requires_grad_(True)
            return store["a"]

        h = layer.register_forward_hook(grab)
        try:
            y = model(x[i : i + 1])[0, c]
        finally:
            h.remove()
        (g,) = torch.autograd.grad(y, store["a"])
        a = store["a"].detach()[0]  # (K, h, w)
        w = g[0].mean(dim=(1, 2))  # (K,)
        cam = torch.relu((w[:, None, None] * a).sum(0))
        up = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
        up = up - up.min()
        out.append((up / (up.max() + 1e-7)).numpy())
    return np.stack(out)


def test_gradcam_matches_a_slow_reference() -> None:
    model = scratch()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, layer = target_layer(model)
    for classes in ([0, 3, 4], [2, 2, 2]):
        got = heatmaps(model, x, class_idx=classes)
        want = reference_gradcam(model, layer, x, classes)
        assert got.shape == (3, 32, 32) and got.dtype == np.float32
        assert got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, want, atol=2e-3)
    # None explains each image's own top-1 class
    with torch.no_grad():
        top1 = model(x).argmax(1).tolist()
    np.testing.assert_allclose(heatmaps(model, x), reference_gradcam(model, layer, x, top1), atol=2e-3)
    # and a different class gives a different map (the test can fail)
    assert np.abs(heatmaps(model, x, 0) - heatmaps(model, x, 1)).max() > 0.05


def test_gradcam_on_a_gap_linear_model_is_the_class_weighted_activation() -> None:
    """With global average pooling + linear, dy_c/dA_k = W[c, k]/(h·w): Grad-CAM = ReLU(Σ_k W[c, k] A_k)."""
    torch.manual_seed(0)
    feat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
    model = nn.Sequential(feat, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    got = explain_batch(model, x, class_idx=[1, 2], layer="0.2")[0]
    with torch.no_grad():
        a = feat(x)  # (2, 6, 8, 8)
    w = model[3].weight  # (3, 6)
    for i, c in enumerate([1, 2]):
        cam = torch.relu((w[c][:, None, None] * a[i]).sum(0))
        up = F.interpolate(cam[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        up = (up - up.min()) / (up.max() - up.min() + 1e-7)
        np.testing.assert_allclose(got[i], up.detach().numpy(), atol=2e-3)


def test_explaining_leaves_the_model_and_its_predictions_unchanged() -> None:
    model = scratch()
    model.classifier.weight.requires_grad_(False)  # a partly frozen model keeps its flags
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        before = model(x).clone()
    _, logits = explain_batch(model, x)
    with torch.inference_mode():
        after = model(x)
    assert torch.equal(before, after) and torch.allclose(logits, before, atol=1e-6)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())  # no backward into the weights


def test_folded_eval_path_gives_the_same_maps_and_logits() -> None:
    model = scratch()
    x = torch.randn(3, 3, 32, 32)
    ex = Explainer(model, method="gradcam", img_size=32)
    assert ex.folded == 2 and ex.layer == "backbone.blocks.1"
    heat, logits = ex(x)
    with torch.inference_mode():
        ref = model(x)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(heat, heatmaps(model, x), atol=1e-3)
    assert all(not m._forward_hooks for m in model.modules())  # the original was never hooked


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("tf_efficientnet_lite0", "backbone.bn2"),
        ("resnet50", "backbone.layer4"),
        ("densenet121", "backbone.features.norm5"),
    ],
)
def test_target_layer_per_timm_architecture(arch: str, layer: str) -> None:
    model = create_model(ModelConfig(arch=arch, pretrained=False), 3, 64).eval()
    assert target_layer(model)[0] == layer
    heat, logits = Explainer(model, img_size=64)(torch.randn(1, 3, 64, 64))
    assert heat.shape == (1, 64, 64) and logits.shape == (1, 3) and np.isfinite(heat).all()


def test_clear_errors() -> None:
    model = scratch()
    with pytest.raises(ExplainError, match="method"):
        heatmaps(model, torch.randn(1, 3, 32, 32), method="nope")
    with pytest.raises(ExplainError, match="class_idx has 1 entries for 2 images"):
        heatmaps(model, torch.randn(2, 3, 32, 32), class_idx=[0])
    with pytest.raises(ExplainError, match="batch"):
        heatmaps(model, torch.randn(3, 32, 32))


def test_cam_to_photo_follows_the_eval_crop() -> None:
    # centre crop of a 200×100 photo at img_size 56 (resize 64): the network saw the central 87.5 px square
    x1, y1, x2, y2 = crop_region((200, 100), 56)
    assert (x2 - x1, y2 - y1) == pytest.approx((87.5, 87.5)) and (x1 + x2) / 2 == pytest.approx(100)
    heat = np.ones((56, 56), np.float32)
    photo = cam_to_photo(heat, (200, 100))
    assert photo.shape == (100, 200)
    assert photo[:, :50].max() == 0 and photo[10:90, 60:140].min() > 0.99  # nothing outside what it saw
    assert cam_to_photo(heat, (200, 100), crop_mode="squash").min() > 0.99
    with pytest.raises(ExplainError):
        crop_region((10, 10), 8, crop_mode="zoom")


def test_mass_inside_box() -> None:
    heat = np.zeros((10, 20), np.float32)
    heat[2:4, 5:10] = 1.0
    assert mass_inside(heat, (5, 2, 10, 4)) == pytest.approx(1.0)
    assert mass_inside(heat, (5, 2, 7.5, 4)) == pytest.approx(0.5)
    assert box_area_share((10, 20), (0, 0, 10, 5)) == pytest.approx(0.25)
    assert mass_inside(np.zeros((4, 4)), (0, 0, 2, 2)) == 0.0
