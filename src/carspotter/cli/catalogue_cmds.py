"""`carspotter enrol | unenrol | classes | fewshot`: an open catalogue on top of a gallery index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from carspotter.cli.common import friendly_errors


def _relaunch_if(nproc: int) -> bool:
    """Re-run this command under torchrun with `nproc` processes; True when it did (and we must stop)."""
    if nproc > 1 and "RANK" not in os.environ:
        from carspotter.cli.train_cmds import _relaunch

        code = _relaunch(nproc)
        if code:
            raise typer.Exit(code)
        return True
    return False


@friendly_errors
def enrol(
    index_dir: Path = typer.Argument(..., help="An index directory (from `carspotter index`)."),
    photos: list[Path] = typer.Argument(
        ..., help="Photos or folders; without --class, folders of class folders."
    ),
    class_name: str | None = typer.Option(None, "--class", help="The class to enrol the photos under."),
    add_to_existing: bool = typer.Option(
        False, "--add-to-existing", help="Confirm adding photos to a class the gallery already has."
    ),
    device: str = typer.Option("cpu", "--device"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Embed in N processes under torchrun (gloo on CPU)."),
) -> None:
    """Add new classes (or photos) to a gallery index without retraining: embed, append, swap atomically."""
    from carspotter.engine.distributed import cleanup, init_distributed
    from carspotter.retrieval.catalogue import enrol as do_enrol
    from carspotter.retrieval.catalogue import photos_from_paths

    if _relaunch_if(nproc):
        return
    dist, dev = init_distributed(device)
    try:
        items = photos_from_paths(class_name, photos)
        res, _index = do_enrol(
            index_dir,
            items,
            add_to_existing=add_to_existing,
            device=str(dev),
            batch_size=batch_size,
            dist=dist,
        )
    finally:
        cleanup(dist)
    if not dist.is_main:
        return
    for msg in res.duplicates:
        typer.echo(f"duplicate: {msg}", err=True)
    for name, n in res.added.items():
        typer.echo(f"enrolled {n} photo(s) as {name!r}" + (" (new class)" if name in res.new_classes else ""))
    rate = res.photos_added / res.embed_s if res.embed_s > 0 else float("nan")
    typer.echo(f"gallery now {res.n_gallery} photos; embedded at {rate:.1f} photos/s → {index_dir}")


@friendly_errors
def unenrol(
    index_dir: Path = typer.Argument(..., help="An index directory."),
    class_name: str = typer.Option(..., "--class", help="The enrolled class to remove."),
) -> None:
    """Remove a class's enrolled photos (an HNSW index is rebuilt from the kept vectors; Flat/IVF too)."""
    from carspotter.retrieval.catalogue import unenrol as do_unenrol

    n, index = do_unenrol(index_dir, class_name)
    typer.echo(f"removed {n} enrolled photo(s) of {class_name!r}; gallery now {len(index.meta)} photos")


@friendly_errors
def classes(
    index_dir: Path = typer.Argument(..., help="An index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The gallery's classes: photo counts and origin (trained / indexed / enrolled) with date."""
    from rich.console import Console
    from rich.table import Table

    from carspotter.retrieval.catalogue import list_classes

    rows = list_classes(index_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"{index_dir}: {len(rows)} classes", title_justify="left")
    for h in ("label", "class", "photos", "origin", "date"):
        t.add_column(h)
    for r in rows:
        t.add_row(str(r["label"]), r["name"], str(r["photos"]), r["origin"], str(r["date"] or ""))
    Console(width=160).print(t)


@friendly_errors
def fewshot(
    target: Path | None = typer.Argument(None, help="A run or an index dir (omit with --backbone)."),
    data: Path = typer.Option(..., "--data", help="Prepared dataset."),
    split: str = typer.Option("test", "--split"),
    shots: str = typer.Option("1,2,5,10", "--shots", help="Comma-separated photos per class."),
    episodes: int = typer.Option(20, "--episodes", min=1),
    out: Path | None = typer.Option(None, "--out", help="JSON results file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    seed: int = typer.Option(0, "--seed"),
    backbone: str | None = typer.Option(None, "--backbone", help="A bare pretrained timm backbone."),
    weights: str | None = typer.Option(None, "--weights", help="Local weights file for --backbone."),
    img_size: int = typer.Option(224, "--img-size", help="Input size for --backbone."),
    crop_mode: str | None = typer.Option(None, "--crop-mode", help="center | squash"),
    device: str = typer.Option("cpu", "--device"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
) -> None:
    """Few-shot accuracy on a split's classes: nearest-centroid (SimpleShot) and 1-NN, mean ± 95 % CI."""
    from carspotter.retrieval.fewshot import embed_split, run_episodes
    from carspotter.utils import atomic_write_json

    try:
        shot_list = [int(s) for s in shots.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots {shots!r}: expected comma-separated integers like 1,2,5,10") from None
    if out is not None and out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite or choose another --out")
    emb, labels, about = embed_split(
        str(target) if target else None, str(data), split, backbone=backbone, weights=weights,
        img_size=img_size, crop_mode=crop_mode, device=device, batch_size=batch_size,
    )  # fmt: skip
    res = run_episodes(emb, labels, shot_list, episodes, seed)
    typer.echo(f"{about['n_images']} photos, {about['n_classes']} classes of {split}, embedded once in "
               f"{about['embed_s']:.1f} s; {episodes} episodes per shot count (seed {seed})")  # fmt: skip
    typer.echo(f"{'shots':>5}  {'nearest-centroid':>18}  {'1-NN':>18}")
    for r in res.values():
        nc, nn = r["nearest_centroid"], r["1nn"]
        typer.echo(
            f"{r['shots']:>5}  {100 * nc['accuracy']:>9.1f} ± {100 * nc['ci95']:.1f} %"
            f"  {100 * nn['accuracy']:>9.1f} ± {100 * nn['ci95']:.1f} %"
        )
    if out is not None:
        atomic_write_json(out, {"about": about, "episodes": episodes, "seed": seed, "shots": res})
        typer.echo(f"→ {out}")


def register(app: typer.Typer) -> None:
    """Add `enrol`, `unenrol`, `classes`, `fewshot`."""
    app.command("enrol")(enrol)
    app.command("unenrol")(unenrol)
    app.command("classes")(classes)
    app.command("fewshot")(fewshot)
