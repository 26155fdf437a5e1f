"""Every Stanford Cars layout is detected and prepared with the right class names, ids, splits and counts.

All sources are built here: real .mat files (scipy.io.savemat, same struct fields as the devkit), Kaggle
CSVs and folders, class folders, parquet shards (pyarrow) and manifest CSVs.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from carspotter.data.layouts import LayoutError, detect, read_layout
from carspotter.data.manifest import class_names, read_manifest, split_records
from carspotter.data.prepare import prepare

NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]


def jpeg(path: Path, size: tuple[int, int] = (64, 48), colour: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40 * colour % 256, 90, 160)).save(path, "JPEG")
    return path


def jpeg_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def struct_array(rows: list[dict]) -> np.ndarray:
    """A MATLAB 1×N struct array in the devkit's own encoding (uint8/uint16 scalars, char arrays)."""
    arr = np.zeros((1, len(rows)), dtype=[(k, object) for k in rows[0]])
    for i, r in enumerate(rows):
        for k, v in r.items():
            arr[0, i][k] = np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16)
    return arr


def cell_array(strings: list[str]) -> np.ndarray:
    arr = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        arr[0, i] = np.array([s])
    return arr


def anno(fname: str, cid: int, with_class: bool = True) -> dict:
    row = {"bbox_x1": 8, "bbox_y1": 8, "bbox_x2": 40, "bbox_y2": 32}
    if with_class:
        row["class"] = cid
    row["fname"] = fname
    return row


def make_devkit(root: Path, test_labels: str = "withlabels") -> Path:
    """3 classes; train: 2 photos per class (cars_train/), test: 1 per class (cars_test/)."""
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell_array(NAMES)})
    train, test = [], []
    for c in range(3):
        for i in range(2):
            fname = f"{c * 2 + i + 1:05d}.jpg"
            jpeg(root / "cars_train" / fname, colour=c)
            train.append(anno(fname, c + 1))
        fname = f"{c + 1:05d}.jpg"  # test reuses the names 00001.jpg … as in the real devkit
        jpeg(root / "cars_test" / fname, colour=c)
        test.append(anno(fname, c + 1))
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(train)})
    if test_labels == "withlabels":
        scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": struct_array(test)})
    scipy.io.savemat(
        root / "devkit" / "cars_test_annos.mat",
        {"annotations": struct_array([{k: v for k, v in r.items() if k != "class"} for r in test])},
    )
    return root


def per_class(out: Path, split: str) -> dict[str, int]:
    recs = split_records(read_manifest(out), split)
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.class_name] = counts.get(r.class_name, 0) + 1
    return counts


def test_devkit_layout(tmp_path: Path) -> None:
    src = make_devkit(tmp_path / "src")
    assert detect(src)[0] == "devkit"
    s = prepare(src, tmp_path / "out", max_side=32, val_fraction=0, workers=1)
    recs = read_manifest(tmp_path / "out")
    assert class_names(recs) == NAMES  # ordered by official id
    assert s["counts"] == {"train": 6, "val": 0, "test": 3}
    assert per_class(tmp_path / "out", "test") == dict.fromkeys(NAMES, 1)
    first = next(r for r in recs if r.path == "images/train/00001.jpg")
    assert (first.class_name, first.source_id, first.label) == (NAMES[0], 1, 0)
    # 64×48 photo → 32×24: the box (8, 8, 40, 32) is scaled by 0.5 into prepared pixels.
    assert first.bbox == (4.0, 4.0, 20.0, 16.0)
    assert Image.open(tmp_path / "out" / first.path).size == (32, 24)
    assert {r.path for r in recs if r.split == "test"} == {f"images/test/{i:05d}.jpg" for i in (1, 2, 3)}


def test_devkit_without_test_labels_skips_test_with_a_hint(tmp_path: Path) -> None:
    src = make_devkit(tmp_path / "src", test_labels="none")
    _, _, read = read_layout(src)
    assert {it.split for it in read.items} == {"train"}
    assert any("cars_test_annos_withlabels.mat" in n and "no test labels" in n for n in read.notes)


def test_devkit_bad_annotation_files_are_named(tmp_path: Path) -> None:
    src = make_devkit(tmp_path / "src")
    (src / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(LayoutError, match=r"cars_train_annos\.mat"):
        read_layout(src)
    scipy.io.savemat(
        src / "devkit" / "cars_train_annos.mat", {"annotations": struct_array([anno("a.jpg", 1, False)])}
    )
    with pytest.raises(LayoutError, match=r"cars_train_annos.mat.*no field\(s\) \['class'\]"):
        read_layout(src)
    (src / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(LayoutError, match=r"cars_meta\.mat"):
        read_layout(src, "devkit")


def test_cars_annos_all_in_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rows = []
    for i in range(6):
        rel = f"car_ims/{i + 1:06d}.jpg"
        jpeg(src / rel, colour=i % 3)
        rows.append({"relative_im_path": rel, "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 30, "bbox_y2": 20,
                     "class": i % 3 + 1, "test": int(i >= 3)})  # fmt: skip
    scipy.io.savemat(
        src / "cars_annos.mat", {"annotations": struct_array(rows), "class_names": cell_array(NAMES)}
    )
    assert detect(src)[0] == "cars-annos"
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=1)
    assert s["counts"] == {"train": 3, "val": 0, "test": 3}
    assert class_names(read_manifest(tmp_path / "out")) == NAMES


def make_kaggle(root: Path, with_names: bool = True) -> Path:
    """names.csv + anno_{train,test}.csv (no header) + car_data/car_data/{train,test}/<class>/<fname>."""
    root.mkdir(parents=True)
    if with_names:
        (root / "names.csv").write_text("\n".join(NAMES) + "\n")
    for split, n in (("train", 2), ("test", 1)):
        with (root / f"anno_{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            k = 0
            for c, name in enumerate(NAMES):
                for _ in range(n):
                    k += 1
                    fname = f"{k:05d}.jpg"  # the same names in train and test, as on Kaggle
                    jpeg(root / "car_data" / "car_data" / split / name.replace("/", "-") / fname, colour=c)
                    w.writerow([fname, 8, 8, 40, 32, c + 1])
    return root


def test_kaggle_csv_layout(tmp_path: Path) -> None:
    src = make_kaggle(tmp_path / "src")
    assert detect(src)[0] == "kaggle-csv"
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=1)
    assert s["counts"] == {"train": 6, "val": 0, "test": 3}
    assert class_names(read_manifest(tmp_path / "out")) == NAMES
    assert per_class(tmp_path / "out", "train") == dict.fromkeys(NAMES, 2)
    assert s["n_with_bbox"] == 9


def test_kaggle_csv_without_names_is_a_clear_error(tmp_path: Path) -> None:
    src = make_kaggle(tmp_path / "src", with_names=False)
    with pytest.raises(LayoutError, match=r"names\.csv not found"):
        read_layout(src)
    (src / "names.csv").write_text("only one name\n")
    with pytest.raises(LayoutError, match=r"anno_train\.csv line 3: class 2 outside 1\.\.1"):
        read_layout(src)


def test_kaggle_folders_nested_one_level_too_deep(tmp_path: Path) -> None:
    src = make_kaggle(tmp_path / "src")
    nested = tmp_path / "extract" / "stanford-car-dataset"
    nested.mkdir(parents=True)
    (src / "car_data").rename(nested / "car_data")
    name, why = detect(tmp_path / "extract")
    assert name == "folders" and "car_data" in why
    s = prepare(tmp_path / "extract", tmp_path / "out", val_fraction=0, workers=1)
    assert s["counts"] == {"train": 6, "val": 0, "test": 3}
    # the folders spell "Ram C-V Cargo Van Minivan 2012"; prepare maps it back to the official "C/V" name
    assert sorted(class_names(read_manifest(tmp_path / "out"))) == sorted(NAMES)
    assert any("'Ram C-V Cargo Van Minivan 2012' → 'Ram C/V Cargo Van Minivan 2012'" in n for n in s["notes"])
    assert s["taxonomy"]["fallback"] == [] and s["taxonomy"]["n_makes"] == 3


def test_class_folders_with_val_and_single_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("Beta Car", "Alpha Car"):
            for i in range(n):
                jpeg(src / split / c / f"{i}.jpg")
    (src / "train" / "Alpha Car" / "notes.txt").write_text("ignored")
    s = prepare(src, tmp_path / "out", workers=1)
    assert s["counts"] == {"train": 6, "val": 2, "test": 4}  # the source's val is kept, none carved
    assert class_names(read_manifest(tmp_path / "out")) == ["Alpha Car", "Beta Car"]  # by name: no ids

    flat = tmp_path / "flat"
    for c in ("A", "B"):
        for i in range(5):
            jpeg(flat / c / f"{i}.jpg")
    assert detect(flat)[0] == "folders"
    s = prepare(flat, tmp_path / "out2", val_fraction=0.2, workers=1)
    assert s["counts"] == {"train": 8, "val": 2, "test": 0}


def hf_shard(path: Path, labels: list[int], names: list[str] | None, raw_bytes: bool = False) -> None:
    img = jpeg_bytes()
    if raw_bytes:
        col = pa.array([img] * len(labels), type=pa.binary())
    else:
        col = pa.array([{"bytes": img, "path": f"{i}.jpg"} for i in range(len(labels))])
    table = pa.table({"image": col, "label": pa.array(labels, type=pa.int64())})
    if names is not None:
        feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        meta = {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
        table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)  # several row groups: exercises the row lookup


def test_parquet_shards_with_hf_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hf_shard(src / "data" / "train-00000-of-00002.parquet", [0, 1, 2, 0], NAMES)
    hf_shard(src / "data" / "train-00001-of-00002.parquet", [1, 2], NAMES)
    hf_shard(src / "data" / "test-00000-of-00001.parquet", [2, 1, 0], NAMES)
    assert detect(src)[0] == "parquet"
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=1)
    assert s["counts"] == {"train": 6, "val": 0, "test": 3}
    recs = read_manifest(tmp_path / "out")
    assert class_names(recs) == NAMES
    assert all(Image.open(tmp_path / "out" / r.path).size == (40, 30) for r in recs)


def test_parquet_raw_bytes_with_names_file_or_ids(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hf_shard(src / "train.parquet", [0, 1, 1], None, raw_bytes=True)
    hf_shard(src / "test.parquet", [0, 1], None, raw_bytes=True)
    _, _, read = read_layout(src)
    assert {it.class_name for it in read.items} == {"class_0", "class_1"}
    (src / "classes.txt").write_text("First Car\nSecond Car\n")
    s = prepare(src, tmp_path / "out", val_fraction=0, workers=1)
    assert class_names(read_manifest(tmp_path / "out")) == ["First Car", "Second Car"]
    assert s["counts"]["test"] == 2


def test_hf_source_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LayoutError, match="Download the dataset's parquet files"):
        prepare("hf:someone/stanford_cars", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_csv_relative_paths_bbox_and_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    jpeg(src / "pics" / "a.jpg")
    jpeg(src / "pics" / "b.jpg")
    jpeg(tmp_path / "elsewhere" / "c.jpg")
    (src / "list.csv").write_text(
        "path,class_name,split,x1,y1,x2,y2\n"
        "pics/a.jpg,Car One,train,0,0,32,24\n"
        "pics/b.jpg,Car Two,test,,,,\n"
        f"{tmp_path / 'elsewhere' / 'c.jpg'},Car One,test,,,,\n"
        "pics/missing.jpg,Car Two,train,,,,\n"
    )
    assert detect(src / "list.csv")[0] == "manifest-csv"
    s = prepare(src / "list.csv", tmp_path / "out", val_fraction=0, workers=1)
    assert s["counts"] == {"train": 1, "val": 0, "test": 2}
    assert [x["reason"] for x in s["skipped"]] == ["missing file"]
    recs = read_manifest(tmp_path / "out")
    assert next(r for r in recs if r.class_name == "Car One" and r.split == "train").bbox == (0, 0, 32, 24)


def test_labels_csv_variant_keeps_fixed_split_and_ids(tmp_path: Path) -> None:
    """The benchmark copy's format: labels.csv (fname,class_id,class_name,split) with images/ beside it."""
    src = tmp_path / "small"
    rows = ["fname,class_id,class_name,split"]
    for i in range(12):
        cid = [14, 3][i % 2]
        jpeg(src / "images" / f"{i + 1:05d}.jpg")
        rows.append(f"{i + 1:05d}.jpg,{cid},{'Audi TTS Coupe 2012' if cid == 14 else 'Acura TL Sedan 2012'},"
                    f"{'train' if i < 8 else 'test'}")  # fmt: skip
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    assert detect(src)[0] == "manifest-csv"
    s = prepare(src, tmp_path / "out", val_fraction=0.25, workers=1)
    assert s["counts"] == {"train": 6, "val": 2, "test": 4}  # val carved from train only
    recs = read_manifest(tmp_path / "out")
    assert class_names(recs) == ["Acura TL Sedan 2012", "Audi TTS Coupe 2012"]  # by official id 3 < 14
    assert {r.source_id for r in recs} == {3, 14}
    assert next(r for r in recs if r.path.endswith("00001.jpg")).class_name == "Audi TTS Coupe 2012"


def test_unknown_layout_lists_what_each_layout_expects(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    with pytest.raises(LayoutError) as e:
        detect(tmp_path / "junk")
    for word in ("devkit", "cars-annos", "kaggle-csv", "folders", "parquet", "manifest-csv", "hf:"):
        assert word in str(e.value)
    with pytest.raises(LayoutError, match="does not exist"):
        detect(tmp_path / "nope")
