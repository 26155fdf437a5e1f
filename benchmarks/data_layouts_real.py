"""Check the layout readers against the REAL Stanford Cars files (not a unit test: it needs ../shared).

Builds, from the real photos and the real devkit .mat files, a devkit layout, a class-folder layout and a
Kaggle CSV layout (symlinks, nothing copied), plus a class-folder copy with broken files mixed in, prepares
each with `carspotter data prepare` and checks class names and counts agree.

    .venv/bin/python benchmarks/data_layouts_real.py ../shared/data/stanford-cars-small \\
        ../shared/data/stanford-cars-devkit /tmp/layouts-real
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import scipy.io
from PIL import Image


def run(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "carspotter", *args], capture_output=True, text=True)
    return time.perf_counter() - t0, p


def prepare(src: Path, out: Path, *extra: str) -> dict:
    wall, p = run("data", "prepare", str(src), "--out", str(out), "--overwrite", *extra)
    if p.returncode != 0:
        raise SystemExit(f"prepare {src} failed:\n{p.stderr}")
    s = json.loads((out / "summary.json").read_text())
    print(f"\n== {src.name}  ({wall:.1f} s wall)\n" + p.stdout)
    return s


def manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def folder_name(name: str) -> str:
    return name.replace("/", "-")  # "Ram C/V Cargo Van Minivan 2012" cannot be a folder name


def main(small: Path, devkit: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = small / "images"
    meta = scipy.io.loadmat(devkit / "cars_meta.mat", simplify_cells=True)["class_names"]
    annos = scipy.io.loadmat(devkit / "cars_train_annos.mat", simplify_cells=True)["annotations"]

    # 1. devkit layout: cars_train/ = the real photos, devkit/ = the real .mat files.
    dk = work / "src-devkit"
    (dk / "devkit").mkdir(parents=True)
    (dk / "cars_train").symlink_to(images.resolve())
    for f in (
        "cars_meta.mat",
        "cars_train_annos.mat",
        "cars_test_annos.mat",
        "cars_test_annos_withlabels.mat",
    ):
        (dk / "devkit" / f).symlink_to((devkit / f).resolve())
    s_dk = prepare(dk, work / "p-devkit")
    rows = {r["path"].split("/")[-1]: r for r in manifest(work / "p-devkit")}
    assert s_dk["n_classes"] == 196, s_dk["n_classes"]
    assert s_dk["counts"]["train"] + s_dk["counts"]["val"] == 8144, s_dk["counts"]
    assert rows["00001.jpg"]["class_name"] == "Audi TTS Coupe 2012", rows["00001.jpg"]
    print("devkit OK: 196 classes, 8,144 train(+val) photos, 00001.jpg = Audi TTS Coupe 2012")

    # 2. class folders train/<class>/.
    cf = work / "src-folders"
    for a in annos:
        d = cf / "train" / folder_name(meta[int(a["class"]) - 1])
        d.mkdir(parents=True, exist_ok=True)
        (d / a["fname"]).symlink_to((images / a["fname"]).resolve())
    s_cf = prepare(cf, work / "p-folders")

    # 3. Kaggle CSVs + car_data/car_data/train/<class>/ (names.csv, anno_train.csv without header).
    kg = work / "src-kaggle"
    kg.mkdir()
    (kg / "names.csv").write_text("\n".join(meta) + "\n")
    with (kg / "anno_train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        for a in annos:
            w.writerow([a["fname"], a["bbox_x1"], a["bbox_y1"], a["bbox_x2"], a["bbox_y2"], a["class"]])
    for a in annos:
        d = kg / "car_data" / "car_data" / "train" / folder_name(meta[int(a["class"]) - 1])
        d.mkdir(parents=True, exist_ok=True)
        (d / a["fname"]).symlink_to((images / a["fname"]).resolve())
    s_kg = prepare(kg, work / "p-kaggle")

    def names(s: dict) -> list[str]:
        return sorted(p["class_name"] for p in s["per_class"])

    def counts(s: dict) -> list[tuple[str, int]]:
        return sorted((p["class_name"], p["train"] + p["val"]) for p in s["per_class"])

    assert names(s_kg) == names(s_dk), "kaggle-csv class names differ from devkit"
    assert counts(s_kg) == counts(s_dk), "kaggle-csv counts differ from devkit"
    fold = sorted((folder_name(n), c) for n, c in counts(s_dk))
    assert counts(s_cf) == fold, "class-folder counts differ from devkit"
    print(
        "kaggle-csv and folders OK: same 196 class names (folders: '/' → '-') and per-class counts as devkit"
    )

    # 4. Broken files mixed into the class folders.
    d = cf / "train" / folder_name(meta[13])
    (d / "zero.jpg").write_bytes(b"")
    good = (images / "00001.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "text.jpg").write_text("this is not a photo\n")
    Image.open(images / "00001.jpg").convert("CMYK").save(d / "cmyk.jpg", "JPEG")
    s_bad = prepare(cf, work / "p-bad")
    bad = {Path(x["file"]).name: x["reason"] for x in s_bad["skipped"]}
    print("skipped:", bad)
    assert set(bad) == {"zero.jpg", "truncated.jpg", "text.jpg"}, bad
    assert s_bad["n_images"] == 8145, s_bad["n_images"]  # 8,144 + the CMYK photo
    print("bad files OK: zero-byte, truncated and text files reported; the CMYK JPEG kept")

    # 5. Retrieval protocol.
    s_rt = prepare(dk, work / "p-retrieval", "--protocol", "retrieval")
    cps = s_rt["classes_per_split"]
    assert (cps["train"], cps["test"]) == (98, 98), cps
    print("retrieval OK: 98 train classes (1-98) + 98 test classes (99-196)")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
