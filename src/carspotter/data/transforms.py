"""Image transforms built from a DataConfig and the model's preprocessing (mean/std travel with the model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from carspotter.config import DataConfig


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run per-image transforms on one intra-op thread, then restore the previous count.

    They are tiny tensor ops: splitting each over OpenMP threads gains little on idle cores, and when other
    processes keep a core busy every op waits for a descheduled thread — measured 10-40x slower on a shared
    2-core machine (BENCHMARKS.md). DataLoader workers already use one thread; this covers the main process
    (num_workers=0, single-image inference). Not for use while another Python thread runs torch ops.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resize_size_for(data: DataConfig) -> int:
    return data.resize_size or round(data.img_size / 0.875)


CROP_MODES = ("center", "squash")


def check_crop_mode(data: DataConfig) -> None:
    if data.crop_mode not in CROP_MODES:
        raise ValueError(f"data.crop_mode must be one of {CROP_MODES}, got {data.crop_mode!r}")


def _resize(data: DataConfig, side: int) -> T.Resize:
    """center: shorter side → `side` (aspect kept); squash: the whole photo → side × side."""
    check_crop_mode(data)
    return T.Resize((side, side) if data.crop_mode == "squash" else side, antialias=True)


def build_transform(
    data: DataConfig, mean: Sequence[float], std: Sequence[float], train: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image → normalised float tensor (3, img_size, img_size)."""
    size = data.img_size
    aug = data.aug
    ops: list = [T.PILToTensor()]
    if train and aug.random_resized_crop:
        ops.append(T.RandomResizedCrop(size, scale=(aug.rrc_scale_min, 1.0), antialias=True))
    elif train and aug.random_crop:
        ops += [_resize(data, resize_size_for(data)), T.RandomCrop(size)]
    elif data.crop_mode == "squash":  # eval: the whole photo, nothing cropped away
        ops.append(_resize(data, size))
    else:
        ops += [_resize(data, resize_size_for(data)), T.CenterCrop(size)]
    if train:
        if aug.hflip:
            ops.append(T.RandomHorizontalFlip())
        if aug.rotation:
            ops.append(T.RandomRotation(aug.rotation))
        if aug.color_jitter:
            c = aug.color_jitter
            ops.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if train and aug.random_erasing:
        ops.append(T.RandomErasing(p=aug.random_erasing))
    return T.Compose(ops)
