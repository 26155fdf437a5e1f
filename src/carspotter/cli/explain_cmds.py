"""`carspotter explain`: why the run answered what it did for a photo (heat-map, evidence photos, panel)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from carspotter.cli.common import friendly_errors

MARKER = "explain.json"
BATCH_MARKER = "explanations.json"


def _default_index(run_dir: Path, index: Path | None) -> Path | None:
    """The run's own train-split index (`carspotter index RUN` writes RUN/index-train) when none is given."""
    if index is not None:
        return index
    own = run_dir / "index-train"
    return own if (own / "index.json").is_file() else None


def load_explainer(run_dir: Path, index: Path | None, method: str, device: str) -> Any:
    from carspotter.explain.photo import PhotoExplainer

    return PhotoExplainer.from_run(run_dir, _default_index(run_dir, index), method=method, device=device)


def write_explanation(px: Any, photo_path: Path, out: Path, k: int, overwrite: bool) -> dict[str, Any]:
    """OUT/overlay.png, OUT/panel.png, OUT/explain.json for one photo; refuses a non-empty OUT unless
    `overwrite` (and then only one of ours)."""
    from carspotter.data.images import open_rgb
    from carspotter.explain.photo import panel
    from carspotter.utils import atomic_path, atomic_write_json, prepare_out_dir

    photo = open_rgb(photo_path)
    (expl,) = px.explain([photo], k=k)
    out = prepare_out_dir(out, overwrite=overwrite, marker=MARKER)
    for name, img in (("overlay.png", expl.overlay), ("panel.png", panel(expl, photo, px.gallery_photo))):
        with atomic_path(out / name) as tmp:
            img.save(tmp, "PNG")
    doc = {"photo": str(photo_path), **expl.to_json(), "overlay": "overlay.png", "panel": "panel.png"}
    if px.index is not None:
        doc["index"] = {k_: px.index.info.get(k_) for k_ in ("data_root", "run_dir", "metric", "split")}
    atomic_write_json(out / MARKER, doc)
    return doc


def _summary_line(doc: dict[str, Any]) -> str:
    p, r = doc["prediction"], doc.get("runner_up")
    s = f"{p['class_name']} ({100 * p['probability']:.1f} %)"
    if r:
        s += f", runner-up {r['class_name']} ({100 * r['probability']:.1f} %)"
    for g in doc.get("evidence") or []:
        if g["hits"]:
            s += f"; nearest {g['role']} photo at {g['hits'][0]['distance']:.3f}"
    return s


def write_batch(px: Any, photos: list[Path], out: Path, k: int, overwrite: bool, echo: Any) -> Path:
    """`predict --explain OUT`: one sub-folder per photo (OUT/<n>_<stem>/) and OUT/explanations.json."""
    from carspotter.utils import atomic_write_json, prepare_out_dir

    out = prepare_out_dir(out, overwrite=overwrite, marker=BATCH_MARKER)
    items = []
    for n, photo in enumerate(photos):
        sub = out / f"{n:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', photo.stem)[:60]}"
        doc = write_explanation(px, photo, sub, k, overwrite=False)
        items.append({"photo": str(photo), "dir": sub.name, "prediction": doc["prediction"]})
        echo(f"{photo}: {_summary_line(doc)} → {sub}")
    atomic_write_json(out / BATCH_MARKER, {"target_layer": px.layer, "items": items})
    return out


@friendly_errors
def explain(
    run_dir: Path = typer.Argument(..., help="A classification run directory."),
    photo: Path = typer.Argument(..., help="The photo to explain."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for overlay.png, panel.png, explain.json."),
    index: Path | None = typer.Option(
        None, "--index", help="Gallery index for evidence photos (default: RUN/index-train if it exists)."
    ),
    k: int = typer.Option(3, "--k", min=1, max=20, help="Evidence photos of the predicted class."),
    method: str = typer.Option("gradcam++", "--method", help="gradcam++ (default) | gradcam"),
    device: str = typer.Option("cpu", "--device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier explanation in --out."),
) -> None:
    """Write the photo with its heat-map, a panel (photo | evidence of the answer | of the runner-up) and
    explain.json (prediction, target layer, nearest gallery ids and distances)."""
    if not photo.is_file():
        raise FileNotFoundError(f"{photo}: no such photo")
    px = load_explainer(run_dir, index, method, device)
    doc = write_explanation(px, photo, out, k, overwrite)
    typer.echo(f"{photo}: {_summary_line(doc)}")
    typer.echo(f"target layer {doc['target_layer']} ({method}) → {out}/overlay.png, panel.png, {MARKER}")
    if doc["heat_empty"]:
        typer.echo(f"the heat-map is empty: {method} found no positive evidence for this class at that layer")
    if doc["evidence"] is None:
        typer.echo("no gallery index: no evidence photos (pass --index INDEX_DIR)")


def register(app: typer.Typer) -> None:
    """Add `explain`."""
    app.command("explain")(explain)
