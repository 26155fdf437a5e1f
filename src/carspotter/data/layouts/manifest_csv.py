"""A CSV listing the photos: `path` (or `fname`), `class_name` or `label`, optional `split`, bbox, class id.

Paths are relative to the CSV's folder (or absolute); a bare file name is also looked up in an
`images/` folder beside the CSV. This covers hand-made manifests, our own prepared manifests and the
benchmark copy's `labels.csv` (`fname,class_id,class_name,split` with images/ beside it).
"""

from __future__ import annotations

import csv
from pathlib import Path

from carspotter.data.layouts.base import LayoutError, LayoutRead, SourceItem, norm_split

EXPECTS = (
    "manifest-csv: a CSV (or a folder with manifest.csv / labels.csv) with columns path|fname, "
    "class_name|label, optional split, x1,y1,x2,y2, class_id|source_id"
)
CSV_NAMES = ("manifest.csv", "labels.csv", "annotations.csv", "metadata.csv")
PATH_COLS = ("path", "fname", "filename", "file", "image", "image_path")
NAME_COLS = ("class_name", "label", "class")
ID_COLS = ("source_id", "class_id")


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [c.strip().lower() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []


def _pick(cols: list[str], options: tuple[str, ...]) -> str | None:
    return next((c for c in options if c in cols), None)


def find_csv(src: Path) -> Path | None:
    """`src` itself when it is a CSV with a path and a class column, else such a CSV inside `src`."""
    cands = [src] if src.is_file() else [src / n for n in CSV_NAMES]
    for p in cands:
        if p.is_file() and p.suffix.lower() == ".csv":
            cols = _header(p)
            if _pick(cols, PATH_COLS) and (_pick(cols, NAME_COLS) or _pick(cols, ID_COLS)):
                return p
    return None


def header_problem(path: Path) -> str:
    """Why the CSV at `path` is not a manifest, naming the columns it has and the ones it lacks."""
    cols = _header(path)
    if not cols:
        return f"{path}: no header row (or not readable as UTF-8 CSV)"
    lacks = [
        f"a {what} column (one of {', '.join(opts)})"
        for what, opts, ok in (
            ("path", PATH_COLS, _pick(cols, PATH_COLS)),
            ("class", NAME_COLS + ID_COLS, _pick(cols, NAME_COLS) or _pick(cols, ID_COLS)),
        )
        if not ok
    ]
    return f"{path}: not a manifest CSV: its header {cols} lacks " + " and ".join(lacks)


def detect(src: Path) -> str | None:
    p = find_csv(src)
    if p is None:
        return None
    cols = _header(p)
    return f"CSV {p.name} with columns {cols}"


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    if p.is_absolute():
        return p
    cand = base / p
    if not cand.exists() and (base / "images" / p).exists():
        cand = base / "images" / p
    return cand


def read(src: Path) -> LayoutRead:
    path = find_csv(src)
    if path is None:
        if src.is_file():
            raise LayoutError(header_problem(src))
        raise LayoutError(f"{src}: no manifest CSV ({', '.join(CSV_NAMES)}) with path and class columns")
    base = path.parent
    out = LayoutRead(items=[])
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
        cols = reader.fieldnames
        pcol, ncol, icol = _pick(cols, PATH_COLS), _pick(cols, NAME_COLS), _pick(cols, ID_COLS)
        has_bbox = all(c in cols for c in ("x1", "y1", "x2", "y2"))
        assert pcol is not None
        for line, row in enumerate(reader, start=2):
            where = f"{path} line {line}"
            value = (row.get(pcol) or "").strip()
            if not value:
                raise LayoutError(f"{where}: empty {pcol!r}")
            sid = None
            if icol and (row.get(icol) or "").strip():
                try:
                    sid = int(float(row[icol]))
                except ValueError:
                    raise LayoutError(f"{where}: {icol} {row[icol]!r} is not an integer") from None
            name = (row.get(ncol) or "").strip() if ncol else ""
            if ncol in ("label", "class") and name.lstrip("-").isdigit() and "class_name" not in cols:
                # A numeric label with no name: keep the number as the class id.
                sid = sid if sid is not None else int(name)
                name = f"class_{int(name)}"
            if not name:
                if sid is None:
                    raise LayoutError(f"{where}: no class ({ncol or icol} is empty)")
                name = f"class_{sid}"
            bbox = None
            if has_bbox and all((row.get(c) or "").strip() for c in ("x1", "y1", "x2", "y2")):
                try:
                    bbox = tuple(float(row[c]) for c in ("x1", "y1", "x2", "y2"))
                except ValueError:
                    raise LayoutError(f"{where}: bounding box x1,y1,x2,y2 is not numeric") from None
            split = norm_split(row.get("split"), where) if "split" in cols else None
            p = _resolve(base, value)
            if not p.is_file():
                out.skipped.append(
                    {"file": str(p), "reason": "missing file", "detail": f"listed in {path.name}"}
                )
                continue
            out.items.append(SourceItem(str(p.absolute()), name, sid, split, bbox))  # type: ignore[arg-type]
    if not out.items and not out.skipped:
        raise LayoutError(f"{path}: has no rows")
    return out
