"""Class folders: `train/<class>/*`, `test/<class>/*` (optionally `val/`), or one folder of class folders.

Also the Kaggle folder re-packs (`car_data/car_data/train/<class name>/*.jpg`): chains of single
folders are followed down, and a split folder nested in a same-named folder (`train/train/…`) is unwrapped.
"""

from __future__ import annotations

from pathlib import Path

from carspotter.data.layouts.base import (
    SPLIT_ALIASES,
    LayoutError,
    LayoutRead,
    SourceItem,
    image_files,
    is_hidden,
    is_image_name,
    subdirs,
)

EXPECTS = (
    "folders: train/<class>/*.jpg and test/<class>/*.jpg (optionally val/), or a folder of <class>/ folders "
    "(all train); Kaggle re-packs car_data/car_data/train/<class>/ too"
)


def _has_image(folder: Path) -> bool:
    return any(p.is_file() and is_image_name(p) for p in folder.rglob("*"))


def _unwrap(d: Path) -> Path:
    """train/train/<classes> → train/<classes> (a zip extracted into a same-named folder)."""
    kids = subdirs(d)
    while len(kids) == 1 and kids[0].name.lower() == d.name.lower():
        d = kids[0]
        kids = subdirs(d)
    return d


def _classes(d: Path) -> list[Path]:
    return [c for c in subdirs(d) if _has_image(c)]


def find_root(src: Path) -> tuple[Path, dict[str, Path]] | None:
    """(root, {split: folder}) — split "" means a plain folder of class folders."""
    root = src
    for _ in range(4):  # car_data/car_data/… : follow lone folders down, but stop at a split folder
        kids = [p for p in root.iterdir() if not is_hidden(p)]
        if len(kids) != 1 or not kids[0].is_dir() or kids[0].name.lower() in SPLIT_ALIASES:
            break
        root = kids[0]
    splits = {}
    for d in subdirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split and split not in splits:
            d = _unwrap(d)
            if _classes(d):
                splits[split] = d
    if splits:
        return root, splits
    if len(_classes(root)) >= 2:
        return root, {"": root}
    return None


def detect(src: Path) -> str | None:
    found = find_root(src)
    if found is None:
        return None
    root, splits = found
    where = "" if root == src else f" under {root.relative_to(src)}/"
    if "" in splits:
        return f"a folder of {len(_classes(root))} class folders{where} (all used as train)"
    parts = ", ".join(f"{d.relative_to(root)}/ ({len(_classes(d))} classes)" for d in splits.values())
    return f"class folders {parts}{where}"


def read(src: Path) -> LayoutRead:
    found = find_root(src)
    if found is None:
        raise LayoutError(f"{src}: no class folders found (expected train/<class>/*.jpg or <class>/*.jpg)")
    _root, splits = found
    out = LayoutRead(items=[])
    for split, d in splits.items():
        for cdir in _classes(d):
            for p in image_files(cdir):
                out.items.append(SourceItem(str(p.absolute()), cdir.name.strip(), None, split or None))
    if "" in splits:
        out.notes.append(
            "no split folders: every photo is train (prepare carves val out of it; there is no test split)"
        )
    return out
