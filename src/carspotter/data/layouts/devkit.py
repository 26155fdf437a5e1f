"""The official devkit layouts (MATLAB .mat annotations).

`devkit` (what torchvision's StanfordCars expects):
    cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat (in devkit/ or the root)
`cars-annos` (the all-in-one release):
    car_ims/*.jpg + cars_annos.mat (relative_im_path, bbox_x1..bbox_y2, class, test; class_names)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carspotter.data.layouts.base import LayoutError, LayoutRead, SourceItem, find_dir, find_file

EXPECTS_DEVKIT = (
    "devkit: cars_train/ (+ cars_test/) with devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
    "cars_test_annos_withlabels.mat (torchvision's StanfordCars layout)"
)
EXPECTS_CARS_ANNOS = "cars-annos: car_ims/ + cars_annos.mat (the all-in-one release)"

WITHLABELS_HINT = (
    "the devkit's own cars_test_annos.mat has no class labels. Get cars_test_annos_withlabels.mat "
    "(published with the Stanford Cars test labels; mirrored with torchvision's StanfordCars layout, e.g. on "
    "Kaggle) and put it in SRC or SRC/devkit/"
)


def load_mat(path: Path) -> dict[str, Any]:
    """scipy.io.loadmat with MATLAB structs turned into dicts/lists, errors naming the file."""
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), simplify_cells=True)
    except NotImplementedError:
        raise LayoutError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save as v7") from None
    except Exception as e:
        raise LayoutError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None


def mat_records(path: Path, var: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The struct array `var` as a list of dicts, checking the fields we need exist."""
    m = load_mat(path)
    if var not in m:
        found = [k for k in m if not k.startswith("__")]
        raise LayoutError(f"{path}: no variable {var!r} (found {found})")
    recs = m[var]
    if isinstance(recs, dict):  # a 1×1 struct array collapses to one dict
        recs = [recs]
    elif isinstance(recs, np.ndarray):
        recs = list(recs.ravel())
    if not recs or not isinstance(recs[0], dict):
        raise LayoutError(f"{path}: {var!r} is not a struct array")
    missing = [f for f in fields if f not in recs[0]]
    if missing:
        raise LayoutError(f"{path}: {var!r} has no field(s) {missing}; fields: {sorted(recs[0])}")
    return recs


def class_names_from(path: Path, var: str = "class_names") -> list[str]:
    m = load_mat(path)
    if var not in m:
        raise LayoutError(f"{path}: no variable {var!r} (found {[k for k in m if not k.startswith('__')]})")
    names = m[var]
    names = [names] if isinstance(names, str) else list(np.asarray(names, dtype=object).ravel())
    return [str(n).strip() for n in names]


def _bbox(r: dict[str, Any]) -> tuple[float, float, float, float] | None:
    try:
        return tuple(float(r[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        return None


def _class_id(r: dict[str, Any], path: Path, i: int, n_classes: int) -> int:
    try:
        cid = int(r["class"])
    except (TypeError, ValueError):
        raise LayoutError(f"{path}: record {i + 1}: class {r['class']!r} is not an integer") from None
    if not 1 <= cid <= n_classes:
        raise LayoutError(f"{path}: record {i + 1}: class {cid} outside 1..{n_classes} (cars_meta.mat)")
    return cid


def _image_dir(root: Path, name: str) -> Path | None:
    """cars_train/ — or cars_train/cars_train/ as some mirrors pack it."""
    d = find_dir(root, [name], max_depth=1)
    if d is not None and (d / name).is_dir() and not any(d.glob("*.jpg")):
        d = d / name
    return d


def detect_devkit(root: Path) -> str | None:
    meta = find_file(root, ["cars_meta.mat"], max_depth=2)
    train = find_file(root, ["cars_train_annos.mat"], max_depth=2)
    if meta is None or train is None:
        return None
    return f"devkit annotations {meta.relative_to(root)} and {train.relative_to(root)}"


def read_devkit(root: Path) -> LayoutRead:
    meta = find_file(root, ["cars_meta.mat"], max_depth=2)
    train_annos = find_file(root, ["cars_train_annos.mat"], max_depth=2)
    if meta is None:
        raise LayoutError(f"{root}: devkit/cars_meta.mat not found (it holds the 196 class names)")
    if train_annos is None:
        raise LayoutError(f"{root}: devkit/cars_train_annos.mat not found")
    names = class_names_from(meta)
    base = meta.parent.parent if meta.parent.name == "devkit" else meta.parent
    out = LayoutRead(items=[])
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")

    test_annos = find_file(root, ["cars_test_annos_withlabels.mat"], max_depth=2)
    splits: list[tuple[str, Path | None, str]] = [("train", train_annos, "cars_train")]
    if test_annos is None:
        plain = find_file(root, ["cars_test_annos.mat"], max_depth=2)
        where = f" ({plain.relative_to(root)})" if plain else ""
        out.notes.append(f"test split skipped: no test labels — {WITHLABELS_HINT}{where}")
    else:
        splits.append(("test", test_annos, "cars_test"))

    for split, annos, folder in splits:
        assert annos is not None
        recs = mat_records(annos, "annotations", fields)
        img_dir = _image_dir(base, folder) or _image_dir(root, folder)
        if img_dir is None:
            out.notes.append(
                f"{split} split skipped: {annos.name} lists {len(recs)} photos but there is no {folder}/"
            )
            continue
        for i, r in enumerate(recs):
            cid = _class_id(r, annos, i, len(names))
            p = img_dir / str(r["fname"]).strip()
            if not p.is_file():
                out.skipped.append(
                    {"file": str(p), "reason": "missing file", "detail": f"listed in {annos.name}"}
                )
                continue
            out.items.append(SourceItem(str(p), names[cid - 1], cid, split, _bbox(r)))
    return out


def detect_cars_annos(root: Path) -> str | None:
    annos = find_file(root, ["cars_annos.mat"], max_depth=1)
    if annos is None:
        return None
    return f"all-in-one annotations {annos.relative_to(root)}"


def read_cars_annos(root: Path) -> LayoutRead:
    annos = find_file(root, ["cars_annos.mat"], max_depth=1)
    if annos is None:
        raise LayoutError(f"{root}: cars_annos.mat not found")
    m = load_mat(annos)
    if "class_names" in m:
        names = class_names_from(annos)
    else:
        meta = find_file(root, ["cars_meta.mat"], max_depth=2)
        if meta is None:
            raise LayoutError(f"{annos}: has no 'class_names' and no cars_meta.mat was found beside it")
        names = class_names_from(meta)
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    recs = mat_records(annos, "annotations", fields)
    out = LayoutRead(items=[])
    base = annos.parent
    for i, r in enumerate(recs):
        cid = _class_id(r, annos, i, len(names))
        rel = str(r["relative_im_path"]).strip()
        p = base / rel
        if not p.is_file() and (base / "car_ims" / Path(rel).name).is_file():
            p = base / "car_ims" / Path(rel).name
        if not p.is_file():
            out.skipped.append(
                {"file": str(p), "reason": "missing file", "detail": f"listed in {annos.name}"}
            )
            continue
        split = "test" if int(r["test"]) else "train"
        out.items.append(SourceItem(str(p), names[cid - 1], cid, split, _bbox(r)))
    return out
