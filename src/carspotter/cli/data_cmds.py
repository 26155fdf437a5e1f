"""`carspotter data prepare | synth | inspect | layouts`: make and look at prepared datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from carspotter.cli.common import friendly_errors

data_app = typer.Typer(help="Prepare datasets: any Stanford Cars layout, or the built-in synthetic cars.",
                       no_args_is_help=True)  # fmt: skip


@data_app.command("prepare")
@friendly_errors
def prepare_cmd(
    src: str = typer.Argument(..., help="Source folder or CSV (any supported layout), or hf:REPO_ID."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the prepared dataset."),
    layout: str = typer.Option(
        "auto", help="auto | devkit | cars-annos | kaggle-csv | folders | parquet | manifest-csv"
    ),
    crop_bbox: bool = typer.Option(False, "--crop-bbox", help="Crop each photo to its bounding box first."),
    max_side: int = typer.Option(256, help="Longest side of the prepared images, in pixels."),
    val_fraction: float = typer.Option(0.1, help="Share of each class's train photos moved to val."),
    protocol: str = typer.Option(
        "classification", help="classification (source splits) | retrieval (classes 1-98 train, 99-196 test)"
    ),
    seed: int = typer.Option(0, help="Seed of the val carve-out."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing prepared dataset at --out."
    ),
    workers: int = typer.Option(2, help="Processes decoding and resizing photos."),
) -> None:
    """Validate, resize and index every photo of SRC into a prepared dataset (manifest.csv + images/)."""
    from tqdm import tqdm

    from carspotter.data.prepare import format_summary, prepare

    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc="photos", leave=False)
        bar.update(done - bar.n)

    try:
        summary = prepare(
            src, out, layout=layout, crop_bbox=crop_bbox, max_side=max_side, val_fraction=val_fraction,
            protocol=protocol, seed=seed, overwrite=overwrite, workers=workers, progress=progress,
            log=lambda m: typer.echo(m, err=True),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    typer.echo(format_summary(summary))
    typer.echo(f"prepared dataset written to {out}")


@data_app.command("synth")
@friendly_errors
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    classes: int = typer.Option(24, help="Number of car classes."),
    per_class: int = typer.Option(40, help="Photos per class."),
    size: int = typer.Option(96, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed: same seed, same photos."),
    val_fraction: float = typer.Option(0.1, help="Share of each class in val."),
    test_fraction: float = typer.Option(0.2, help="Share of each class in test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset at --out."),
) -> None:
    """Write the built-in synthetic fine-grained car dataset (no download needed)."""
    from carspotter.data.prepare import format_summary
    from carspotter.data.synth import make_synthetic

    summary = make_synthetic(
        out, classes=classes, per_class=per_class, size=size, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, overwrite=overwrite,
    )  # fmt: skip
    typer.echo(format_summary(summary))
    typer.echo(f"synthetic dataset written to {out}")


@data_app.command("inspect")
@friendly_errors
def inspect_cmd(
    root: Path = typer.Argument(..., help="A prepared dataset directory."),
    skipped: int = typer.Option(20, help="How many skipped files to list."),
) -> None:
    """Print a prepared dataset's summary (and check its manifest reads)."""
    from carspotter.data.manifest import class_names, read_manifest, read_summary
    from carspotter.data.prepare import format_summary

    records = read_manifest(root)
    names = class_names(records)
    summary = read_summary(root)
    if summary:
        typer.echo(format_summary(summary, max_skipped=skipped))
    else:
        typer.echo(f"{root}: no summary.json; manifest has {len(records)} rows, {len(names)} classes")


@data_app.command("detect")
@friendly_errors
def detect_cmd(src: str = typer.Argument(..., help="Source folder or CSV.")) -> None:
    """Say which layout SRC is and what was found (what `--layout auto` would pick)."""
    from carspotter.data.layouts import detect

    name, why = detect(src)
    typer.echo(f"{name}: {why}")


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the main app."""
    app.add_typer(data_app, name="data")
