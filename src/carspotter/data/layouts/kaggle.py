"""The Kaggle CSV layout: `names.csv` (one class name per line, no header) + `anno_train.csv` /
`anno_test.csv` (`fname,x1,y1,x2,y2,class`, no header, class 1-based) + the photos somewhere below
(usually `car_data/car_data/{train,test}/<class name>/<fname>`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from carspotter.data.layouts.base import (
    SPLIT_ALIASES,
    LayoutError,
    LayoutRead,
    SourceItem,
    find_file,
    image_files,
)

EXPECTS = "kaggle-csv: names.csv + anno_train.csv (+ anno_test.csv) with the photos in folders below them"
NAMES = ("names.csv", "class_names.csv", "names.txt")
ANNOS = {"train": ("anno_train.csv", "annos_train.csv"), "test": ("anno_test.csv", "annos_test.csv")}


def detect(src: Path) -> str | None:
    names = find_file(src, NAMES, max_depth=1)
    train = find_file(src, ANNOS["train"], max_depth=1)
    if train is None:
        return None
    if names is None:
        return f"{train.relative_to(src)} (but no names.csv beside it)"
    return f"Kaggle CSVs {names.relative_to(src)} and {train.relative_to(src)}"


def read_names(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: cannot read class names ({e})") from None
    names = [ln.strip().strip('"').strip() for ln in lines if ln.strip()]
    if not names:
        raise LayoutError(f"{path}: no class names in it")
    return names


def read_annos(path: Path, n_classes: int) -> list[tuple[str, tuple[float, float, float, float], int]]:
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 6:
                raise LayoutError(
                    f"{path} line {line}: expected fname,x1,y1,x2,y2,class; got {len(row)} fields"
                )
            try:
                bbox = tuple(float(v) for v in row[1:5])
                cid = int(row[5])
            except ValueError:
                if line == 1:
                    continue  # a header row
                raise LayoutError(
                    f"{path} line {line}: x1,y1,x2,y2,class must be numbers; got {row[1:]}"
                ) from None
            if not 1 <= cid <= n_classes:
                raise LayoutError(f"{path} line {line}: class {cid} outside 1..{n_classes} (names file)")
            rows.append((row[0].strip(), bbox, cid))
    return rows  # type: ignore[return-value]


def _pick(cands: list[Path], split: str, base: Path) -> Path | None:
    """The one candidate in a folder named for `split`, else the only one not in another split's folder."""

    def split_of(p: Path) -> set[str]:
        return {
            SPLIT_ALIASES[q.lower()] for q in p.relative_to(base).parts[:-1] if q.lower() in SPLIT_ALIASES
        }

    inside = [p for p in cands if split in split_of(p)]
    if len(inside) == 1:
        return inside[0]
    neutral = [p for p in cands if not split_of(p)]
    return neutral[0] if len(neutral) == 1 and not inside else None


def read(src: Path) -> LayoutRead:
    train = find_file(src, ANNOS["train"], max_depth=1)
    if train is None:
        raise LayoutError(f"{src}: anno_train.csv not found")
    base = train.parent
    names_file = find_file(base, NAMES, max_depth=1) or find_file(src, NAMES, max_depth=1)
    if names_file is None:
        raise LayoutError(f"{src}: names.csv not found (the class names, one per line, beside {train.name})")
    names = read_names(names_file)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for p in image_files(base):
        by_name[p.name].append(p)
    out = LayoutRead(items=[])
    for split, options in ANNOS.items():
        annos = find_file(base, options, max_depth=0)
        if annos is None:
            if split == "test":
                out.notes.append(f"test split skipped: no anno_test.csv in {base}")
            continue
        for fname, bbox, cid in read_annos(annos, len(names)):
            p = _pick(by_name.get(Path(fname).name, []), split, base)
            if p is None:
                n = len(by_name.get(Path(fname).name, []))
                reason = "missing file" if n == 0 else f"ambiguous: {n} files with this name"
                out.skipped.append({"file": fname, "reason": reason, "detail": f"listed in {annos.name}"})
                continue
            out.items.append(SourceItem(str(p.absolute()), names[cid - 1], cid, split, bbox))
    return out
