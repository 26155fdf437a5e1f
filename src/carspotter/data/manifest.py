"""The prepared-dataset contract: `DIR/manifest.csv` + `DIR/images/` + `DIR/summary.json`.

Everything downstream of `data prepare` reads a prepared directory through this module only, so no
other code knows which Stanford Cars layout the photos came from.

manifest.csv columns: path,label,class_name,split[,x1,y1,x2,y2][,source_id]
  - path: relative to the prepared directory (e.g. images/train/00001.jpg)
  - label: 0-based contiguous class index; class_name: the source's name for it
  - split: train | val | test
  - x1..y1: optional bounding box in the *prepared* image's pixel coordinates
  - source_id: optional original class id (e.g. the official 1-based Stanford Cars id)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carspotter.utils import atomic_write_json, atomic_write_text

MANIFEST = "manifest.csv"
SUMMARY = "summary.json"
SPLITS = ("train", "val", "test")
REQUIRED = ("path", "label", "class_name", "split")
BBOX = ("x1", "y1", "x2", "y2")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or inconsistent; the message names the file, row and field."""


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    class_name: str
    split: str
    bbox: tuple[float, float, float, float] | None = None
    source_id: int | None = None


def write_manifest(root: Path, records: list[Record]) -> Path:
    has_bbox = any(r.bbox is not None for r in records)
    has_src = any(r.source_id is not None for r in records)
    cols = list(REQUIRED) + (list(BBOX) if has_bbox else []) + (["source_id"] if has_src else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in records:
        row: list[Any] = [r.path, r.label, r.class_name, r.split]
        if has_bbox:
            row += list(r.bbox) if r.bbox is not None else ["", "", "", ""]
        if has_src:
            row.append("" if r.source_id is None else r.source_id)
        w.writerow(row)
    out = Path(root) / MANIFEST
    atomic_write_text(out, buf.getvalue())
    return out


def read_manifest(root: str | Path) -> list[Record]:
    """Read and validate `root/manifest.csv`."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest.csv — is {root} a prepared dataset? "
            "Make one with `carspotter data prepare SRC --out DIR` or `carspotter data synth --out DIR`."
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; found {cols}")
        has_bbox = all(c in cols for c in BBOX)
        records = []
        for i, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise ManifestError(f"{path} line {i}: label {row['label']!r} is not an integer") from None
            if row["split"] not in SPLITS:
                raise ManifestError(f"{path} line {i}: split {row['split']!r} is not one of {SPLITS}")
            bbox = None
            if has_bbox and all(row.get(c) not in (None, "") for c in BBOX):
                try:
                    bbox = tuple(float(row[c]) for c in BBOX)  # type: ignore[assignment]
                except ValueError:
                    raise ManifestError(f"{path} line {i}: bounding box is not numeric") from None
            sid = row.get("source_id")
            records.append(
                Record(
                    path=row["path"],
                    label=label,
                    class_name=row["class_name"],
                    split=row["split"],
                    bbox=bbox,
                    source_id=int(sid) if sid not in (None, "") else None,
                )
            )
    if not records:
        raise ManifestError(f"{path}: has no rows")
    return records


def class_names(records: list[Record]) -> list[str]:
    """Class names indexed by label; checks labels are contiguous and each maps to one name."""
    names: dict[int, str] = {}
    for r in records:
        if names.setdefault(r.label, r.class_name) != r.class_name:
            raise ManifestError(
                f"label {r.label} has two class names: {names[r.label]!r} and {r.class_name!r}"
            )
    n = max(names) + 1
    if sorted(names) != list(range(n)):
        raise ManifestError(f"labels are not contiguous 0..{n - 1}")
    return [names[i] for i in range(n)]


def split_records(records: list[Record], split: str) -> list[Record]:
    if split == "all":
        return list(records)
    return [r for r in records if r.split == split]


def write_summary(root: Path, summary: dict[str, Any]) -> Path:
    out = Path(root) / SUMMARY
    atomic_write_json(out, summary)
    return out


def read_summary(root: str | Path) -> dict[str, Any]:
    p = Path(root) / SUMMARY
    return json.loads(p.read_text()) if p.is_file() else {}
