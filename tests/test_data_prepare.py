"""prepare(): broken files are reported (never a crash), splits and protocols, safe output handling, CLI."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.data.manifest import class_names, read_manifest, read_summary
from carspotter.data.prepare import carve_val, prepare
from carspotter.utils import OutputExistsError


def jpeg(path: Path, size: tuple[int, int] = (48, 36), colour: tuple[int, int, int] = (30, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


def bomb_png(path: Path, side: int = 30000) -> None:
    """A tiny file whose header claims side×side pixels: Pillow's bomb guard must refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def folders(root: Path, n_classes: int, per_class: int, split: str = "train") -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            jpeg(root / split / f"Class {c:02d}" / f"{c}_{i}.jpg", colour=(20 * c, 100, 50))
    return root


def test_bad_files_reported_by_name_and_good_ones_kept(tmp_path: Path) -> None:
    src = folders(tmp_path / "src", n_classes=2, per_class=35)  # 70 photos: the worker pool is used
    d = src / "train" / "Class 00"
    good = (d / "0_0.jpg").read_bytes()
    (d / "zero.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "text.jpg").write_text("I am not a photo\n")
    bomb_png(d / "bomb.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg", "JPEG")
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(d / "deep16.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.save(d / "palette_alpha.png", transparency=0)
    rot = Image.new("RGB", (40, 20), (255, 0, 0))
    rot.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rot.save(d / "rotated.jpg", "JPEG", exif=exif)

    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=2)
    reasons = {Path(x["file"]).name: x["reason"] for x in s["skipped"]}
    assert reasons == {
        "zero.jpg": "empty file",
        "truncated.jpg": "truncated image",
        "text.jpg": "not an image",
        "bomb.png": "too many pixels (decompression bomb)",
    }
    assert s["n_images"] == 70 + 4  # CMYK, 16-bit, palette+alpha and rotated photos are kept
    out = tmp_path / "out"
    paths = {Path(r.path).stem: out / r.path for r in read_manifest(out)}
    upright = Image.open(paths["rotated"])
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top after the rotation
    assert Image.open(paths["deep16"]).getpixel((5, 5))[0] > 100  # 16-bit scaled, not clipped or black
    assert Image.open(paths["palette_alpha"]).mode == "RGB"
    assert before == {p: p.stat().st_mtime_ns for p in src.rglob("*")}  # source untouched


def test_resize_keeps_aspect_and_crop_bbox(tmp_path: Path) -> None:
    src = tmp_path / "src"
    jpeg(src / "pics" / "a.jpg", size=(400, 200))
    jpeg(src / "pics" / "b.jpg", size=(100, 50))
    (src / "m.csv").write_text("path,class_name,x1,y1,x2,y2\npics/a.jpg,A,100,50,300,150\npics/b.jpg,B,,,,\n")
    prepare(src / "m.csv", tmp_path / "full", max_side=64, val_fraction=0, workers=1)
    recs = {r.class_name: r for r in read_manifest(tmp_path / "full")}
    assert Image.open(tmp_path / "full" / recs["A"].path).size == (64, 32)
    assert recs["A"].bbox == (16.0, 8.0, 48.0, 24.0)
    assert Image.open(tmp_path / "full" / recs["B"].path).size == (64, 32)
    prepare(src / "m.csv", tmp_path / "crop", max_side=64, crop_bbox=True, val_fraction=0, workers=1)
    recs = {r.class_name: r for r in read_manifest(tmp_path / "crop")}
    assert Image.open(tmp_path / "crop" / recs["A"].path).size == (64, 32)  # the 200×100 box, resized
    assert recs["A"].bbox is None


def test_boxes_for_another_resolution_are_dropped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rows = ["path,class_name,x1,y1,x2,y2"]
    for i in range(10):
        jpeg(src / f"{i}.jpg", size=(64, 48))
        rows.append(f"{i}.jpg,C{i % 2},{10 + i},20,{500 + i},300")  # boxes for the full-size originals
    (src / "manifest.csv").write_text("\n".join(rows) + "\n")
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=1)
    assert s["n_with_bbox"] == 0
    assert any("bounding boxes ignored" in n for n in s["notes"])


def test_retrieval_protocol_gives_disjoint_class_halves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rows = ["fname,class_id,class_name,split"]
    for cid in (10, 3, 7, 1, 12, 5):  # ids, not names, decide the order
        for i in range(6):
            jpeg(src / "images" / f"{cid}_{i}.jpg")
            rows.append(f"{cid}_{i}.jpg,{cid},Car {chr(ord('Z') - cid)},{'train' if i < 3 else 'test'}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    s = prepare(src, tmp_path / "out", protocol="retrieval", val_fraction=0.2, workers=1)
    recs = read_manifest(tmp_path / "out")
    ids = {split: {r.source_id for r in recs if r.split == split} for split in ("train", "val", "test")}
    assert ids["train"] == {1, 3, 5} and ids["val"] <= {1, 3, 5} and ids["test"] == {7, 10, 12}
    assert s["counts"]["test"] == 18 and s["counts"]["train"] + s["counts"]["val"] == 18
    assert s["classes_per_split"] == {"train": 3, "val": 3, "test": 3}


def test_val_carve_out_is_stratified_and_seeded() -> None:
    labels = [c for c in range(4) for _ in range(10)] + [4]  # class 4 has a single photo: stays train
    splits = ["train"] * len(labels)
    a = carve_val(labels, splits, 0.2, seed=0)
    assert a == carve_val(labels, splits, 0.2, seed=0)
    assert a != carve_val(labels, splits, 0.2, seed=1)
    for c in range(4):
        assert sum(1 for lab, s in zip(labels, a, strict=True) if lab == c and s == "val") == 2
    assert a[-1] == "train"
    assert carve_val(labels, ["test"] * len(labels), 0.5, seed=0) == ["test"] * len(labels)


def test_output_is_never_clobbered(tmp_path: Path) -> None:
    src = folders(tmp_path / "src", n_classes=2, per_class=3)
    out = tmp_path / "out"
    prepare(src, out, workers=1)
    digest = hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare(src, out, workers=1)
    assert hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest() == digest
    prepare(src, out, max_side=16, overwrite=True, workers=1)
    assert read_summary(out)["options"]["max_side"] == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a prepared dataset"):
        prepare(src, other, overwrite=True, workers=1)
    assert (other / "thesis.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="must not be the source folder"):
        prepare(src, src / "prepared", workers=1)


def test_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x.jpg").write_text("nope")
    (src / "b" / "y.jpg").write_text("nope")
    with pytest.raises(ValueError, match="none of the 2 photos could be decoded"):
        prepare(src, tmp_path / "out", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_prepare_inspect_detect(tmp_path: Path) -> None:
    src = folders(tmp_path / "src", n_classes=3, per_class=4)
    app = build_app()
    runner = CliRunner()
    r = runner.invoke(app, ["data", "detect", str(src)])
    assert r.exit_code == 0 and r.output.startswith("folders:")
    r = runner.invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--max-side", "32"])
    assert r.exit_code == 0, r.output
    assert "classes:  3" in r.output
    assert class_names(read_manifest(tmp_path / "out")) == ["Class 00", "Class 01", "Class 02"]
    r = runner.invoke(app, ["data", "inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "train" in r.output
    r = runner.invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "error:" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "o2"), "--layout", "devkit"])
    assert r.exit_code == 2 and "cars_meta.mat" in r.output
