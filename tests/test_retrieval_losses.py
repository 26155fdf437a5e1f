"""Metric-learning losses and the m-per-class sampler: gradients, learning, batch composition, engine fit."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.retrieval.losses import LOSSES, build_metric_loss, build_sampler

D, C = 16, 4


def cfg_with(**over: object) -> ExperimentConfig:
    if "train__loss" in over:  # a metric-learning loss belongs to task: metric (the config checks it)
        over.setdefault("task", "metric")
    return apply_overrides(ExperimentConfig(), {k.replace("__", "."): v for k, v in over.items()})


def toy_batch(seed: int = 0, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 photos each of C classes: class centres + noise, norms ~1-2; (16, D) float32 and (16,) int64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=g)
    labels = torch.arange(C).repeat_interleave(4)
    emb = centres[labels] + spread * torch.randn(len(labels), D, generator=g)
    return emb / D**0.5, labels


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_finite_scalar_with_gradients_to_embeddings_and_proxies(name):
    loss_fn = build_metric_loss(cfg_with(train__loss=name), C, D)
    emb, labels = toy_batch(spread=2.0)
    emb.requires_grad_(True)
    loss = loss_fn(emb, labels)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    params = list(loss_fn.parameters())
    if name in ("proxy_anchor", "arcface"):
        assert [p.shape for p in params] in ([torch.Size([C, D])], [torch.Size([D, C])])
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_sgd_steps_on_toy_embeddings_reduce_the_loss(name):
    torch.manual_seed(0)
    loss_fn = build_metric_loss(cfg_with(train__loss=name), C, D)
    emb, labels = toy_batch(seed=1, spread=1.5)
    emb = torch.nn.Parameter(emb)
    opt = torch.optim.SGD([emb, *loss_fn.parameters()], lr=0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(emb, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match=r"proxy_anchor.*multi_similarity.*arcface"):
        build_metric_loss(cfg_with(train__loss="triplet"), C, D)


def test_sampler_batches_hold_m_photos_of_batch_over_m_classes_and_depend_only_on_seed_and_epoch():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), rng.integers(2, 9, size=10))  # uneven classes, some below m
    cfg = cfg_with(batch_size=12, train__m_per_class=3, seed=7)
    sampler = build_sampler(labels, cfg)
    np_state = np.random.get_state()[1].copy()
    order0 = list(sampler)
    assert np.array_equal(np.random.get_state()[1], np_state), "the global NumPy stream is untouched"
    assert len(order0) == len(sampler) == len(labels) - len(labels) % 12
    for b in range(0, len(order0), 12):
        batch = labels[order0[b : b + 12]]
        classes, counts = np.unique(batch, return_counts=True)
        assert len(classes) == 4 and (counts == 3).all(), batch
    sampler.set_epoch(1)
    order1 = list(sampler)
    assert order1 != order0
    sampler.set_epoch(0)
    assert list(sampler) == order0, "an epoch replays exactly, whatever ran before (exact resume)"
    assert list(build_sampler(labels, cfg)) == order0


@pytest.mark.parametrize(
    ("batch", "m", "match"),
    [
        (10, 4, "multiple of train.m_per_class"),
        (12, 0, "at least 1"),
        (48, 4, "needs 12 classes, but the training split has 10"),
    ],
)
def test_sampler_rejects_bad_batch_and_m_clearly(batch, m, match):
    labels = np.repeat(np.arange(10), 8)
    with pytest.raises(ValueError, match=match):
        build_sampler(labels, cfg_with(batch_size=batch, train__m_per_class=m))


@pytest.mark.parametrize("name", LOSSES)
def test_tiny_metric_fit_records_val_recall_that_the_best_weights_reproduce(name, tmp_path):
    from carspotter.data.dataset import PreparedDataset
    from carspotter.engine.checkpoint import load_run
    from carspotter.engine.train import fit
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.retrieval.metrics import retrieval_metrics
    from conftest import make_tiny_prepared

    data = make_tiny_prepared(tmp_path / "data", n_classes=4, per_class=12, size=32, seed=1)
    cfg = cfg_with(
        task="metric",
        arch="scratch_cnn",
        model__channels=[8, 16],
        model__hidden_dim=32,
        model__embed_dim=16,
        pretrained=False,
        img_size=32,
        batch_size=8,
        epochs=2,
        device="cpu",
        train__amp=False,
        train__loss=name,
        train__m_per_class=2,
        optim__name="adamw",
    )
    summary = fit(cfg, data, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0 <= float(r["val_recall_at_1"]) <= 1 for r in rows)
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert summary["select_metric"] == "recall_at_1"
    best_row = rows[summary["best_epoch"] - 1]
    assert float(best_row["val_recall_at_1"]) == pytest.approx(summary["best_value"])

    model, _ = load_run(tmp_path / "run", "cpu")
    val = PreparedDataset(data, "val", model.preprocess.transform())
    emb = embed_dataset(model, val, batch_size=8)  # (12, 16): the 16-d embedding head, not the features
    assert emb.shape == (12, 16)
    again = retrieval_metrics(emb, val.labels, metric=cfg.retrieval.metric)
    assert again["recall_at_1"] == pytest.approx(summary["best_value"])
