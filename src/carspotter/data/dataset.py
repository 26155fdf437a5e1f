"""A torch Dataset over a prepared directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from carspotter.data.images import open_rgb
from carspotter.data.manifest import Record, class_names, read_manifest, split_records
from carspotter.data.transforms import single_thread


class PreparedDataset(Dataset):
    """Items are (image_tensor, label). Images were validated and resized at prepare time."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        crop_bbox: bool = False,
        records: list[Record] | None = None,
    ) -> None:
        self.root = Path(root)
        all_records = records if records is not None else read_manifest(self.root)
        self.class_names = class_names(all_records)
        self.records = split_records(all_records, split)
        self.split = split
        self.transform = transform
        self.crop_bbox = crop_bbox
        # Run each item's transform on one torch thread (changes the global count while it runs): only a caller
        # that owns the process and loads in the main process (num_workers=0) turns this on.
        self.one_thread_transforms = False

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    def load_image(self, i: int) -> Image.Image:
        r = self.records[i]
        img = open_rgb(self.root / r.path)
        if self.crop_bbox and r.bbox is not None:
            x1, y1, x2, y2 = r.bbox
            img = img.crop((max(0, x1), max(0, y1), min(img.width, x2), min(img.height, y2)))
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load_image(i)
        if self.one_thread_transforms:  # opt-in by the loop that owns the process (num_workers=0)
            with single_thread():  # tiny ops: one thread is as fast idle and 10-40x faster on a busy CPU
                x = self.transform(img) if self.transform is not None else img
        else:
            x = self.transform(img) if self.transform is not None else img
        return x, self.records[i].label


def splits_dataset(
    data_dir: str | Path, split: str, transform: Any, crop_bbox: bool = False
) -> PreparedDataset:
    """A PreparedDataset over one split, "all", or several joined by "+" (e.g. the whole labelled
    "train+val" as a kNN gallery: a kNN classifier has nothing to select on val; or "val+test" of a
    retrieval-protocol dataset as known + unknown photos for an open-set figure)."""
    parts = split.split("+")
    ds = PreparedDataset(data_dir, "all" if len(parts) > 1 else split, transform, crop_bbox)
    if len(parts) > 1:
        ds.records = [r for r in ds.records if r.split in parts]
        ds.split = split
    return ds
