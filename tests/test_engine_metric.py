"""Metric-learning runs (`task: metric`): embedding + loss with its own parameters, best by val Recall@1."""

from __future__ import annotations

import csv

import pytest
import torch

from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.engine import checkpoint as ck
from carspotter.engine import train as train_mod
from carspotter.engine.evaluate import evaluate_run
from carspotter.engine.train import fit

METRIC = {
    "task": "metric",
    "model.arch": "scratch_cnn",
    "model.channels": [8, 16],
    "model.hidden_dim": 32,
    "model.embed_dim": 16,
    "pretrained": False,
    "img_size": 32,
    "batch_size": 8,
    "epochs": 3,
    "device": "cpu",
    "train.amp": False,
    "train.loss": "proxy_anchor",
    "train.m_per_class": 2,
    "train.warmup_head_epochs": 1,
    "optim.name": "adamw",
}


def test_metric_run_trains_proxies_selects_by_recall_and_resumes_exactly(
    tiny_prepared, tmp_path, monkeypatch
):
    cfg = apply_overrides(ExperimentConfig(), METRIC)
    full = fit(cfg, tiny_prepared, tmp_path / "full", progress=False)
    assert full["select_metric"] == "recall_at_1"
    with open(tmp_path / "full" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == train_mod.METRIC_COLUMNS and len(rows) == 3
    assert 0 <= float(rows[-1]["val_recall_at_1"]) <= 1
    state = torch.load(tmp_path / "full" / ck.LAST, weights_only=True)
    assert state["loss"], "the loss's own parameters (proxies) are saved for resume"
    info = ck.read_model_info(tmp_path / "full")
    assert info.num_classes == 0 and len(info.class_names) == 4

    real = train_mod.train_one_epoch

    def crash(*args, **kwargs):
        if args[5] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tiny_prepared, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed = fit(cfg, tiny_prepared, tmp_path / "resumed", resume=True, progress=False)
    assert resumed["weights_sha256"] == full["weights_sha256"]
    a = torch.load(tmp_path / "resumed" / ck.LAST, weights_only=True)["loss"]
    for k in a:
        assert torch.equal(a[k], state["loss"][k])

    m = evaluate_run(tmp_path / "full", split="test", device="cpu")
    assert 0 <= m["recall_at_1"] <= 1 and m["n_images"] == 8
