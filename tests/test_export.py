"""ONNX export: the file onnxruntime runs gives PyTorch's outputs, for any batch size, and carries its
preprocessing; existing files are never clobbered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ExperimentConfig, ModelConfig
from carspotter.engine.checkpoint import load_run, model_info, save_model_json, save_weights
from carspotter.export import export_onnx, ort_session, read_metadata
from carspotter.models.factory import create_model

CLASSES = ["Alpha GT 2012", "Beta Sedan 2009", "Gamma SUV 2011", "Delta Coupe 2010", "Epsilon Van 2007"]


def make_run(run_dir: Path, mcfg: ModelConfig, img_size: int) -> Path:
    cfg = ExperimentConfig()
    cfg.model = mcfg
    cfg.data.img_size = img_size
    torch.manual_seed(0)
    model = create_model(mcfg, len(CLASSES), img_size=img_size)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    run_dir.mkdir(parents=True)
    save_weights(model, run_dir / "best.safetensors")
    save_model_json(run_dir, model_info(model, cfg, CLASSES))
    return run_dir


RUNS = {
    "scratch": (ModelConfig(arch="scratch_cnn", pretrained=False, channels=[8, 16], batchnorm=True,
                            hidden_dim=32, embed_dim=16), 32),
    "timm": (ModelConfig(arch="test_efficientnet", pretrained=False), 48),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(RUNS))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict]:
    mcfg, size = RUNS[request.param]
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    run = make_run(root / "run", mcfg, size)
    report = export_onnx(run, root / "model.onnx")
    return run, root / "model.onnx", report


def test_onnxruntime_matches_pytorch_for_batch_1_and_3(exported: tuple[Path, Path, dict]) -> None:
    run, onnx_path, report = exported
    model, _ = load_run(run)
    size = model.preprocess.img_size
    sess = ort_session(onnx_path)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "embedding"]
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=gen)
        logits, emb = sess.run(["logits", "embedding"], {"input": x.numpy()})
        with torch.inference_mode():
            ref_logits, ref_emb = model(x).numpy(), model.embed(x).numpy()
        assert logits.shape == (batch, len(CLASSES))
        assert emb.shape == (batch, model.embed_dim)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(emb, ref_emb, atol=1e-4, rtol=0)
        assert np.abs(ref_logits).max() > 1e-3  # the comparison is not between two zero tensors
    assert report["batch_sizes"] == [1, 3]
    assert max(report["max_abs_diff"].values()) < 1e-4
    assert report["opset"] == 17


def test_metadata_carries_preprocessing_and_classes(exported: tuple[Path, Path, dict]) -> None:
    run, onnx_path, _ = exported
    model, info = load_run(run)
    meta = read_metadata(onnx_path)
    assert json.loads(meta["class_names"]) == CLASSES
    pre = json.loads(meta["preprocess"])
    assert pre["img_size"] == model.preprocess.img_size == int(meta["img_size"])
    assert pre["mean"] == pytest.approx(list(model.preprocess.mean))
    assert pre["std"] == pytest.approx(list(model.preprocess.std))
    assert pre["resize_size"] == round(model.preprocess.img_size / 0.875)
    assert int(meta["embed_dim"]) == model.embed_dim
    assert meta["arch"] == info.model["arch"]


def test_cli_refuses_overwrite_and_checks_on_images(tmp_path: Path, tiny_prepared: Path) -> None:
    run = make_run(tmp_path / "run", RUNS["scratch"][0], 32)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    runner = CliRunner()
    res = runner.invoke(build_app(), ["export", str(run), "--onnx", str(out)])
    assert res.exit_code == 2
    assert "already exists" in res.output
    assert out.read_bytes() == b"keep me"

    args = ["export", str(run), "--onnx", str(out), "--overwrite", "--img-size", "40",
            "--check-images", str(tiny_prepared), "--max-check-images", "5"]  # fmt: skip
    res = runner.invoke(build_app(), args)
    assert res.exit_code == 0, res.output
    assert "parity vs onnxruntime on 5 images" in res.output
    assert "logits" in res.output and "embedding" in res.output
    assert int(read_metadata(out)["img_size"]) == 40
    assert ort_session(out).get_inputs()[0].shape[1:] == [3, 40, 40]


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        build_app(), ["export", str(tmp_path / "nope"), "--onnx", str(tmp_path / "m.onnx")]
    )
    assert res.exit_code == 2
    assert "not a carspotter run directory" in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_bad_check_images_fail_before_writing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", RUNS["scratch"][0], 32)
    out = tmp_path / "m.onnx"
    args = ["export", str(run), "--onnx", str(out), "--check-images", str(tmp_path / "missing.jpg")]
    res = CliRunner().invoke(build_app(), args)
    assert res.exit_code == 2
    assert "missing.jpg" in res.output
    assert not out.exists()
