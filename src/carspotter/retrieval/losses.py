"""Metric-learning losses and the m-per-class batch sampler (`task: metric`), from pytorch-metric-learning.

`build_metric_loss` returns an nn.Module called `loss(embeddings (B, D), labels (B,))`; proxy and ArcFace
losses own parameters (one vector per class), which the engine optimises in their own group at
lr × `train.proxy_lr_mult` and saves in `last.pt` for an exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch import nn

from carspotter.config import ExperimentConfig
from carspotter.utils import mix_seed

LOSSES = ("proxy_anchor", "multi_similarity", "arcface")


class MinedLoss(nn.Module):
    """A pair-based loss with its miner as one module: `loss(embeddings, labels)` like the proxy losses."""

    def __init__(self, loss: nn.Module, miner: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels)  # informative (anchor, positive, anchor, negative) indices
        return self.loss(embeddings, labels, pairs)


# The published hyperparameters of each method; `train.<name>` in the config overrides any of them.
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0},  # Kim et al. 2020
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "miner_epsilon": 0.1},  # Wang et al. 2019
    "arcface": {"margin": 28.6, "scale": 64.0},  # Deng et al. 2019 (margin in degrees)
}
_BUILD: dict[str, Callable[[dict[str, float], int, int], nn.Module]] = {
    "proxy_anchor": lambda h, c, d: losses.ProxyAnchorLoss(c, d, margin=h["margin"], alpha=h["alpha"]),
    "multi_similarity": lambda h, c, d: MinedLoss(
        losses.MultiSimilarityLoss(alpha=h["alpha"], beta=h["beta"], base=h["base"]),
        miners.MultiSimilarityMiner(epsilon=h["miner_epsilon"]),
    ),
    "arcface": lambda h, c, d: losses.ArcFaceLoss(c, d, margin=h["margin"], scale=h["scale"]),
}


def loss_hyperparameters(cfg: ExperimentConfig) -> dict[str, float]:
    """The loss's published defaults with any `train.margin/alpha/beta/base/scale/miner_epsilon` set."""
    name = cfg.train.loss
    if name not in LOSS_DEFAULTS:
        raise ValueError(f"train.loss: unknown metric loss {name!r} for task: metric; choose one of {LOSSES}")
    out = dict(LOSS_DEFAULTS[name])
    for key in out:
        value = getattr(cfg.train, key)
        if value is not None:
            out[key] = float(value)
    unused = [k for k in ("margin", "alpha", "beta", "base", "scale", "miner_epsilon") if k not in out]
    if any(getattr(cfg.train, k) is not None for k in unused):
        raise ValueError(
            f"train.loss {name!r} takes {sorted(out)}, not {[k for k in unused if getattr(cfg.train, k) is not None]}"
        )
    return out


def build_metric_loss(cfg: ExperimentConfig, num_classes: int, embed_dim: int) -> nn.Module:
    """The loss named by `cfg.train.loss`, with `loss_hyperparameters(cfg)`.

    All compare embeddings by cosine similarity, so they need no normalisation layer in the model.
    """
    name = cfg.train.loss
    if num_classes < 2:
        raise ValueError(f"train.loss {name!r}: metric learning needs at least 2 classes, got {num_classes}")
    return _BUILD[name](loss_hyperparameters(cfg), num_classes, embed_dim)


class SeededMPerClassSampler(MPerClassSampler):
    """MPerClassSampler whose order depends only on (seed, epoch), like the engine's other samplers.

    pytorch-metric-learning draws from its module-level `NUMPY_RANDOM`; each `__iter__` swaps in a
    RandomState seeded from (seed, epoch) and restores the original, and the class list it shuffles in place
    is reset first, so the global NumPy stream is untouched and a resumed epoch sees exactly the batches of
    an uninterrupted one.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, m: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(labels, m=m, batch_size=batch_size, length_before_new_iter=len(labels))
        self.seed = seed
        self.epoch = 0
        self._label_order = list(self.labels)  # pml shuffles `self.labels` in place: start each epoch afresh

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.labels = list(self._label_order)
        saved = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = np.random.RandomState(mix_seed(self.seed, self.epoch) % 2**32)
        try:
            return super().__iter__()  # builds the whole index list now
        finally:
            pml_common.NUMPY_RANDOM = saved


def build_sampler(labels: Sequence[int] | np.ndarray, cfg: ExperimentConfig) -> MPerClassSampler:
    """Batches of `data.batch_size` photos: batch_size / m classes, `train.m_per_class` photos of each.

    One epoch is len(labels) photos (rounded down to whole batches); a class with fewer than m photos is
    sampled with replacement.
    """
    y = np.asarray(labels, dtype=np.int64)
    m, bs = cfg.train.m_per_class, cfg.data.batch_size
    if m < 1:
        raise ValueError(f"train.m_per_class must be at least 1, got {m}")
    if bs % m:
        raise ValueError(
            f"data.batch_size ({bs}) must be a multiple of train.m_per_class ({m}): each batch holds "
            f"batch_size / m classes with m photos each (e.g. batch_size {max(m, bs - bs % m)})"
        )
    n_classes = len(np.unique(y))
    if n_classes * m < bs:
        raise ValueError(
            f"a batch of {bs} with train.m_per_class={m} needs {bs // m} classes, but the training split "
            f"has {n_classes}; lower data.batch_size or raise train.m_per_class"
        )
    if len(y) < bs:
        raise ValueError(f"the training split has {len(y)} photos, fewer than one batch of {bs}")
    return SeededMPerClassSampler(y, m=m, batch_size=bs, seed=cfg.train.seed)
