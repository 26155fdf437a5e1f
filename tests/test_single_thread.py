"""Per-image transforms run on one intra-op thread and leave the caller's thread count as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carspotter.config import DataConfig
from carspotter.data.dataset import PreparedDataset
from carspotter.data.transforms import build_transform, single_thread


def test_single_thread_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_dataset_items_are_unchanged_and_threads_restored(tiny_prepared: Path) -> None:
    before = torch.get_num_threads()
    tf = build_transform(DataConfig(img_size=24), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    ds = PreparedDataset(tiny_prepared, "train", tf)
    torch.set_num_threads(2)
    try:
        x, y = ds[0]
        assert torch.get_num_threads() == 2
        assert x.shape == (3, 24, 24) and y == ds.records[0].label
        torch.testing.assert_close(x, tf(ds.load_image(0)))  # same result as the transform run directly
    finally:
        torch.set_num_threads(before)
