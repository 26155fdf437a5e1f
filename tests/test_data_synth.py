"""The synthetic fine-grained dataset: prepared format, determinism per seed, fine-grained class design."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.data.dataset import PreparedDataset
from carspotter.data.manifest import class_names, read_manifest, read_summary
from carspotter.data.synth import class_catalogue, make_synthetic
from carspotter.utils import OutputExistsError


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "summary.json":  # the summary holds a wall time
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_a_prepared_dataset(tmp_path: Path) -> None:
    s = make_synthetic(tmp_path / "syn", classes=6, per_class=10, size=48, seed=0)
    recs = read_manifest(tmp_path / "syn")
    names = class_names(recs)
    assert len(names) == 6 == len(set(names)) and names[0].startswith("Synthetic Sedan A")
    assert s["counts"] == {"train": 42, "val": 6, "test": 12}
    assert read_summary(tmp_path / "syn")["n_classes"] == 6
    ds = PreparedDataset(tmp_path / "syn", "train")
    img = ds.load_image(0)
    assert img.size == (48, 48)
    for r in recs:
        x1, y1, x2, y2 = r.bbox
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48


def test_synthetic_is_deterministic_per_seed(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", classes=4, per_class=5, size=32, seed=3)
    make_synthetic(tmp_path / "b", classes=4, per_class=5, size=32, seed=3)
    make_synthetic(tmp_path / "c", classes=4, per_class=5, size=32, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    with pytest.raises(OutputExistsError):
        make_synthetic(tmp_path / "a", classes=4, per_class=5, size=32, seed=3)


def test_classes_are_fine_grained_combinations_of_traits() -> None:
    cats = class_catalogue(24)
    traits = [
        (c.body, c.length, c.wheel, c.wheelbase, c.windows, c.headlight, c.taillight, c.spoiler, c.spokes)
        for c in cats
    ]
    assert len(set(traits)) == 24 and len({c.name for c in cats}) == 24
    sedans = [t for t in traits if t[0] == "Sedan"]
    assert len(sedans) == 4  # several classes share a body style and differ only in details
    assert class_catalogue(24) == cats  # class definitions do not depend on any seed


def test_cli_synth(tmp_path: Path) -> None:
    args = [
        "data",
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--classes",
        "3",
        "--per-class",
        "4",
        "--size",
        "32",
    ]
    r = CliRunner().invoke(build_app(), args)
    assert r.exit_code == 0, r.output
    assert len(read_manifest(tmp_path / "s")) == 12


def test_synthetic_box_is_the_drawn_vehicle() -> None:
    """The recorded box is the known truth for localisation checks: it holds every pixel drawn for the
    vehicle (pillars, arches, spoiler included) and no slack, per side, within a pixel."""
    from PIL import Image, ImageDraw

    from carspotter.data.synth import _draw_car

    s = 96
    for k, c in enumerate(class_catalogue(12)):
        for i in range(3):
            rng = np.random.default_rng([0, k, i])
            img = Image.new("RGB", (s, s))  # black canvas: any non-black pixel was drawn for the car
            box = [
                min(max(v, 0), s)
                for v in _draw_car(ImageDraw.Draw(img), c, rng, s, rng.uniform(0.35, 0.7) * s)
            ]
            ys, xs = np.nonzero(np.asarray(img).max(-1) > 0)
            drawn = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.allclose(box, drawn, atol=1.0), (c.name, i, box, drawn)
