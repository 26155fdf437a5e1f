"""An open catalogue: enrol new classes into a gallery index from a few photos, no retraining.

What enrolment adds to an index directory (the rest of it is retrieval.index's contract):
  catalogue.json    {"version": 1, "enrolled": {class name: {label, enrolled_at, updated_at, taxonomy}}}
  enrolled/         a resized JPEG copy of every enrolled photo (enrolled/<sha256[:20]>.jpg), so thumbnails
                    keep working when the originals move
  meta.csv          enrolled rows have root=index (their path is under the index dir) and every row gets a
                    sha256 of the photo file's bytes, which is how duplicates are refused

Writes are atomic for the whole directory: the next version is assembled in a sibling folder (unchanged
files hard-linked, changed ones written fresh), then swapped with the live one in one `renameat2
(RENAME_EXCHANGE)` call. A crash at any moment (kill -9 included) leaves either the old or the new index,
never a mix; leftovers are removed by the next catalogue command. One writer at a time (a lock file beside
the index). Enrolment appends vectors to the FAISS index (Flat, IVF, HNSW: `add`, no retraining); removing
a class rebuilds the FAISS structure from the kept vectors (IVF keeps its trained quantiser; HNSW, which
cannot delete, is re-inserted: seconds for 10^5 vectors).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.retrieval.index import GalleryIndex, GalleryIndexError
from carspotter.rundir import CATALOGUE_JSON as CATALOGUE_FILE
from carspotter.rundir import ENROLLED_DIR, INDEX_FILES, INDEX_JSON
from carspotter.utils import atomic_write_json

REWRITTEN = (*INDEX_FILES, CATALOGUE_FILE)
PHOTO_MAX_SIDE = 512  # stored copies: big enough for a thumbnail and to re-embed at 448 px
ROOT_INDEX = "index"  # meta.csv `root` of a row whose path is relative to the index dir


class CatalogueError(ValueError):
    """An enrolment request that cannot be carried out as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Photo:
    """One photo to enrol: its class, where it came from (for messages) and its file bytes."""

    class_name: str
    source: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class EnrolResult:
    added: dict[str, int] = field(default_factory=dict)  # class → photos added
    new_classes: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # one message per refused photo
    n_gallery: int = 0
    embed_s: float = 0.0

    @property
    def photos_added(self) -> int:
        return sum(self.added.values())


# ---------------------------------------------------------------------------------------------- inputs
def photos_from_paths(class_name: str | None, paths: Sequence[str | Path]) -> list[Photo]:
    """Files and folders of photos → Photos. Without a class name every argument must be a folder of class
    folders (each subfolder's name is the class); with one, folders are searched recursively for photos."""
    from carspotter.data.images import IMAGE_SUFFIXES

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    out: list[Photo] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if class_name is None:
            if not p.is_dir():
                raise CatalogueError(f"{p}: without --class, give folders of class folders (one per class)")
            subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not subs:
                raise CatalogueError(f"{p}: holds no class folders; pass --class NAME to enrol its photos")
            for d in subs:
                files = images_in(d)
                if not files:
                    raise CatalogueError(f"{d}: class folder without photos ({', '.join(IMAGE_SUFFIXES)})")
                out += [Photo(d.name, str(f), f.read_bytes()) for f in files]
        else:
            files = images_in(p) if p.is_dir() else [p]
            if not files:
                raise CatalogueError(f"{p}: no photos in this folder")
            out += [Photo(class_name, str(f), f.read_bytes()) for f in files]
    return out


def clean_class_name(name: str) -> str:
    name = " ".join(str(name).split())
    if not name:
        raise CatalogueError("the class name is empty")
    if len(name) > 200:
        raise CatalogueError(f"class name too long ({len(name)} characters, at most 200)")
    if any(ord(ch) < 32 for ch in name):
        raise CatalogueError(f"class name {name!r} contains control characters")
    return name


def parse_taxonomy(name: str) -> dict[str, Any] | None:
    """The make / model / body / year of a class name, via carspotter.data.taxonomy when it is installed
    (issue 15), so enrolled classes get the same hierarchical answer as trained ones; else None."""
    try:
        from carspotter.data import taxonomy  # type: ignore[attr-defined]
    except ImportError:
        return None
    parse = getattr(taxonomy, "describe", None) or getattr(taxonomy, "parse_name", None)
    if parse is None:
        return None
    try:
        parsed = parse(name)
    except ValueError:
        return None
    if hasattr(parsed, "to_dict"):
        return parsed.to_dict()
    if hasattr(parsed, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(parsed)
    return dict(parsed) if isinstance(parsed, dict) else None


# ----------------------------------------------------------------------------------- reading an index
def read_catalogue(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / CATALOGUE_FILE
    if not path.is_file():
        return {"version": 1, "enrolled": {}}
    try:
        cat = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GalleryIndexError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cat, dict) or not isinstance(cat.get("enrolled"), dict):
        raise GalleryIndexError(f"{path}: expected an object with an 'enrolled' mapping")
    return cat


def photo_path(index_dir: str | Path, index: GalleryIndex, item_id: int) -> Path:
    """Where gallery row `item_id`'s photo lies: under the index dir (enrolled) or the data root (indexed).

    Raises GalleryIndexError when the row's path leaves its folder (a tampered meta.csv).
    """
    row = index.meta[item_id]
    if row.get("root") == ROOT_INDEX:
        root = Path(index_dir).resolve()
    else:
        if not index.info.get("data_root"):
            raise GalleryIndexError("this index does not record where its photos are (no data_root)")
        root = Path(index.info["data_root"]).resolve()
    path = (root / str(row["path"])).resolve()
    if not path.is_relative_to(root):
        raise GalleryIndexError(f"gallery image {item_id} lies outside the gallery folder")
    return path


def list_classes(index_dir: str | Path, index: GalleryIndex | None = None) -> list[dict[str, Any]]:
    """Every class with photos in the gallery: name, label, photos, origin (trained | indexed | enrolled),
    date (enrolment date, or when the index was built), taxonomy (enrolled classes, when parsed)."""
    index_dir = Path(index_dir)
    index = index or GalleryIndex.load(index_dir)
    cat = read_catalogue(index_dir)
    built = datetime.fromtimestamp((index_dir / INDEX_JSON).stat().st_mtime, UTC).isoformat(
        timespec="seconds"
    )
    built = index.info.get("built_at") or built
    trained = set(index.info.get("class_names_model") or [])
    counts: dict[str, list[int]] = {}  # name → [label, indexed photos, enrolled photos]
    for m in index.meta:
        c = counts.setdefault(str(m["class_name"]), [int(m["label"]), 0, 0])
        c[2 if m.get("root") == ROOT_INDEX else 1] += 1
    out = []
    for name, (label, n_indexed, n_enrolled) in sorted(counts.items(), key=lambda kv: (kv[1][0], kv[0])):
        rec = cat["enrolled"].get(name)
        origin = "enrolled" if n_indexed == 0 else ("trained" if name in trained else "indexed")
        out.append(
            {
                "name": name,
                "label": label,
                "photos": n_indexed + n_enrolled,
                "enrolled_photos": n_enrolled,
                "origin": origin,
                "date": (rec or {}).get("updated_at") if n_enrolled else built,
                "taxonomy": (rec or {}).get("taxonomy"),
            }
        )
    return out


def label_names(index: GalleryIndex) -> dict[int, str]:
    return {int(m["label"]): str(m["class_name"]) for m in index.meta}


# ------------------------------------------------------------------------------------- atomic commits
@contextlib.contextmanager
def writer_lock(index_dir: str | Path) -> Iterator[None]:
    """One catalogue writer per index (an flock on a file beside it; freed by the kernel if we die)."""
    index_dir = Path(index_dir).resolve()
    lock = index_dir.parent / f".{index_dir.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _recover(index_dir)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _siblings(index_dir: Path, kind: str) -> list[Path]:
    return sorted(index_dir.parent.glob(f".{index_dir.name}.{kind}-*"))


def _recover(index_dir: Path) -> None:
    """Finish or undo an interrupted commit (call with the writer lock held)."""
    if not index_dir.exists():  # died between the two renames of the fallback swap
        staged = [s for s in _siblings(index_dir, "stage") if (s / ".complete").exists()]
        old = _siblings(index_dir, "old")
        if staged:
            os.rename(staged[-1], index_dir)
        elif old:
            os.rename(old[-1], index_dir)
    for leftover in _siblings(index_dir, "stage") + _siblings(index_dir, "old"):
        shutil.rmtree(leftover, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (index_dir / ".complete").unlink()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"swapping {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(
    index_dir: str | Path,
    index: GalleryIndex,
    catalogue: dict[str, Any],
    new_photos: dict[str, bytes],
    drop: set[str] = frozenset(),  # type: ignore[assignment]
    before_swap: Callable[[], None] | None = None,
) -> None:
    """Make (index, catalogue, photos) the index dir's new contents in one atomic step.

    `new_photos` maps paths relative to the index dir to file bytes; `drop` names relative paths to leave
    out. Call with `writer_lock` held. `before_swap` is a test hook (the moment a crash would hurt most).
    """
    index_dir = Path(index_dir).resolve()
    if "built_at" not in index.info:  # keep the build date of the indexed classes past the first rewrite
        mtime = (index_dir / INDEX_JSON).stat().st_mtime
        index.info["built_at"] = datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds")
    stage = index_dir.parent / f".{index_dir.name}.stage-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        for dirpath, _dirnames, filenames in os.walk(index_dir):
            rel_dir = Path(dirpath).relative_to(index_dir)
            (stage / rel_dir).mkdir(exist_ok=True)
            for name in filenames:
                rel = str(rel_dir / name) if str(rel_dir) != "." else name
                if rel in REWRITTEN or rel in drop or rel in new_photos or name == ".complete":
                    continue
                try:
                    os.link(Path(dirpath) / name, stage / rel)
                except OSError:
                    shutil.copy2(Path(dirpath) / name, stage / rel)
        for rel, data in new_photos.items():
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        index.write_files(stage)
        atomic_write_json(stage / CATALOGUE_FILE, catalogue)
        for d in {stage / Path(rel).parent for rel in new_photos} | {stage}:
            _fsync_dir(d)
        if before_swap is not None:
            before_swap()
        if _exchange(stage, index_dir):
            _fsync_dir(index_dir.parent)
        else:  # fallback: two renames; `_recover` finishes the job if we die in between
            (stage / ".complete").touch()
            old = index_dir.parent / f".{index_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(index_dir, old)
            os.rename(stage, index_dir)
            (index_dir / ".complete").unlink()
            stage = old
            _fsync_dir(index_dir.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the old version after a swap, or a failed stage


# ----------------------------------------------------------------------------------------- enrolment
def _resized_jpeg(img: Any, max_side: int = PHOTO_MAX_SIDE) -> bytes:
    img = img.copy()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ensure_hashes(index_dir: Path, index: GalleryIndex) -> None:
    """Give every gallery row a sha256 of its photo file (once; stored in meta.csv by the next commit)."""
    for i, m in enumerate(index.meta):
        if m.get("sha256"):
            continue
        try:
            m["sha256"] = hashlib.sha256(photo_path(index_dir, index, i).read_bytes()).hexdigest()
        except (OSError, GalleryIndexError):
            m["sha256"] = ""  # photo not on this machine: cannot be compared


@dataclass
class Plan:
    photos: list[Photo]  # the photos to enrol (duplicates dropped), names cleaned
    labels: list[int]
    result: EnrolResult
    kept: list[int]  # their positions in the request


def plan_enrolment(
    index_dir: Path, index: GalleryIndex, photos: Sequence[Photo], add_to_existing: bool
) -> Plan:
    """Check names, refuse duplicates, assign labels. Raises CatalogueError when nothing could be enrolled."""
    if not photos:
        raise CatalogueError("no photos to enrol")
    _ensure_hashes(index_dir, index)
    seen = {m["sha256"]: str(m["class_name"]) for m in index.meta if m.get("sha256")}
    existing = {str(m["class_name"]): int(m["label"]) for m in index.meta}
    names = list(index.info.get("class_names") or [])
    next_label = max([len(names) - 1, *existing.values(), -1]) + 1
    res = EnrolResult()
    keep, kept, labels, new_labels = [], [], [], {}
    for pos, p in enumerate(photos):
        name = clean_class_name(p.class_name)
        if name in existing and not add_to_existing:
            raise CatalogueError(
                f"class {name!r} already has {sum(m['class_name'] == name for m in index.meta)} photos in "
                "this gallery; pass --add-to-existing (API: add_to_existing=true) to add these photos to it"
            )
        h = p.sha256
        if h in seen:
            res.duplicates.append(
                f"{p.source}: refused, the same photo is already in the gallery as {seen[h]!r}"
            )
            continue
        seen[h] = name
        if name in existing:
            label = existing[name]
        elif name in new_labels:
            label = new_labels[name]
        elif name in names:  # a class of the dataset with no photo in this gallery: keep its label
            label = new_labels[name] = names.index(name)
        else:
            label = new_labels[name] = next_label
            next_label += 1
        keep.append(Photo(name, p.source, p.data))
        kept.append(pos)
        labels.append(label)
        res.added[name] = res.added.get(name, 0) + 1
    if not keep:
        raise CatalogueError("nothing to enrol: " + "; ".join(res.duplicates[:5]))
    res.new_classes = [n for n in res.added if n not in existing]
    return Plan(keep, labels, res, kept)


def embed_photos(
    index: GalleryIndex, model: Any, photos: Sequence[Photo], device: str = "cpu", batch_size: int = 32
) -> np.ndarray:
    """(N, D) vectors of the photos, embedded with the index's own network and preprocessing."""
    from carspotter.data.images import decode
    from carspotter.retrieval.query import embed_queries

    out = []
    for i in range(0, len(photos), batch_size):
        imgs = [decode(p.data, p.source) for p in photos[i : i + batch_size]]
        out.append(embed_queries(index, model, imgs, device))
    dim = int(index.info["dim"])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def apply_enrolment(
    index_dir: Path, index: GalleryIndex, plan: Plan, vectors: np.ndarray
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Append the vectors + rows to `index` in memory; → (new catalogue, photo files to write)."""
    from carspotter.data.images import decode

    if len(vectors) != len(plan.photos):
        raise ValueError(f"{len(vectors)} vectors for {len(plan.photos)} photos")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if index.metric == "cosine":
        from carspotter.retrieval.fewshot import l2n

        x = l2n(x)
    index.index.add(x)  # append: no retraining, no rebuild (Flat, IVF, HNSW)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    files: dict[str, bytes] = {}
    names = list(index.info.get("class_names") or [])
    for p, label in zip(plan.photos, plan.labels, strict=True):
        rel = f"{ENROLLED_DIR}/{p.sha256[:20]}.jpg"
        files[rel] = _resized_jpeg(decode(p.data, p.source))
        row = {"path": rel, "label": label, "class_name": p.class_name, "split": "enrolled"}
        index.meta.append({**row, "root": ROOT_INDEX, "sha256": p.sha256})
        while len(names) <= label:
            names.append("")
        if not names[label]:
            names[label] = p.class_name
    index.info["class_names"] = names
    index.info["n"] = int(index.index.ntotal)
    cat = read_catalogue(index_dir)
    for name in plan.result.added:
        rec = cat["enrolled"].setdefault(name, {"enrolled_at": now, "taxonomy": parse_taxonomy(name)})
        rec.update(label=int(names.index(name)), updated_at=now)
    return cat, files


def enrol(
    index_dir: str | Path,
    photos: Sequence[Photo],
    *,
    add_to_existing: bool = False,
    device: str = "cpu",
    batch_size: int = 32,
    model: Any = None,
    before_swap: Callable[[], None] | None = None,
    dist: Any = None,
) -> tuple[EnrolResult, GalleryIndex | None]:
    """Embed `photos` with the index's network and add them under their classes; → (result, new index).

    Under torchrun pass `dist` (engine.distributed.DistInfo): rank 0 plans (names, duplicates) under the
    writer lock, every rank embeds its shard of the photos, rank 0 gathers the vectors and commits. Other
    ranks return (result, None).
    """
    from carspotter.retrieval.query import embedder_for_index
    from carspotter.retrieval.sharded import SINGLE, broadcast, embed_sharded

    dist = dist or SINGLE
    index_dir = Path(index_dir)
    lock = writer_lock(index_dir) if dist.is_main else contextlib.nullcontext()
    with lock:
        index = GalleryIndex.load(index_dir)
        plan: Plan | None = None
        msg: Any = None
        if dist.is_main:
            try:
                plan = plan_enrolment(index_dir, index, photos, add_to_existing)
                msg = (plan.kept, plan.labels, plan.result)
            except (CatalogueError, ValueError) as e:
                msg = f"{type(e).__name__}:{e}"
        msg = broadcast(msg, dist)
        if isinstance(msg, str):
            kind, _, text = msg.partition(":")
            raise CatalogueError(text) if kind == "CatalogueError" else ValueError(text)
        if plan is None:
            kept, labels, result = msg
            plan = Plan([photos[i] for i in kept], labels, result, kept)  # names cleaned on rank 0 only
        model = model if model is not None else embedder_for_index(index, device)
        t0 = time.perf_counter()
        vecs = embed_sharded(
            lambda ids: embed_photos(index, model, [plan.photos[i] for i in ids], device, batch_size),
            len(plan.photos),
            dist,
        )
        plan.result.embed_s = time.perf_counter() - t0
        if not dist.is_main:
            return plan.result, None
        cat, files = apply_enrolment(index_dir, index, plan, vecs)
        commit(index_dir, index, cat, files, before_swap=before_swap)
    plan.result.n_gallery = len(index.meta)
    return plan.result, index


def remove_rows(index: GalleryIndex, keep: np.ndarray) -> GalleryIndex:
    """A new GalleryIndex with only rows `keep` (bool (N,)): same FAISS type and settings, IVF training kept."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        ivf.make_direct_map()
    vecs = index.vectors()
    new = faiss.clone_index(index.index)
    new.reset()
    new.add(np.ascontiguousarray(vecs[keep], dtype=np.float32))
    meta = [m for m, k in zip(index.meta, keep, strict=True) if k]
    info = {**index.info, "n": int(new.ntotal)}
    return GalleryIndex(new, meta, info)


def unenrol(index_dir: str | Path, class_name: str) -> tuple[int, GalleryIndex]:
    """Remove a class's enrolled photos (vectors, rows, stored copies); → (photos removed, new index)."""
    index_dir = Path(index_dir)
    name = clean_class_name(class_name)
    with writer_lock(index_dir):
        index = GalleryIndex.load(index_dir)
        keep = np.asarray([not (m["class_name"] == name and m.get("root") == ROOT_INDEX) for m in index.meta])
        removed = int((~keep).sum())
        if removed == 0:
            has = any(m["class_name"] == name for m in index.meta)
            raise CatalogueError(
                f"class {name!r} came with the index, not by enrolment; rebuild the index to drop it"
                if has
                else f"no class {name!r} in {index_dir}; see `carspotter classes {index_dir}`"
            )
        drop = {str(m["path"]) for m, k in zip(index.meta, keep, strict=True) if not k}
        new = remove_rows(index, keep)
        cat = read_catalogue(index_dir)
        cat["enrolled"].pop(name, None)
        commit(index_dir, new, cat, {}, drop=drop)
    return removed, new
