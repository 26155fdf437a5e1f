"""The recipe levers of the strong presets: layer-wise lr decay, progressive resizing, mixup/cutmix, TTA files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ConfigError, ExperimentConfig, ModelConfig, apply_overrides
from carspotter.engine import train as train_mod
from carspotter.engine.optim import param_groups
from carspotter.engine.train import fit, progressive_size
from carspotter.models.factory import create_model
from conftest import TINY_OVERRIDES


def tiny_cfg(**overrides: object) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {**TINY_OVERRIDES, **overrides})


def test_layer_decay_gives_each_stage_its_lr_like_an_obvious_loop():
    cfg = tiny_cfg(**{"optim.lr": 0.01, "optim.layer_decay": 0.5, "model.backbone_lr_mult": 0.8})
    model = create_model(ModelConfig(arch="scratch_cnn", pretrained=False, channels=[4, 8, 8]), 5, 32)
    groups = param_groups(cfg, model)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    stages = model.backbone_stages()
    n = len(stages)
    expected = {}
    for i, params in enumerate(stages):  # the slow obvious version of the rule
        for p in params:
            expected[id(p)] = 0.01 * 0.8 * 0.5 ** (n - i)
    for p in model.head_parameters():
        expected[id(p)] = 0.01
    assert lr_of == pytest.approx(expected)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # without the setting: one backbone lr
    plain = {g["lr"] for g in param_groups(tiny_cfg(**{"optim.lr": 0.01}), model)}
    assert plain == {0.01}


def test_progressive_size_follows_the_schedule():
    cfg = tiny_cfg(**{"data.img_size": 64, "data.progressive": "{0: 32, 2: 48}"})
    assert [progressive_size(cfg, e) for e in range(4)] == [32, 32, 48, 48]
    assert progressive_size(tiny_cfg(**{"data.img_size": 64}), 3) == 64


def test_progressive_resizing_trains_at_each_size_and_evaluates_at_img_size(
    tiny_prepared, tmp_path, monkeypatch
):
    sizes: list[int] = []
    real = train_mod.train_one_epoch

    def spy(forward, loss_fn, optimizer, scheduler, loader, *args, **kwargs):
        x, _, _ = next(iter(loader))
        sizes.append(x.shape[-1])
        return real(forward, loss_fn, optimizer, scheduler, loader, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    size = int(TINY_OVERRIDES["img_size"])
    cfg = tiny_cfg(epochs=3, **{"data.progressive": f"{{0: {size // 2}, 2: {size - 8}}}"})
    fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    assert sizes == [size // 2, size // 2, size - 8]
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["preprocess"]["img_size"] == size  # the model is used at data.img_size


def test_mixup_and_cutmix_train_on_soft_targets(tiny_prepared, tmp_path, monkeypatch):
    seen = []
    real = train_mod.train_one_epoch

    def spy(forward, loss_fn, optimizer, scheduler, loader, epoch, ctx, **kwargs):
        x, y, _ = next(iter(loader))
        xm, target = ctx.mix(x.clone(), y)
        seen.append((x, y, xm, target))
        return real(forward, loss_fn, optimizer, scheduler, loader, epoch, ctx, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    cfg = tiny_cfg(
        epochs=1, **{"train.mixup_alpha": 0.4, "train.cutmix_alpha": 1.0, "train.label_smoothing": 0.1}
    )
    fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    x, y, xm, target = seen[0]
    assert target.shape == (len(y), 4) and torch.allclose(target.sum(1), torch.ones(len(y)))
    assert not torch.equal(x, xm)  # the photos were mixed
    # every soft target puts most of its mass on the photo's own label or its partner's (flipped batch)
    top2 = target.topk(2, dim=1).indices
    assert all(int(y[i]) in top2[i].tolist() for i in range(len(y)))


def test_lever_settings_are_validated():
    with pytest.raises(ConfigError, match="layer_decay"):
        tiny_cfg(**{"optim.layer_decay": 1.5}).validate()
    with pytest.raises(ConfigError, match="progressive"):
        tiny_cfg(**{"data.progressive": "{0: 4}"}).validate()
    with pytest.raises(ConfigError, match="mix"):
        tiny_cfg(**{"train.mixup_alpha": -1}).validate()


def test_evaluate_with_another_tta_keeps_the_runs_own_result(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(epochs=1), tiny_prepared, run, progress=False)
    cli = CliRunner()
    app = build_app()
    assert cli.invoke(app, ["evaluate", str(run), "--split", "test"]).exit_code == 0
    plain = json.loads((run / "metrics_test.json").read_text())
    r = cli.invoke(app, ["evaluate", str(run), "--split", "test", "--tta", "flip"])
    assert r.exit_code == 0, r.output
    flip = json.loads((run / "metrics_test_tta-flip.json").read_text())
    assert flip["tta"] == "flip" and json.loads((run / "metrics_test.json").read_text()) == plain


def test_mixing_a_frozen_backbone_mixes_photos_not_cached_features(tiny_prepared, tmp_path):
    # photo mixing is augmentation: the pooled features are no longer fixed, so they must not be cached
    cfg = tiny_cfg(epochs=1, **{"model.freeze": "backbone", "train.cutmix_alpha": 1.0})
    assert not train_mod.can_cache_features(cfg, train_mod.DistInfo())
    fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.safetensors").is_file()
