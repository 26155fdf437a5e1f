"""Data loaders whose randomness depends only on (seed, epoch, item): what makes `resume` exact.

The sampler hands each item its epoch along with its index, and the item's augmentation runs under a
generator seeded from (seed, epoch, index). So an epoch reproduces whether it runs first or after a
resume, with any number of workers, persistent or not, on one process or several.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from carspotter.utils import mix_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler; yields (epoch, index). `set_epoch` also reaches the wrapped sampler."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class SeededItems(Dataset):
    """(epoch, index) → (x, label, index), the item's random transforms seeded by (seed, epoch, index).

    The global RNG state is restored afterwards, so with `num_workers=0` the training loop's own stream
    (dropout) is untouched. A plain int key (evaluation) means epoch 0.
    """

    def __init__(self, dataset: Dataset, seed: int, random_transforms: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.random_transforms = random_transforms

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not self.random_transforms:
            x, y = self.dataset[i]
            return x, y, i
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        s = mix_seed(self.seed, epoch, i)
        torch.manual_seed(s)
        random.seed(s)
        try:
            x, y = self.dataset[i]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
        return x, y, i


class TensorItems(Dataset):
    """Cached features as a dataset with the same keys as SeededItems (frozen-backbone fast path)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.feats, self.labels = feats, labels  # (N, F) float32, (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        _, i = key if isinstance(key, tuple) else (0, key)
        return self.feats[i], int(self.labels[i]), i


def train_sampler(
    n: Sized | int, seed: int, rank: int = 0, world_size: int = 1, base: Sampler[int] | None = None
) -> EpochSampler:
    """Shuffled epoch order from (seed, epoch). DistributedSampler even for one process: its permutation does
    not depend on world size, so N ranks × batch B see exactly the samples one process sees with batch N·B."""
    if base is None:
        size = n if isinstance(n, int) else len(n)
        base = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )  # type: ignore[arg-type]
    return EpochSampler(base)


def eval_sampler(n: int, rank: int = 0, world_size: int = 1) -> Sampler[int]:
    """In order; under DDP each rank gets a strided shard, padded with duplicates that gathers drop later."""
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False)  # type: ignore[arg-type]


def make_loader(
    items: Dataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int,
    seed: int,
    *,
    pin_memory: bool = False,
    drop_last: bool = False,
    persistent: bool = True,
) -> DataLoader:
    """A DataLoader with its own generator (so creating iterators never draws from the global RNG)."""
    return DataLoader(
        items,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
