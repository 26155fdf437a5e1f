"""Hugging Face style parquet shards: `*.parquet` with an image column and an integer label column.

Class names come from the `datasets` features metadata stored in the parquet schema (ClassLabel names),
else from a `classes.txt` / `names.txt` / `names.csv` beside the shards (line i = label i), else `class_<id>`.
The split comes from the file (or folder) name: `train-00000-of-00002.parquet`, `test.parquet`, `train/…`.
Image bytes stay in the shards until a prepare worker reads them (`read_cell`), one row group at a time.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from carspotter.data.layouts.base import SPLIT_ALIASES, LayoutError, LayoutRead, SourceItem

EXPECTS = "parquet: *.parquet shards (Hugging Face export) with an image column and a label column"
EXPECTS_HF = "hf:REPO_ID: a Hugging Face dataset id, downloaded with `datasets` (needs network)"
LABEL_COLS = ("label", "labels", "class", "class_id", "target", "class_name")
NAME_FILES = ("classes.txt", "names.txt", "names.csv", "class_names.txt")


def shards(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*.parquet") if not p.name.startswith("."))


def detect(src: Path) -> str | None:
    files = shards(src)
    if not files:
        return None
    return f"{len(files)} parquet shard(s), e.g. {files[0].relative_to(src)}"


def _split_of(path: Path, src: Path) -> str | None:
    for part in [*re.split(r"[-_.]", path.stem), *reversed(path.relative_to(src).parts[:-1])]:
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None


def _hf_features(schema: Any) -> dict[str, Any]:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


def _columns(schema: Any, feats: dict[str, Any], path: Path) -> tuple[str, str]:
    import pyarrow as pa

    image = next((n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == "Image"), None)
    if image is None:
        for field in schema:
            t = field.type
            if (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0) or pa.types.is_binary(t):
                image = field.name
                break
    label = next(
        (n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None
    )
    if label is None:
        label = next((c for c in LABEL_COLS if c in schema.names), None)
    if image is None or label is None:
        raise LayoutError(
            f"{path}: needs an image column (struct with 'bytes', or binary) and a label column "
            f"{LABEL_COLS}; found columns {schema.names}"
        )
    return image, label


def _names_file(src: Path) -> list[str] | None:
    for n in NAME_FILES:
        p = src / n
        if p.is_file():
            return [
                ln.strip().strip('"') for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()
            ]
    return None


def read(src: Path) -> LayoutRead:
    import pyarrow.parquet as pq

    files = shards(src)
    if not files:
        raise LayoutError(f"{src}: no *.parquet files")
    out = LayoutRead(items=[])
    file_names = _names_file(src)
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise LayoutError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
        feats = _hf_features(pf.schema_arrow)
        image_col, label_col = _columns(pf.schema_arrow, feats, f)
        names = (feats.get(label_col) or {}).get("names") or file_names
        labels = pf.read(columns=[label_col]).column(label_col).to_pylist()
        split = _split_of(f, src)
        for row, lab in enumerate(labels):
            where = f"{f.name}#{row}"
            if lab is None:
                out.skipped.append({"file": where, "reason": "no label", "detail": f"column {label_col!r}"})
                continue
            if isinstance(lab, str):
                name, sid = lab.strip(), None
            else:
                sid = int(lab)
                if names is not None and not 0 <= sid < len(names):
                    raise LayoutError(f"{where}: label {sid} outside the {len(names)} class names")
                name = names[sid] if names is not None else f"class_{sid}"
            out.items.append(SourceItem(where, name, sid, split, None, (str(f), image_col, row)))
    if file_names is None and not any(feats.get(c, {}).get("names") for c in feats):
        out.notes.append(f"no class names found (features metadata or {NAME_FILES[0]}): using class_<id>")
    return out


@lru_cache(maxsize=8)
def _row_groups(path: str) -> list[int]:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    starts, n = [], 0
    for i in range(md.num_row_groups):
        starts.append(n)
        n += md.row_group(i).num_rows
    return starts


@lru_cache(maxsize=4)
def _group_column(path: str, column: str, group: int) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


def read_cell(path: str, column: str, row: int) -> bytes:
    """The image bytes of one row (an HF Image struct {bytes, path}, or a plain binary cell)."""
    import bisect

    starts = _row_groups(path)
    g = bisect.bisect_right(starts, row) - 1
    value = _group_column(path, column, g)[row - starts[g]].as_py()
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else Path(path).parent / p
            return p.read_bytes()
        return b""
    return value or b""


def download_hf(repo: str, dest: Path) -> Path:
    """`datasets.load_dataset(repo)` → one parquet file per split in `dest` (read back with `read`)."""
    from carspotter.utils import hub_reachable

    if not hub_reachable():
        raise LayoutError(
            f"hf:{repo}: the Hugging Face hub cannot be reached from this machine. Download the dataset's "
            "parquet files (e.g. `huggingface-cli download --repo-type dataset "
            f"{repo}` on a connected machine), copy them here and pass that folder as SRC."
        )
    try:
        import datasets
    except ImportError:
        raise LayoutError("hf: sources need the `datasets` package: pip install 'carspotter[hf]'") from None
    try:
        dsd = datasets.load_dataset(repo)
    except Exception as e:
        raise LayoutError(f"hf:{repo}: could not load the dataset ({type(e).__name__}: {e})") from None
    dest.mkdir(parents=True, exist_ok=True)
    for split, ds in dsd.items():
        ds.to_parquet(str(dest / f"{split}.parquet"))
    return dest
