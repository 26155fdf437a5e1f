"""Every model family must be able to fit a small, easy training set.

A network that cannot learn (the BatchNorm scratch CNNs once collapsed to the class prior on real photos:
their hidden units all died in epoch 1) must turn the suite red. Each test trains a family briefly on
generated coloured shapes (8 classes = 2 shapes × 4 colours, random position/size, noisy background) with the
engine's own `train_one_epoch`, optimiser and schedule, then scores the *training* photos in eval mode (no
dropout, BatchNorm running statistics) — the figure metrics.csv records as train_eval_accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.engine.loader import TensorItems, make_loader, train_sampler
from carspotter.engine.optim import build_optimizer, build_scheduler
from carspotter.engine.train import StepContext, evaluate, set_train_mode, train_one_epoch
from carspotter.models.factory import CarModel, create_model
from carspotter.presets import load_preset

N_CLASSES, PER_CLASS, SIZE = 8, 12, 32
LN_C = math.log(N_CLASSES)


def coloured_shapes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, SIZE, SIZE) images in [-1, 1] and (N,) labels: class = shape (disc / flat bar) × colour (4)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 210, 40]], dtype=np.float64)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    xs, ys = [], []
    for c in range(N_CLASSES):
        shape, colour = divmod(c, 4)
        for _ in range(PER_CLASS):
            img = rng.normal(110, 25, size=(SIZE, SIZE, 3))
            r = rng.uniform(5, 9)
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
            mask = (
                (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
                if shape == 0
                else (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r * 0.3)
            )
            img[mask] = colours[colour] + rng.normal(0, 15, size=(int(mask.sum()), 3))
            xs.append(np.clip(img, 0, 255) / 127.5 - 1.0)
            ys.append(c)
    x = torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ys)


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, torch.Tensor]:
    return coloured_shapes()


def train_briefly(
    cfg: ExperimentConfig, model: CarModel, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module
) -> list[float]:
    """cfg.train.epochs epochs of the engine's training step; the mean train loss of each epoch."""
    torch.manual_seed(0)
    ctx = StepContext(device=torch.device("cpu"), classify=cfg.task != "metric")
    sampler = train_sampler(len(y), seed=0)
    loader = make_loader(
        TensorItems(x, y), sampler, cfg.data.batch_size, 0, 0, drop_last=cfg.task == "metric"
    )
    optimizer = build_optimizer(cfg, model, loss_fn.parameters())
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    losses = []
    for epoch in range(cfg.train.epochs):
        set_train_mode(model, cfg)
        sampler.set_epoch(epoch)
        stats, _ = train_one_epoch(
            model.embed if cfg.task == "metric" else model, loss_fn, optimizer, scheduler, loader, epoch, ctx
        )
        losses.append(stats["train_loss"])
    return losses


def eval_mode_train_fit(model: CarModel, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) on the training photos with the model in eval mode."""
    model.eval()
    ctx = StepContext(device=torch.device("cpu"))
    loader = make_loader(TensorItems(x, y), torch.utils.data.SequentialSampler(range(len(y))), 64, 0, 0)
    logits = torch.from_numpy(evaluate(model, loader, ctx)["output"])
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def classification_cfg(preset: str, epochs: int, **over: object) -> ExperimentConfig:
    """The preset's network, optimiser, schedule and loss, at the test's size and length."""
    base = {
        "data.img_size": SIZE,
        "data.batch_size": 8,
        "train.epochs": epochs,
        "model.pretrained": False,
        "model.weights": None,
        "train.ema_decay": None,
        "schedule.warmup_epochs": min(load_preset(preset).schedule.warmup_epochs, 1),
    }
    return apply_overrides(load_preset(preset), {**base, **over})


SCRATCH = [
    ("seed-s1-cnn-basic", 12),
    ("seed-s2-cnn-bn-dropout", 10),
    ("seed-s3-cnn-aug", 10),
    ("strong-cnn-scratch", 5),
]


@pytest.mark.parametrize(("preset", "epochs"), SCRATCH, ids=[p for p, _ in SCRATCH])
def test_scratch_network_fits_its_training_set(shapes, preset: str, epochs: int) -> None:
    x, y = shapes
    cfg = classification_cfg(preset, epochs)
    torch.manual_seed(0)
    model = create_model(cfg.model, N_CLASSES, SIZE)
    train_briefly(cfg, model, x, y, nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing))
    loss, acc = eval_mode_train_fit(model, x, y)
    assert loss < 0.35 * LN_C, f"{preset}: eval-mode train loss {loss:.3f} (ln C = {LN_C:.3f})"
    assert acc >= 0.9, f"{preset}: eval-mode train accuracy {acc:.1%}"


def test_timm_backbone_from_random_init_fits(shapes) -> None:
    """A timm backbone (tiny EfficientNet, random init) + our head, with the T2 recipe (Adam, dropout 0.5)."""
    x, y = shapes
    cfg = classification_cfg("seed-t2-resnet50-finetune", 12, **{"model.arch": "test_efficientnet"})
    torch.manual_seed(0)
    model = create_model(cfg.model, N_CLASSES, SIZE)
    train_briefly(cfg, model, x, y, nn.CrossEntropyLoss())
    loss, acc = eval_mode_train_fit(model, x, y)
    assert loss < 0.35 * LN_C, f"eval-mode train loss {loss:.3f} (ln C = {LN_C:.3f})"
    assert acc >= 0.9, f"eval-mode train accuracy {acc:.1%}"


def test_metric_learning_head_separates_the_classes(shapes) -> None:
    """Embedding head + Proxy-Anchor (the strong-proxyanchor recipe; lr raised and BatchNorm trained for a
    random-init backbone):
    the loss falls far below its start and each training photo's nearest other photo shares its class."""
    from carspotter.retrieval.losses import build_metric_loss
    from carspotter.retrieval.metrics import retrieval_metrics

    x, y = shapes
    cfg = classification_cfg(
        "strong-proxyanchor-efficientnet-lite0",
        20,
        **{
            "model.arch": "test_efficientnet",
            "model.embed_dim": 32,
            "model.freeze_bn": False,  # the preset freezes BatchNorm of a pretrained backbone; this one is random
            "optim.lr": 3e-3,
            "data.batch_size": 16,
            "train.warmup_head_epochs": 0,
        },
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, 0, SIZE)
    loss_fn = build_metric_loss(cfg, N_CLASSES, model.embed_dim)
    losses = train_briefly(cfg, model, x, y, loss_fn)
    model.eval()
    with torch.no_grad():
        emb = model.embed(x).numpy()
    r1 = retrieval_metrics(emb, y.numpy(), metric="cosine")["recall_at_1"]
    assert losses[-1] < 0.3 * losses[0], f"Proxy-Anchor loss {losses[0]:.3f} → {losses[-1]:.3f}"
    assert r1 >= 0.9, f"eval-mode train Recall@1 {r1:.1%}"


def test_hidden_batchnorm_takes_a_training_batch_of_one_photo() -> None:
    """An epoch whose last batch holds one photo must not crash the BatchNorm hidden layer."""
    cfg = classification_cfg("seed-s2-cnn-bn-dropout", 1)
    model = create_model(cfg.model, N_CLASSES, SIZE).train()
    bn = model.backbone.fc[2]
    before = bn.running_mean.clone()
    model(torch.randn(1, 3, SIZE, SIZE)).sum().backward()
    assert torch.equal(bn.running_mean, before)  # running statistics untouched by a one-photo batch
