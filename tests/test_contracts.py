"""The on-disk contracts (carspotter.rundir), the one Preprocess, and config validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from carspotter import rundir
from carspotter.config import ConfigError, ExperimentConfig, apply_overrides, load_config
from carspotter.data.transforms import Preprocess

SRC = Path(__file__).resolve().parents[1] / "src" / "carspotter"


def _photo(w: int = 61, h: int = 47) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_one_place_builds_an_eval_transform() -> None:
    """grep: CenterCrop / Normalize / Resize appear in data/transforms.py only."""
    pattern = re.compile(r"\b(CenterCrop|Normalize|Resize)\(")
    hits = [p for p in SRC.rglob("*.py") if pattern.search(p.read_text())]
    assert [p.relative_to(SRC).as_posix() for p in hits] == ["data/transforms.py"]


def test_transform_applies_the_recorded_interpolation() -> None:
    """Against torchvision's functional resize with the named mode (the slow obvious reference)."""
    im = _photo()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    got = {}
    for name, mode in (("bilinear", T.InterpolationMode.BILINEAR), ("bicubic", T.InterpolationMode.BICUBIC)):
        pre = Preprocess(32, mean, std, interpolation=name)
        got[name] = pre.transform()(im)
        x = T.functional.pil_to_tensor(im)
        x = T.functional.resize(x, pre.resize_side, interpolation=mode, antialias=True)
        x = T.functional.center_crop(x, 32).float() / 255
        ref = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(got[name], ref)
    assert (got["bilinear"] - got["bicubic"]).abs().max() > 1e-3


def test_preprocess_round_trips_and_rejects_bad_values() -> None:
    pre = Preprocess(40, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 50, 0.875, "squash")
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocess(224, (0, 0, 0), (1, 1, 1)).resize_side == 256  # round(224 / 0.875)
    with pytest.raises(ValueError, match="crop_mode"):
        Preprocess(32, (0, 0, 0), (1, 1, 1), crop_mode="stretch")
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(32, (0, 0, 0), (1, 1, 1), interpolation="lanczos7")


def test_a_model_json_from_before_the_contract_loads_as_it_ran(tmp_path: Path) -> None:
    """Old files kept resize_size/crop_mode outside preprocess and recorded an interpolation never applied."""
    old = {
        "model": {"arch": "scratch_cnn"},
        "num_classes": 2,
        "class_names": ["a", "b"],
        "preprocess": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
        "resize_size": 40,
        "crop_mode": "squash",
        "source": "",
    }
    (tmp_path / rundir.MODEL_JSON).write_text(json.dumps(old))
    info = rundir.read_model_info(tmp_path)
    pre = Preprocess.from_dict(info.preprocess)
    assert (pre.interpolation, pre.resize_size, pre.crop_mode) == ("bilinear", 40, "squash")
    assert (info.resize_size, info.crop_mode) == (40, "squash")
    rundir.write_model_json(tmp_path, info)  # rewritten: one complete preprocess, same meaning
    again = json.loads((tmp_path / rundir.MODEL_JSON).read_text())
    assert again["preprocess"]["crop_mode"] == "squash" and "crop_mode" not in again
    assert Preprocess.from_dict(rundir.read_model_info(tmp_path).preprocess) == pre
    (tmp_path / rundir.MODEL_JSON).write_text(json.dumps({"model": {}}))
    with pytest.raises(rundir.RunError, match=r"model\.json: malformed"):
        rundir.read_model_info(tmp_path)


def test_an_old_index_json_reads_with_a_complete_preprocess(tmp_path: Path) -> None:
    old = {"preprocess": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
           "resize_size": None, "crop_mode": "center", "metric": "cosine"}  # fmt: skip
    (tmp_path / rundir.INDEX_JSON).write_text(json.dumps(old))
    info = rundir.read_index_json(tmp_path)
    assert info["preprocess"]["interpolation"] == "bilinear" and info["preprocess"]["crop_mode"] == "center"
    assert "crop_mode" not in info


def test_result_names_never_collide() -> None:
    names = [
        rundir.metrics_name("test"),
        rundir.metrics_name("val"),
        rundir.metrics_name("test", rundir.data_tag("/x/other", "/x/own")),
        rundir.knn_metrics_name("test", 7, "cosine"),
        rundir.knn_metrics_name("val", 7, "cosine"),
        rundir.knn_metrics_name("test", 7, "euclidean"),
        rundir.knn_metrics_name("test", 7, "cosine", "distance"),
        rundir.knn_metrics_name("test", 7, "cosine", gallery_split="train+val"),
        rundir.knn_metrics_name("test", 3, "cosine"),
        rundir.knn_metrics_name("test", 7, "cosine", data="@other"),
    ]
    assert len(set(names)) == len(names)
    assert names[0] == "metrics_test.json" and names[3] == "metrics_test_knn7_cosine.json"
    assert names[2] == "metrics_test@other.json"
    assert rundir.data_tag("/x/own", "/x/own") == ""


def test_report_finds_new_and_old_result_names(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    for d, files in ((old, ("metrics.json", "predictions.csv", "metrics_knn3_euclidean.json")),
                     (new, ("metrics_test.json", "predictions_test.csv", "metrics_test_knn3_euclidean.json",
                            "metrics_val_knn3_euclidean.json", "metrics_test_knn3_euclidean@other.json"))):  # fmt: skip
        for f in files:
            (d / f).write_text("{}")
    assert rundir.find_test_metrics(old).name == "metrics.json"
    assert rundir.find_test_metrics(new).name == "metrics_test.json"
    assert rundir.find_predictions(new).name == "predictions_test.csv"
    assert [p.name for p in rundir.knn_result_files(new)] == ["metrics_test_knn3_euclidean.json"]
    assert [p.name for p in rundir.knn_result_files(old)] == ["metrics_knn3_euclidean.json"]


def test_eval_result_is_returned_then_saved(tmp_path: Path) -> None:
    r = rundir.EvalResult(
        {"accuracy": 0.5}, tmp_path, {"metrics_test.json": None, "predictions_test.csv": "a\n"}
    )
    assert r["accuracy"] == 0.5 and not list(tmp_path.iterdir())
    r.save()
    assert json.loads((tmp_path / "metrics_test.json").read_text()) == {"accuracy": 0.5}
    assert (tmp_path / "predictions_test.csv").read_text() == "a\n"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"task": "detect"}, "task"),
        ({"data.crop_mode": "stretch"}, "data.crop_mode"),
        ({"optim.name": "lion"}, "optim.name"),
        ({"schedule.name": "poly"}, "schedule.name"),
        ({"train.loss": "triplet"}, "train.loss"),
        ({"train.select_metric": "recall_at_1"}, "train.select_metric"),
        ({"retrieval.metric": "manhattan"}, "retrieval.metric"),
        ({"retrieval.weighting": "softmax"}, "retrieval.weighting"),
        ({"train.device": "gpu0"}, "train.device"),
        ({"train.loss": "proxy_anchor"}, "train.loss"),  # only with task: metric
        ({"task": "metric"}, "train.loss"),  # metric learning needs a metric loss
    ],
)
def test_choice_fields_are_validated_naming_field_and_choices(over: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        apply_overrides(ExperimentConfig(), over)


def test_old_config_with_removed_fields_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("task: metric\ntrain:\n  loss: arcface\nretrieval:\n  embed_source: features\n  nprobe: 8\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(p)
    assert cfg.retrieval.metric == "euclidean" and "embed_source" in caplog.text
    assert cfg.train.select_metric == "auto"


def test_loss_hyperparameters_come_from_the_config() -> None:
    from carspotter.retrieval.losses import build_metric_loss, loss_hyperparameters

    cfg = apply_overrides(ExperimentConfig(), {"task": "metric", "train.loss": "proxy_anchor"})
    assert loss_hyperparameters(cfg) == {"margin": 0.1, "alpha": 32.0}
    cfg = apply_overrides(cfg, {"train.margin": 0.2})
    assert build_metric_loss(cfg, 4, 8).margin == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scale"):
        loss_hyperparameters(apply_overrides(cfg, {"train.scale": 3}))


def test_loading_a_downloaded_backbone_index_never_downloads(tmp_path: Path) -> None:
    from carspotter.retrieval.index import GalleryIndex, GalleryIndexError
    from carspotter.retrieval.query import embedder_for_index

    x = np.eye(3, dtype=np.float32)
    meta = [{"path": f"{i}.jpg", "label": i, "class_name": str(i), "split": "test"} for i in range(3)]
    info = {
        "backbone": "resnet18",
        "weights": None,
        "preprocess": Preprocess(32, (0, 0, 0), (1, 1, 1)).to_dict(),
    }
    GalleryIndex.build(x, meta, info=info).save(tmp_path / "ix")
    with pytest.raises(GalleryIndexError, match="never downloads"):
        embedder_for_index(GalleryIndex.load(tmp_path / "ix"))


def test_evaluate_knn_takes_k_and_metric_from_the_runs_preset(tmp_path: Path, tiny_prepared: Path) -> None:
    """`evaluate RUN --knn` on a seed-r3 run: k=7, cosine, with no flags; --k overrides and adds a file."""
    from typer.testing import CliRunner

    from carspotter.cli import build_app, legacy_argv
    from carspotter.config import dump_config
    from carspotter.presets import load_preset
    from conftest import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    cfg = load_preset("seed-r3-densenet121-knn7-cosine")
    cfg.data.root = str(tiny_prepared)
    dump_config(cfg, run / rundir.CONFIG)
    res = CliRunner().invoke(build_app(), ["evaluate", str(run), "--knn", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    name = rundir.knn_metrics_name("test", 7, "cosine", cfg.retrieval.weighting, cfg.retrieval.gallery_split)
    m = json.loads((run / name).read_text())
    assert (m["k"], m["metric"], m["gallery_split"]) == (7, "cosine", cfg.retrieval.gallery_split)
    assert legacy_argv(["evaluate", "R", "--knn", "3"]) == ["evaluate", "R", "--knn", "--k", "3"]


def test_evaluate_predict_and_serve_take_one_set_of_second_look_options() -> None:
    """One declaration (cli.common) for the box/zoom flags: same names, same help, same settings built."""
    import typer.main

    from carspotter.cli import build_app
    from carspotter.cli.common import box_settings, zoom_settings
    from carspotter.explain.box import BoxSettings
    from carspotter.explain.zoom import ZoomSettings

    group = typer.main.get_command(build_app())
    names = ("zoom", "zoom_combine", "zoom_margin", "box_threshold", "box_margin")
    seen = {}
    for cmd in ("evaluate", "predict", "serve"):
        params = {p.name: p for p in group.commands[cmd].params}  # type: ignore[attr-defined]
        seen[cmd] = [(tuple(params[n].opts), params[n].help) for n in names]
    assert seen["evaluate"] == seen["predict"] == seen["serve"]
    assert zoom_settings(False, "mean", 0.3) is None
    assert zoom_settings(True, "mean", None) == ZoomSettings("mean")
    assert zoom_settings(True, "zoom", 0.3) == ZoomSettings("zoom", margin=0.3)
    assert box_settings(None, 0.2) == BoxSettings(margin=0.2)
    with pytest.raises(ValueError, match="zoom combine"):
        zoom_settings(True, "max", None)
    with pytest.raises(ValueError, match="box threshold"):
        box_settings(1.5, None)
