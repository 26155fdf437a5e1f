"""Layout readers: each turns one real Stanford Cars layout into a list of `SourceItem`.

`detect(src)` names the layout and says what it saw; `read_layout(src, layout)` returns a `LayoutRead`.
Detection order matters: the specific layouts (annotation files) are tried before generic class folders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carspotter.data.layouts import devkit, folders, kaggle, manifest_csv, parquet
from carspotter.data.layouts.base import LayoutError, LayoutRead, SourceItem

__all__ = ["LAYOUTS", "LayoutError", "LayoutRead", "SourceItem", "detect", "expectations", "read_layout"]


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Path], str | None]
    read: Callable[[Path], LayoutRead]
    expects: str


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("devkit", devkit.detect_devkit, devkit.read_devkit, devkit.EXPECTS_DEVKIT),
        Layout("cars-annos", devkit.detect_cars_annos, devkit.read_cars_annos, devkit.EXPECTS_CARS_ANNOS),
        Layout("kaggle-csv", kaggle.detect, kaggle.read, kaggle.EXPECTS),
        Layout("parquet", parquet.detect, parquet.read, parquet.EXPECTS),
        Layout("manifest-csv", manifest_csv.detect, manifest_csv.read, manifest_csv.EXPECTS),
        Layout("folders", folders.detect, folders.read, folders.EXPECTS),
    )
}


def expectations() -> str:
    return "\n".join(f"  - {lay.expects}" for lay in LAYOUTS.values()) + f"\n  - {parquet.EXPECTS_HF}"


def detect(src: str | Path) -> tuple[str, str]:
    """(layout name, what was found) — or LayoutError listing what each layout expects."""
    if str(src).startswith("hf:"):
        return "hf", f"Hugging Face dataset {str(src)[3:]!r} (downloaded with `datasets`)"
    src = Path(src)
    if not src.exists():
        raise LayoutError(f"{src}: does not exist")
    if src.is_file():
        found = manifest_csv.detect(src)
        if found:
            return "manifest-csv", found
        if src.suffix.lower() == ".csv":
            raise LayoutError(manifest_csv.header_problem(src))
        raise LayoutError(f"{src}: is a file but not a manifest CSV; layouts we read:\n{expectations()}")
    for lay in LAYOUTS.values():
        found = lay.detect(src)
        if found:
            return lay.name, found
    raise LayoutError(f"{src}: no known Stanford Cars layout found; layouts we read:\n{expectations()}")


def read_layout(src: str | Path, layout: str = "auto") -> tuple[str, str, LayoutRead]:
    """Detect (when `layout` is auto) and read. Returns (layout, explanation, result)."""
    if layout == "auto":
        layout, why = detect(src)
    else:
        why = f"--layout {layout}"
    if layout == "hf":
        raise LayoutError("hf: sources are downloaded by prepare(); call it with SRC=hf:REPO_ID")
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose auto or one of {[*LAYOUTS, 'hf']}")
    src = Path(src)
    if not src.exists():
        raise LayoutError(f"{src}: does not exist")
    result = LAYOUTS[layout].read(src)
    if not result.items:
        raise LayoutError(
            f"{src}: read as {layout} but found no usable photos"
            + (f" ({len(result.skipped)} listed files are missing)" if result.skipped else "")
            + ("; " + "; ".join(result.notes) if result.notes else "")
        )
    return layout, why, result
