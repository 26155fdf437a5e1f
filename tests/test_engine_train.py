"""The training engine on tiny generated data: exact resume, metrics, unfreezing, safety of the run dir."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.engine import checkpoint as ck
from carspotter.engine import train as train_mod
from carspotter.engine.evaluate import classification_metrics, evaluate_run, predict_images
from carspotter.engine.train import fit
from carspotter.utils import OutputExistsError
from conftest import TINY_OVERRIDES

TINY = {**TINY_OVERRIDES, "epochs": 4}
# Every source of randomness the engine has to replay on resume.
RANDOM = {
    "model.dropout": 0.3,
    "data.aug.random_crop": True,
    "data.aug.hflip": True,
    "data.aug.color_jitter": 0.2,
    "optim.grad_accum": 2,
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.nesterov": True,
    "schedule.name": "cosine",
    "schedule.warmup_epochs": 1,
    "train.ema_decay": 0.9,
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny_cfg(**overrides: object) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {**TINY, **overrides})


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / ck.LAST, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Crash(Exception):
    pass


def crash_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make the real train_one_epoch raise when it reaches `epoch` (0-based): a crash mid-run."""
    real = train_mod.train_one_epoch

    def wrapped(*args, **kwargs):
        if args[5] == epoch:
            raise Crash(f"simulated crash at epoch {epoch}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", wrapped)


def test_crash_then_resume_gives_identical_weights(tiny_prepared, tmp_path, monkeypatch):
    cfg = tiny_cfg(**RANDOM)
    full = fit(cfg, tiny_prepared, tmp_path / "full", progress=False)

    crash_at_epoch(monkeypatch, 2)
    with pytest.raises(Crash):
        fit(cfg, tiny_prepared, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / ck.LAST, weights_only=True)["epoch"] == 2
    resumed = fit(cfg, tiny_prepared, tmp_path / "resumed", resume=True, progress=False)

    assert_same_weights(model_state(tmp_path / "full"), model_state(tmp_path / "resumed"))
    assert resumed["weights_sha256"] == full["weights_sha256"]
    ema_a = torch.load(tmp_path / "full" / ck.LAST, weights_only=True)["ema"]
    ema_b = torch.load(tmp_path / "resumed" / ck.LAST, weights_only=True)["ema"]
    assert_same_weights(ema_a, ema_b)
    rows = read_csv(tmp_path / "resumed" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[-1]["val_loss"] == read_csv(tmp_path / "full" / "metrics.csv")[-1]["val_loss"]


def test_stop_after_two_then_resume_to_four(tiny_prepared, tmp_path):
    cfg = tiny_cfg(**{**RANDOM, "schedule.name": "step", "schedule.step_size": 1, "schedule.gamma": 0.5})
    fit(cfg, tiny_prepared, tmp_path / "a", progress=False)
    fit(apply_overrides(cfg, {"epochs": 2}), tiny_prepared, tmp_path / "b", progress=False)
    fit(cfg, tiny_prepared, tmp_path / "b", resume=True, progress=False)
    assert_same_weights(model_state(tmp_path / "a"), model_state(tmp_path / "b"))


def test_worker_processes_do_not_change_the_result(tiny_prepared, tmp_path):
    """Augmentation is seeded per (seed, epoch, item): persistent workers give the same run as none."""
    cfg = tiny_cfg(**RANDOM, epochs=2)
    a = fit(cfg, tiny_prepared, tmp_path / "w0", progress=False)
    b = fit(apply_overrides(cfg, {"num_workers": 2}), tiny_prepared, tmp_path / "w2", progress=False)
    assert a["weights_sha256"] == b["weights_sha256"]
    c = fit(apply_overrides(cfg, {"seed": 1}), tiny_prepared, tmp_path / "s1", progress=False)
    assert c["weights_sha256"] != a["weights_sha256"]


def test_run_dir_contents_and_metrics_match_sklearn(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    summary = fit(tiny_cfg(epochs=3), tiny_prepared, run, progress=False)
    for name in ("config.yaml", "model.json", "best.safetensors", "last.pt", "metrics.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rows = read_csv(run / "metrics.csv")
    assert list(rows[0]) == train_mod.CLS_COLUMNS and len(rows) == 3
    assert summary["best_epoch"] == 1 + int(np.argmax([float(r["val_accuracy"]) for r in rows]))
    assert ck.read_run_config(run).data.root == str(tiny_prepared.resolve())

    m = evaluate_run(run, split="test", device="cpu")
    assert not (run / "metrics_test.json").exists()  # the library returns results; the caller writes them
    m.save()
    preds = read_csv(run / "predictions_test.csv")
    assert len(preds) == m["n_images"] == 8
    y = np.array([int(r["label"]) for r in preds])
    p = np.array([int(r["pred"]) for r in preds])
    present = np.unique(y)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, labels=present, average="macro", zero_division=0))
    assert m["precision_macro"] == pytest.approx(
        precision_score(y, p, labels=present, average="macro", zero_division=0)
    )
    assert m["recall_macro"] == pytest.approx(
        recall_score(y, p, labels=present, average="macro", zero_division=0)
    )
    assert m["predict_time_s"] > 0 and m["images_per_s"] > 0
    assert json.loads((run / "metrics_test.json").read_text())["accuracy"] == m["accuracy"]
    val = evaluate_run(run, split="val", device="cpu")
    val.save()  # another split: its own files, the test result untouched
    assert json.loads((run / "metrics_test.json").read_text())["accuracy"] == m["accuracy"]
    assert (run / "metrics_val.json").is_file() and (run / "predictions_val.csv").is_file()

    # Another path through the weights: predict_images on each test file, compared with predictions.csv.
    res = predict_images(run, [tiny_prepared / r["path"] for r in preds], k=3)
    for r, pr in zip(preds, res, strict=True):
        assert pr["top"][0]["label"] == int(r["pred"])
        assert pr["top"][0]["prob"] == pytest.approx(float(r["confidence"]), abs=1e-5)
        probs = [float(v) for v in r["top5_probs"].split(";")]
        assert probs == sorted(probs, reverse=True)


def test_classification_metrics_top5_and_absent_classes():
    rng = np.random.default_rng(0)
    probs = rng.random((40, 10))
    y = rng.integers(0, 7, 40)  # classes 7..9 never occur
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, probs, loss=1.5)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert m["top5_accuracy"] == pytest.approx(np.mean([y[i] in top5[i] for i in range(40)]))
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    assert m["recall_macro"] == pytest.approx(np.mean(recalls))
    assert m["loss"] == 1.5


def test_progressive_unfreezing_follows_the_schedule(tiny_prepared, tmp_path, monkeypatch):
    seen: list[tuple[list[bool], dict[str, torch.Tensor]]] = []
    real = train_mod.train_one_epoch

    def spy(forward, *args, **kwargs):
        model = forward
        blocks = [p.requires_grad for p in model.backbone.blocks.parameters()]
        fc = [p.requires_grad for p in model.backbone.fc.parameters()]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real(forward, *args, **kwargs)
        seen.append(([all(blocks), any(blocks), all(fc), any(fc)], before))
        return out

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    # scratch_cnn backbone stages: [conv blocks, fc]; head only → + fc → everything
    cfg = tiny_cfg(epochs=4, **{"model.freeze": "backbone", "model.unfreeze_schedule": "{1: 1, 3: -1}"})
    fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    flags = [s[0] for s in seen]
    assert flags == [
        [False, False, False, False],  # epoch 0: model.freeze=backbone
        [False, False, True, True],  # epoch 1: last stage
        [False, False, True, True],
        [True, True, True, True],  # epoch 3: all
    ]
    final = model_state(tmp_path / "run")
    states = [s[1] for s in seen] + [final]
    conv = "backbone.blocks.0.0.weight"
    fc = "backbone.fc.1.weight"
    assert torch.equal(states[0][conv], states[3][conv]) and not torch.equal(states[3][conv], states[4][conv])
    assert torch.equal(states[0][fc], states[1][fc]) and not torch.equal(states[1][fc], states[2][fc])


def test_frozen_feature_cache_matches_the_full_forward(tiny_prepared, tmp_path, monkeypatch):
    cfg = tiny_cfg(epochs=3, **{"model.freeze": "backbone", "model.dropout": 0.2})
    assert train_mod.can_cache_features(cfg, train_mod.DistInfo())
    fast = fit(cfg, tiny_prepared, tmp_path / "fast", progress=False)
    monkeypatch.setattr(train_mod, "can_cache_features", lambda *a: False)
    slow = fit(cfg, tiny_prepared, tmp_path / "slow", progress=False)
    a, b = model_state(tmp_path / "fast"), model_state(tmp_path / "slow")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert fast["last"]["val_accuracy"] == slow["last"]["val_accuracy"]
    first = torch.load(tmp_path / "fast" / ck.LAST, weights_only=True)
    assert not torch.equal(
        first["model"]["classifier.weight"], torch.zeros_like(first["model"]["classifier.weight"])
    )


def test_existing_run_dir_is_refused(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(epochs=1), tiny_prepared, run, progress=False)
    with pytest.raises(OutputExistsError, match="--resume"):
        fit(tiny_cfg(epochs=1), tiny_prepared, run, progress=False)
    res = CliRunner().invoke(
        build_app(),
        [
            "train",
            "--preset",
            "seed-s1-cnn-basic",
            "--data",
            str(tiny_prepared),
            "--out",
            str(run),
            "--epochs",
            "1",
        ],
    )
    assert res.exit_code == 2 and "already exists" in res.output
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a carspotter output"):
        fit(tiny_cfg(epochs=1), tiny_prepared, other, overwrite=True, progress=False)
    assert (other / "thesis.txt").read_text() == "precious"
    fit(tiny_cfg(epochs=1, seed=3), tiny_prepared, run, overwrite=True, progress=False)
    assert ck.read_run_config(run).train.seed == 3


def test_interrupted_checkpoint_write_keeps_previous_last_pt(tiny_prepared, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs=3)
    real_save = torch.save
    calls = {"n": 0}

    def half_write_then_die(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second epoch's last.pt: write some bytes, then crash
            Path(f).write_bytes(b"PK\x03\x04 truncated")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tiny_prepared, run, progress=False)
    monkeypatch.undo()
    state = ck.load_state(run / ck.LAST)  # still the complete epoch-1 state
    assert state["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
    fit(cfg, tiny_prepared, run, resume=True, progress=False)
    fit(cfg, tiny_prepared, tmp_path / "clean", progress=False)
    assert_same_weights(model_state(run), model_state(tmp_path / "clean"))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_weights_pickle_is_refused(tiny_prepared, tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    torch.save({"state_dict": _Evil()}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        res = CliRunner().invoke(
            build_app(),
            [
                "train",
                "--preset",
                "seed-t1-resnet50-frozen",
                "--data",
                str(tiny_prepared),
                "--out",
                str(tmp_path / f"run_{path.stem}"),
                "--weights",
                str(path),
                "--epochs",
                "1",
                "--img-size",
                "32",
            ],
        )
        assert res.exit_code == 2, res.output
        assert "refused to load" in res.output and "weights_only" in res.output
    assert not (tmp_path / "pwned").exists()


def test_empty_val_split_selects_by_train_loss(tmp_path, caplog):
    from carspotter.data.manifest import read_manifest, write_manifest
    from conftest import make_tiny_prepared

    data = make_tiny_prepared(tmp_path / "data")
    recs = [
        dataclasses.replace(r, split="train" if r.split == "val" else r.split) for r in read_manifest(data)
    ]
    write_manifest(data, recs)
    s = fit(tiny_cfg(epochs=2), data, tmp_path / "run", progress=False)
    assert s["select_metric"] == "train_loss"
    assert "no 'val' images" in caplog.text  # logged as a warning (the CLI shows it on stderr)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[0]["val_accuracy"] == ""


def test_early_stopping_and_resume_of_a_stopped_run(tiny_prepared, tmp_path):
    cfg = tiny_cfg(epochs=5, lr=0.0, **{"train.early_stop_patience": 2})
    s = fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    assert s["stopped_early"] and s["epochs_completed"] == 3 and s["best_epoch"] == 1
    again = fit(cfg, tiny_prepared, tmp_path / "run", resume=True, progress=False)
    assert again["epochs_completed"] == 3


def test_cli_evaluate_knn_and_predict(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(epochs=1), tiny_prepared, run, progress=False)
    app = build_app()
    res = CliRunner().invoke(app, ["evaluate", str(run), "--knn", "--k", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "metrics_test_knn1_euclidean.json").is_file()
    res = CliRunner().invoke(
        app, ["evaluate", str(run), "--knn", "--k", "1", "--split", "val", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert (run / "metrics_val_knn1_euclidean.json").is_file()  # the test result is not overwritten
    assert json.loads((run / "metrics_test_knn1_euclidean.json").read_text())["split"] == "test"
    img = tiny_prepared / "images" / "c0_000.jpg"
    res = CliRunner().invoke(app, ["predict", str(run), str(img), "--k", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Class" in res.output and "%" in res.output
