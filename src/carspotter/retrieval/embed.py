"""Batch embedding extraction: the one path from photos to vectors (index, kNN, search, serve)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from carspotter.data.transforms import Preprocess
from carspotter.models.factory import CarModel
from carspotter.models.fuse import CPU_CHUNK, fold_batchnorm, forward_chunked
from carspotter.models.inference import autocast, with_tta

# auto = the embedding head if the model has one, else `features`; features = the pooled pre-logit features
# (for the scratch CNN: its hidden layer); embedding = the metric-learning head; logits = the classifier output.
SOURCES = ("auto", "features", "embedding", "logits")


def _forward(model: CarModel, x: torch.Tensor, source: str) -> torch.Tensor:
    if source not in SOURCES:
        raise ValueError(f"embed source must be one of {SOURCES}, got {source!r}")
    if source == "logits":
        if model.num_classes <= 0:
            raise ValueError("embed source 'logits' needs a model with a classifier")
        return model(x)
    if source == "features" or (source == "auto" and model.embedding is None):
        return model.forward_features(x)
    return model.embed(x)


@torch.inference_mode()
def embed_dataset(
    model: CarModel,
    dataset: Dataset,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    source: str = "auto",
    fold_bn: bool = True,
    cpu_chunk: int | None = CPU_CHUNK,
    amp: str = "auto",
    tta: str = "none",
) -> np.ndarray:
    """(N, D) float32 embeddings in dataset order. The dataset must already apply the eval transform.
    `amp` is the run's precision (models/inference.py); tta="flip" averages each photo's and its mirror's.

    On CPU, eval-mode BatchNorm is folded into the preceding convolutions first, and each loader batch runs
    through the network `cpu_chunk` images at a time (models.fuse): the same vectors to ~1e-6 relative,
    several times faster (BENCHMARKS.md).
    """
    if num_workers == 0 and hasattr(dataset, "one_thread_transforms"):
        dataset.one_thread_transforms = True  # this loop owns the process: per-image ops on one thread
    model = model.to(device).eval()
    channels_last = device == "cpu" or device.startswith("cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=device.startswith("cuda"),
    )
    out: list[np.ndarray] = []
    run_model: torch.nn.Module | None = None if fold_bn and device == "cpu" else model
    for batch in loader:
        x = batch[0] if isinstance(batch, list | tuple) else batch  # (B, 3, S, S)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if run_model is None:  # fold once, checked against the unfolded model on this first batch
            run_model, _ = fold_batchnorm(model, x[:2], lambda m, t: _forward(m, t, source))
        chunk = cpu_chunk if device == "cpu" else None
        fn = with_tta(partial(_forward, run_model, source=source), tta)
        with autocast(amp, x.device):
            emb = forward_chunked(fn, x, chunk)  # (B, D)
        out.append(emb.float().cpu().numpy())
    if not out:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


@torch.inference_mode()
def embed_images(
    model: CarModel,
    images: Sequence[Image.Image],
    device: str = "cpu",
    source: str = "auto",
    preprocess: Preprocess | None = None,
    amp: str = "auto",
    tta: str = "none",
) -> np.ndarray:
    """(len(images), D) float32 for in-memory RGB images (serve, search, report).

    Pass the gallery's `preprocess` (index.json) so queries are preprocessed exactly like the gallery; the
    default is the model's own.
    """
    tf = (preprocess or model.preprocess).transform()
    x = torch.stack([tf(im) for im in images]).to(device)  # (B, 3, S, S)
    model = model.to(device).eval()
    with autocast(amp, x.device):
        emb = with_tta(partial(_forward, model, source=source), tta)(x)
    return np.ascontiguousarray(emb.float().cpu().numpy(), dtype=np.float32)
