"""Shared fixtures: tiny prepared datasets generated on the fly (no network, no ../shared)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carspotter.data.manifest import Record, write_manifest


def make_tiny_prepared(
    root: Path, n_classes: int = 4, per_class: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """A learnable toy prepared dataset: each class is a distinct coloured stripe pattern plus noise.

    Splits per class: half train, a quarter val, a quarter test.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    records = []
    for c in range(n_classes):
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            arr = rng.normal(0, 20, size=(size, size, 3)) + base
            period = 2 + c
            arr[:, ::period] += 80
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            rel = f"images/c{c}_{i:03d}.jpg"
            img.save(root / rel, quality=95)
            split = "train" if i < per_class // 2 else ("val" if i < 3 * per_class // 4 else "test")
            records.append(Record(rel, c, f"Class {c}", split))
    write_manifest(root, records)
    return root


def make_tiny_run(root: Path, n_classes: int = 4, crop_mode: str = "center") -> Path:
    """A run directory (model.json + best.safetensors) of an untrained 2-block scratch CNN at 32 px."""
    from dataclasses import asdict

    import torch

    from carspotter.config import ModelConfig
    from carspotter.engine.checkpoint import ModelInfo, save_model_json, save_weights
    from carspotter.models.factory import create_model

    cfg = ModelConfig(arch="scratch_cnn", channels=[8, 16], hidden_dim=16)
    with (
        torch.random.fork_rng()
    ):  # the same weights whatever ran before: tests must not depend on their order
        torch.manual_seed(0)
        model = create_model(cfg, n_classes, 32)
    root.mkdir(parents=True)
    save_weights(model, root / "best.safetensors")
    names = [f"Class {i}" for i in range(n_classes)]
    pre = {**model.preprocess.to_dict(), "crop_mode": crop_mode}
    save_model_json(root, ModelInfo(asdict(cfg), n_classes, names, pre))
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_prepared(tmp_path_factory.mktemp("tiny") / "prepared")


# The smallest trainable configuration: a 2-block scratch CNN on 32 px photos (add "epochs").
TINY_OVERRIDES: dict[str, object] = {
    "model.arch": "scratch_cnn",
    "model.channels": [8, 16],
    "model.hidden_dim": 32,
    "pretrained": False,
    "img_size": 32,
    "batch_size": 4,
    "device": "cpu",
    "train.amp": False,  # bf16 autocast only pays off for real model sizes
}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one OpenMP thread is much faster than two fighting for cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
