"""`prepare(src, out)`: any Stanford Cars layout → a prepared dataset (manifest.csv + images/ + summary.json).

Every photo is decoded fully once here (bad files are reported by name and reason, never a crash),
resized to `max_side`, and written as JPEG, so training never meets a broken file. The decode+resize step
runs in a process pool because it dominates the time for the 16k real photos.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.data.images import ImageError, decode
from carspotter.data.layouts import LayoutError, SourceItem, read_layout
from carspotter.data.layouts.parquet import download_hf, read_cell
from carspotter.data.manifest import MANIFEST, SPLITS, SUMMARY, Record, write_manifest, write_summary
from carspotter.data.taxonomy import canonical_name, taxonomy_summary
from carspotter.utils import OutputExistsError

PROTOCOLS = ("classification", "retrieval")
JPEG_QUALITY = 92


@dataclass(frozen=True)
class _Task:
    index: int
    item: SourceItem
    out_path: str  # absolute path of the JPEG to write
    max_side: int
    crop_bbox: bool


def _bbox_ok(bbox: tuple[float, float, float, float], w: int, h: int) -> bool:
    """Inside the photo (a couple of pixels of slack for 1-based inclusive devkit boxes) and not empty."""
    x1, y1, x2, y2 = bbox
    tx, ty = 2 + 0.02 * w, 2 + 0.02 * h
    return x2 > x1 and y2 > y1 and x1 >= -tx and y1 >= -ty and x2 <= w + tx and y2 <= h + ty


def _plain_jpeg(data: bytes | Path) -> bool:
    """An RGB/greyscale JPEG with no EXIF rotation: its bytes can be copied as they are."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return im.format == "JPEG" and im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1


def _bboxes_fit(items: list[SourceItem], n_sample: int = 100) -> bool:
    """Do the boxes belong to these photos? Checked on a spread sample by reading image headers only.

    A box that happens to fit a downscaled photo is still wrong, so a source whose boxes mostly do not
    fit loses all of them rather than keeping a random few.
    """
    from PIL import Image

    with_box = [it for it in items if it.bbox is not None and it.embedded is None]
    if not with_box:
        return True
    step = max(1, len(with_box) // n_sample)
    fits = []
    for it in with_box[::step][:n_sample]:
        if not os.path.isfile(it.path):  # never open a FIFO here: it would block; decode reports it
            continue
        try:
            with Image.open(it.path) as im:
                fits.append(_bbox_ok(it.bbox, *im.size))  # type: ignore[arg-type]
        except Exception:  # unreadable files are reported later by the decode step
            continue
    return not fits or sum(fits) >= 0.8 * len(fits)


def _process(task: _Task) -> dict[str, Any]:
    """Decode, (crop,) resize, save. Runs in a worker; returns a plain dict (picklable, small)."""
    from PIL import Image

    item = task.item
    try:
        if item.embedded is not None:
            try:
                data: bytes | Path = read_cell(*item.embedded)
            except (OSError, ValueError) as e:
                raise ImageError(item.path, "unreadable", str(e)) from None
        else:
            data = Path(item.path)
        img = decode(data, source=item.path)
    except ImageError as e:
        return {"index": task.index, "ok": False, "reason": e.reason, "detail": str(e)}
    except Exception as e:  # anything Pillow throws that decode() did not classify: still never a crash
        return {
            "index": task.index,
            "ok": False,
            "reason": "unreadable",
            "detail": f"{type(e).__name__}: {e}",
        }
    w, h = img.size
    bbox, bbox_dropped = item.bbox, False
    if bbox is not None and not _bbox_ok(bbox, w, h):
        bbox, bbox_dropped = None, True
    if bbox is not None:
        x1, y1, x2, y2 = max(0.0, bbox[0]), max(0.0, bbox[1]), min(float(w), bbox[2]), min(float(h), bbox[3])
        if task.crop_bbox:
            img = img.crop((round(x1), round(y1), round(x2), round(y2)))
            bbox = None
        else:
            bbox = (x1, y1, x2, y2)
    cw, ch = img.size
    scale = min(1.0, task.max_side / max(cw, ch))
    Path(task.out_path).parent.mkdir(parents=True, exist_ok=True)
    if scale == 1.0 and (w, h) == (cw, ch) and _plain_jpeg(data):
        # Small enough already: keep the original bytes rather than lose quality to a second JPEG encode.
        Path(task.out_path).write_bytes(data if isinstance(data, bytes) else data.read_bytes())
    else:
        if scale < 1.0:
            img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
        img.save(task.out_path, "JPEG", quality=JPEG_QUALITY)
    if bbox is not None:
        sx, sy = img.width / cw, img.height / ch
        bbox = (
            round(bbox[0] * sx, 1),
            round(bbox[1] * sy, 1),
            round(bbox[2] * sx, 1),
            round(bbox[3] * sy, 1),
        )
    return {"index": task.index, "ok": True, "bbox": bbox, "bbox_dropped": bbox_dropped, "size": img.size}


def _run(
    tasks: list[_Task], workers: int, progress: Callable[[int, int], None] | None
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    total = len(tasks)
    if workers <= 1 or total < 64:
        for t in tasks:
            results.append(_process(t))
            if progress:
                progress(len(results), total)
    else:
        import multiprocessing

        chunk = max(1, min(64, total // (workers * 8)))
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for r in pool.imap_unordered(_process, tasks, chunksize=chunk):
                results.append(r)
                if progress:
                    progress(len(results), total)
    return sorted(results, key=lambda r: r["index"])


def _stem(item: SourceItem) -> str:
    if item.embedded is not None:
        stem = f"{Path(item.embedded[0]).stem}_{item.embedded[2]:06d}"
    else:
        stem = Path(item.path).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def _out_paths(items: list[SourceItem]) -> list[str]:
    """images/<source split>/<file stem>.jpg, with _2, _3 … on name clashes (e.g. 1.jpg in every class)."""
    seen: Counter[str] = Counter()
    rels = []
    for it in items:
        base = f"images/{it.split or 'all'}/{_stem(it)}"
        seen[base] += 1
        rels.append(base + (f"_{seen[base]}" if seen[base] > 1 else "") + ".jpg")
    return rels


def _class_order(items: list[SourceItem]) -> tuple[list[str], dict[str, int | None], str]:
    """Class names in label order: by source id when every class has exactly one, else by name."""
    ids: dict[str, set[int | None]] = defaultdict(set)
    for it in items:
        ids[it.class_name].add(it.source_id)
    by_id = all(len(s) == 1 and None not in s for s in ids.values())
    if by_id:
        owner: dict[int, str] = {}
        for name, s in ids.items():
            sid = next(iter(s))
            if sid in owner:
                raise LayoutError(f"source class id {sid} has two names: {owner[sid]!r} and {name!r}")
            owner[sid] = name  # type: ignore[index]
        names = sorted(ids, key=lambda n: next(iter(ids[n])))  # type: ignore[arg-type, return-value]
        return names, {n: next(iter(ids[n])) for n in names}, "source id"
    return sorted(ids), {n: None for n in ids}, "name"


def canonical_items(items: list[SourceItem]) -> tuple[list[SourceItem], dict[str, str]]:
    """Official spellings for re-packed class names (Kaggle "Ram C-V …" → "Ram C/V …"); returns the renames."""
    renamed: dict[str, str] = {}
    out = []
    for it in items:
        name = canonical_name(it.class_name)
        if name != it.class_name:
            renamed[it.class_name] = name
            it = dataclasses.replace(it, class_name=name)
        out.append(it)
    return out, renamed


def carve_val(labels: list[int], splits: list[str], val_fraction: float, seed: int) -> list[str]:
    """Move a seeded per-class (stratified) `val_fraction` of train items to val; keeps ≥1 train per class."""
    splits = list(splits)
    if val_fraction <= 0:
        return splits
    rng = np.random.default_rng(seed)
    per_class: dict[int, list[int]] = defaultdict(list)
    for i, (lab, s) in enumerate(zip(labels, splits, strict=True)):
        if s == "train":
            per_class[lab].append(i)
    for lab in sorted(per_class):
        idx = per_class[lab]
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        for j in rng.permutation(len(idx))[:k]:
            splits[idx[j]] = "val"
    return splits


def check_out(out: Path, overwrite: bool, src: str | Path | None = None) -> None:
    """Refuse a non-empty `out` unless overwriting one of our own outputs; never write into the source."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists and is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST).exists() and not (out / SUMMARY).exists():
            raise OutputExistsError(
                f"{out}: not a prepared dataset (no {MANIFEST}); refusing to overwrite it"
            )
    if src is not None and not str(src).startswith("hf:"):
        s, o = Path(src).resolve(), out.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ValueError(f"--out {out} must not be the source folder, inside it, or contain it")


def swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    src: str | Path,
    out: str | Path,
    layout: str = "auto",
    crop_bbox: bool = False,
    max_side: int = 256,
    val_fraction: float = 0.1,
    protocol: str = "classification",
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read `src` (any supported layout), validate and resize every photo into `out`; returns the summary."""
    t0 = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {PROTOCOLS}")
    if max_side < 8:
        raise ValueError(f"max_side {max_side}: must be at least 8 pixels")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction}: must be in [0, 1)")
    out = Path(out)
    check_out(out, overwrite, src)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    say = log or (lambda _m: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source = str(src)
        if source.startswith("hf:"):
            src = download_hf(source[3:], tmp / ".download")
            layout = "parquet"
        layout, why, read = read_layout(src, layout)
        say(f"layout: {layout} — {why}")
        for note in read.notes:
            say(f"note: {note}")
        items, renamed = canonical_items(read.items)
        notes = list(read.notes)
        if renamed:
            notes.append(
                "class names mapped back to the official spelling: "
                + "; ".join(f"{a!r} → {b!r}" for a, b in sorted(renamed.items()))
            )
            say(f"note: {notes[-1]}")
        if not _bboxes_fit(items):
            items = [dataclasses.replace(it, bbox=None) for it in items]
            notes.append(
                "bounding boxes ignored: most lie outside their photos, so the annotations were made for "
                "another resolution (e.g. the original photos, not these resized copies)"
            )
            say(f"note: {notes[-1]}")
        rels = _out_paths(items)
        tasks = [
            _Task(i, it, str(tmp / rel), max_side, crop_bbox)
            for i, (it, rel) in enumerate(zip(items, rels, strict=True))
        ]
        say(f"decoding and resizing {len(tasks)} photos with {workers} worker(s)…")
        results = _run(tasks, workers, progress)

        skipped = list(read.skipped)
        good: list[tuple[SourceItem, str, dict[str, Any]]] = []
        for it, rel, r in zip(items, rels, results, strict=True):
            if r["ok"]:
                good.append((it, rel, r))
            else:
                skipped.append({"file": it.path, "reason": r["reason"], "detail": r["detail"]})
        if not good:
            raise LayoutError(f"{src}: none of the {len(items)} photos could be decoded (see reasons above)")
        good_items = [g[0] for g in good]
        names, ids, order = _class_order(good_items)
        label_of = {n: i for i, n in enumerate(names)}
        labels = [label_of[it.class_name] for it in good_items]

        if protocol == "classification":
            splits = [it.split or "train" for it in good_items]
            if "test" not in splits and not any(n.startswith("test split skipped") for n in notes):
                notes.append("the source has no test split")
            if "val" in splits:
                notes.append("the source has its own val split: no val carved out")
            else:
                splits = carve_val(labels, splits, val_fraction, seed)
        else:
            n_train = len(names) // 2
            splits = ["train" if lab < n_train else "test" for lab in labels]
            splits = carve_val(labels, splits, val_fraction, seed)
            notes.append(
                f"retrieval protocol: classes 1..{n_train} (by {order}) → train/val, "
                f"{n_train + 1}..{len(names)} → test; the source's own splits are ignored"
            )

        records = [
            Record(rel, lab, it.class_name, s, r["bbox"], ids[it.class_name])
            for (it, rel, r), lab, s in zip(good, labels, splits, strict=True)
        ]
        write_manifest(tmp, records)
        options = {"protocol": protocol, "crop_bbox": crop_bbox, "max_side": max_side}
        options |= {"val_fraction": val_fraction, "seed": seed}
        summary = _summary(records, names, ids, skipped, notes, results, src, layout, why, order, options)
        summary["taxonomy"] = taxonomy_summary(names)
        if summary["taxonomy"]["fallback"]:
            fb = summary["taxonomy"]["fallback"]
            summary["notes"].append(
                f"{len(fb)} class name(s) with a make we do not know; make = first word: "
                + ", ".join(repr(n) for n in fb[:10])
                + (" …" if len(fb) > 10 else "")
            )
        summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
        write_summary(tmp, summary)
        shutil.rmtree(tmp / ".download", ignore_errors=True)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(
    records: list[Record],
    names: list[str],
    ids: dict[str, int | None],
    skipped: list[dict[str, str]],
    notes: list[str],
    results: list[dict[str, Any]],
    src: str | Path,
    layout: str,
    why: str,
    order: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    counts = Counter(r.split for r in records)
    per = defaultdict(Counter)
    for r in records:
        per[r.label][r.split] += 1
    dropped = [r for r in results if r.get("bbox_dropped")]
    return {
        "created_by": "carspotter data prepare",
        "source": str(src) if str(src).startswith("hf:") else str(Path(src).resolve()),
        "layout": layout,
        "detected": why,
        "protocol": options["protocol"],
        "options": options,
        "n_images": len(records),
        "n_classes": len(names),
        "counts": {s: counts.get(s, 0) for s in SPLITS},
        "classes_per_split": {s: sum(1 for c in per.values() if c.get(s)) for s in SPLITS},
        "class_order": order,
        "n_with_bbox": sum(1 for r in records if r.bbox is not None),
        "n_bbox_dropped": len(dropped),
        "n_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
        "notes": notes
        + (
            [f"{len(dropped)} bounding boxes lie outside their photo (made for another resolution?): dropped"]
            if dropped
            else []
        ),
        "per_class": [
            {"label": i, "class_name": n, "source_id": ids[n], **{s: per[i].get(s, 0) for s in SPLITS}}
            for i, n in enumerate(names)
        ],
    }


def format_summary(summary: dict[str, Any], max_skipped: int = 20) -> str:
    """A short human-readable report of a summary.json."""
    c = summary.get("counts", {})
    cps = summary.get("classes_per_split", {})
    lines = [
        f"source:   {summary.get('source')}  (layout {summary.get('layout')}: {summary.get('detected', '')})",
        f"protocol: {summary.get('protocol')}   options: {summary.get('options')}",
        f"classes:  {summary.get('n_classes')}   images: {summary.get('n_images')}",
    ]
    for s in SPLITS:
        lines.append(f"  {s:<5} {c.get(s, 0):>7,} images  {cps.get(s, 0):>4} classes")
    per = summary.get("per_class", [])
    if per:
        totals = [sum(p.get(s, 0) for s in SPLITS) for p in per]
        lines.append(
            f"per class: min {min(totals)}, median {int(np.median(totals))}, max {max(totals)} images"
        )
        first = per[0]
        lines.append(f"label 0: {first['class_name']!r} (source id {first.get('source_id')})")
    if summary.get("n_with_bbox"):
        lines.append(f"bounding boxes: {summary['n_with_bbox']:,}")
    skipped = summary.get("skipped", [])
    lines.append(f"skipped:  {summary.get('n_skipped', len(skipped))} {summary.get('skipped_by_reason', {})}")
    for s in skipped[:max_skipped]:
        lines.append(f"  - {s['file']}: {s['reason']}")
    if len(skipped) > max_skipped:
        lines.append(f"  … and {len(skipped) - max_skipped} more (see summary.json)")
    tax = summary.get("taxonomy")
    if tax:
        fb = len(tax.get("fallback", []))
        lines.append(
            f"taxonomy: {tax.get('n_makes')} makes, {tax.get('n_models')} models"
            + (
                f", {fb} name(s) with an unknown make (make = first word)"
                if fb
                else ", every make recognised"
            )
        )
    for n in summary.get("notes", []):
        lines.append(f"note: {n}")
    if "wall_time_s" in summary:
        lines.append(f"time:     {summary['wall_time_s']} s")
    return "\n".join(lines)
