"""Image transforms built from a DataConfig and the model's preprocessing (mean/std travel with the model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from carspotter.config import DataConfig


def resize_size_for(data: DataConfig) -> int:
    return data.resize_size or round(data.img_size / 0.875)


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
        ops += [T.Resize(resize_size_for(data), antialias=True), T.RandomCrop(size)]
    else:
        ops += [T.Resize(resize_size_for(data), antialias=True), T.CenterCrop(size)]
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
