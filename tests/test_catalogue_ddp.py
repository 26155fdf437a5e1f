"""`carspotter index --nproc 2` and `carspotter enrol --nproc 2` (torchrun, gloo on CPU): each rank embeds
its shard, rank 0 writes; the index must hold the same rows and vectors as a single process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carspotter.retrieval.build import build_index_from_run
from carspotter.retrieval.catalogue import enrol, photos_from_paths
from carspotter.retrieval.index import GalleryIndex
from carspotter.retrieval.open_classify import stored_vectors
from conftest import make_tiny_prepared, make_tiny_run


def contents(index_dir: Path) -> tuple[list[dict], np.ndarray]:
    idx = GalleryIndex.load(index_dir)
    return idx.meta, stored_vectors(idx)


@pytest.mark.slow
def test_two_gloo_processes_build_and_enrol_the_same_index(tmp_path: Path) -> None:
    data = make_tiny_prepared(tmp_path / "data", n_classes=5, per_class=7)  # 15 train photos: odd shards
    run = make_tiny_run(tmp_path / "run", n_classes=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cs = [sys.executable, "-m", "carspotter"]

    build_index_from_run(run, data, "train", "cosine", "HNSW8", tmp_path / "one", device="cpu")
    res = subprocess.run([*cs, "index", str(run), "--data", str(data), "--split", "train", "--metric", "cosine",
                          "--index-type", "HNSW8", "--out", str(tmp_path / "two"), "--device", "cpu", "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("indexed 15 photos") == 1  # rank 0 alone reports (and writes)
    m1, v1 = contents(tmp_path / "one")
    m2, v2 = contents(tmp_path / "two")
    assert m1 == m2 and len(m1) == 15
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)

    new = tmp_path / "new"  # 2 classes × 3 photos from the val/test photos: 6 photos over 2 ranks
    for c in (3, 4):
        (new / f"Enrolled {c}").mkdir(parents=True)
        for i in range(4, 7):
            shutil.copy(data / "images" / f"c{c}_{i:03d}.jpg", new / f"Enrolled {c}" / f"{i}.jpg")
    shutil.copytree(tmp_path / "one", tmp_path / "enrol1")
    enrol(tmp_path / "enrol1", photos_from_paths(None, [new]))
    shutil.copytree(tmp_path / "one", tmp_path / "enrol2")
    res = subprocess.run([*cs, "enrol", str(tmp_path / "enrol2"), str(new), "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("enrolled 3 photo(s) as 'Enrolled 3' (new class)") == 1
    m1, v1 = contents(tmp_path / "enrol1")
    m2, v2 = contents(tmp_path / "enrol2")
    assert m1 == m2 and len(m1) == 21 and m1[-1]["class_name"] == "Enrolled 4"
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "enrol2" / "enrolled").iterdir()) == sorted(
        p.name for p in (tmp_path / "enrol1" / "enrolled").iterdir()
    )
