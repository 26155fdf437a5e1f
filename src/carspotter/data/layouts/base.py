"""What every layout reader returns, plus small helpers the readers share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from carspotter.data.images import IMAGE_SUFFIXES

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "cars_train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "cars_test": "test",
}


class LayoutError(ValueError):
    """A source folder is not (or not completely) a layout we can read; the message names file and field."""


@dataclass(frozen=True)
class SourceItem:
    """One photo as the source describes it, before any decoding.

    `path` is an absolute file path, or `FILE.parquet#ROW` for an image embedded in a parquet shard
    (then `embedded` = (parquet file, image column, row index) tells the worker where the bytes are).
    `bbox` is (x1, y1, x2, y2) in the ORIGINAL photo's pixel coordinates.
    """

    path: str
    class_name: str
    source_id: int | None = None
    split: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    embedded: tuple[str, str, int] | None = None


@dataclass
class LayoutRead:
    """A reader's result: the items plus notes for the user (e.g. a split that had to be skipped)."""

    items: list[SourceItem]
    notes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(
        default_factory=list
    )  # files the annotations name but that are absent


def norm_split(value: object, where: str = "") -> str | None:
    """Map train/training/val/validation/test/… to train|val|test; empty → None."""
    s = str(value).strip().lower() if value is not None else ""
    if s in ("", "none", "nan"):
        return None
    if s not in SPLIT_ALIASES:
        raise LayoutError(f"{where}: split {value!r} is not one of train/val/test")
    return SPLIT_ALIASES[s]


def is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name.startswith("__")  # .DS_Store, __MACOSX


def is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p)


def image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Image-looking entries under `folder`, sorted, skipping hidden files and folders.

    An entry with an image name that is not a readable regular file (a dangling or looping symlink, a
    FIFO, a folder called `x.jpg`) is listed too, so the decode step reports it by name instead of it
    vanishing silently.
    """
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") or part.startswith("__") for part in rel):
            continue
        if is_image_name(p):
            out.append(p)
    return sorted(out)


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def descend_single(folder: Path, max_depth: int = 4) -> Path:
    """Follow chains of folders holding nothing but one sub-folder (zip extracts nest one level too deep)."""
    for _ in range(max_depth):
        kids = [p for p in folder.iterdir() if not is_hidden(p)]
        if len(kids) == 1 and kids[0].is_dir():
            folder = kids[0]
        else:
            break
    return folder


def find_file(root: Path, names: Iterable[str], max_depth: int = 2) -> Path | None:
    """First existing file among `names` in root or up to `max_depth` folder levels below (breadth first)."""
    names = list(names)
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            for n in names:
                if (d / n).is_file():
                    return d / n
        level = [s for d in level for s in subdirs(d)]
    return None


def find_dir(root: Path, names: Iterable[str], max_depth: int = 2) -> Path | None:
    names = list(names)
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            for n in names:
                if (d / n).is_dir():
                    return d / n
        level = [s for d in level for s in subdirs(d)]
    return None
