"""data.crop_mode: "squash" keeps the whole photo; runs and indexes remember the mode and queries follow it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carspotter.config import DataConfig
from carspotter.data.transforms import Preprocess, build_transform
from conftest import make_tiny_run

PLAIN = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std: outputs stay in [0, 1]


def _red_left_edge() -> Image.Image:
    """120×60 grey photo whose leftmost 10 columns are pure red (a car's nose at the edge of the frame)."""
    arr = np.full((60, 120, 3), 128, dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    return Image.fromarray(arr)


def test_squash_keeps_the_edges_that_a_centre_crop_cuts() -> None:
    im = _red_left_edge()
    centre = build_transform(DataConfig(img_size=48), *PLAIN, train=False)(im)
    squash = build_transform(DataConfig(img_size=48, crop_mode="squash"), *PLAIN, train=False)(im)
    assert centre.shape == squash.shape == (3, 48, 48)
    assert float(squash[0, :, 0].mean()) > 0.95 and float(squash[1, :, 0].mean()) < 0.05  # red kept
    assert abs(float(centre[0, :, 0].mean()) - 128 / 255) < 0.02  # the centre crop starts in the grey


def test_squash_with_random_crop_training_gives_the_right_size() -> None:
    data = DataConfig(img_size=40, crop_mode="squash")
    data.aug.random_crop = True
    assert build_transform(data, *PLAIN, train=True)(_red_left_edge()).shape == (3, 40, 40)


def test_an_unknown_crop_mode_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.crop_mode.*'stretch'"):
        build_transform(DataConfig(crop_mode="stretch"), *PLAIN, train=False)
    args = ["train", "--preset", "seed-s1-cnn-basic", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    r = subprocess.run(
        [sys.executable, "-m", "carspotter", *args, "--crop-mode", "stretch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "data.crop_mode" in r.stderr and "stretch" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_runs_and_indexes_carry_the_crop_mode_to_queries(tmp_path: Path, tiny_prepared: Path) -> None:
    from carspotter.engine.checkpoint import read_model_info
    from carspotter.retrieval.build import build_index_from_run
    from carspotter.retrieval.embed import embed_images
    from carspotter.retrieval.index import GalleryIndex
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    run = make_tiny_run(tmp_path / "run", crop_mode="squash")
    assert read_model_info(run).crop_mode == "squash"

    build_index_from_run(run, tiny_prepared, "train", out_dir=tmp_path / "ix", device="cpu")
    index = GalleryIndex.load(tmp_path / "ix")
    stored = json.loads((tmp_path / "ix" / "index.json").read_text())["preprocess"]
    assert stored["crop_mode"] == "squash"  # the run's, inside the one Preprocess

    k = 5
    photo = Image.open(tiny_prepared / index.meta[k]["path"]).convert("RGB")
    embedder = embedder_for_index(index, "cpu")
    same = embed_queries(index, embedder, [photo])  # what search, serve and the report grid call
    dist, ids = index.search(same, 1)
    assert int(ids[0, 0]) == k and float(dist[0, 0]) < 1e-4  # a gallery photo finds itself, exactly
    centre = dataclasses.replace(Preprocess.from_dict(stored), crop_mode="center")
    other = embed_images(embedder, [photo], preprocess=centre)
    assert float(np.abs(other - same).max()) > 1e-3  # so preprocessing the query differently would show
