"""`carspotter index` and `carspotter search`: build a gallery index, query it with photos."""

from __future__ import annotations

from pathlib import Path

import typer

from carspotter.cli.common import friendly_errors


@friendly_errors
def index(
    run_dir: Path | None = typer.Argument(
        None, help="A run directory (omit with --backbone for frozen features)."
    ),
    data: Path = typer.Option(..., "--data", help="Prepared dataset whose photos form the gallery."),
    split: str = typer.Option("train", "--split", help="train | val | test | all | train+val"),
    out: Path | None = typer.Option(None, "--out", help="Index directory (default: RUN_DIR/index-SPLIT)."),
    metric: str = typer.Option("euclidean", "--metric", help="euclidean | cosine"),
    index_type: str = typer.Option(
        "Flat",
        "--index-type",
        help="FAISS index_factory string: Flat, HNSW32, 'IVF1024,Flat', 'IVF1024,PQ16' …",
    ),
    nprobe: int = typer.Option(16, "--nprobe", help="IVF lists visited per query."),
    ef_search: int = typer.Option(64, "--ef-search", help="HNSW search breadth."),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Bare pretrained timm backbone instead of a run."
    ),
    weights: str | None = typer.Option(None, "--weights", help="Local weights file for --backbone."),
    img_size: int = typer.Option(224, "--img-size", help="Input size for --backbone."),
    crop_mode: str | None = typer.Option(
        None,
        "--crop-mode",
        help="center (shorter side, centre crop) | squash (whole photo to a square); default: the run's, or center.",
    ),
    source: str = typer.Option("auto", "--source", help="auto | features | embedding"),
    batch_size: int = typer.Option(64, "--batch-size"),
    num_workers: int = typer.Option(0, "--num-workers"),
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index directory."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Embed in N processes under torchrun; rank 0 writes."
    ),
) -> None:
    """Embed the photos of a prepared split and save a FAISS index with their metadata."""
    from carspotter.cli.catalogue_cmds import _relaunch_if
    from carspotter.engine.distributed import cleanup, init_distributed
    from carspotter.retrieval.build import backbone_model, build_index_from_run

    if _relaunch_if(nproc):
        return

    if (run_dir is None) == (backbone is None):
        raise ValueError("give either RUN_DIR or --backbone NAME (with --weights PATH when offline)")
    if run_dir is not None:
        target: object = run_dir
        out = out or run_dir / f"index-{split}"
        model_info = None
    else:
        target = backbone_model(backbone, weights, img_size)  # type: ignore[arg-type]
        if out is None:
            raise ValueError("--out is required with --backbone")
        model_info = {"backbone": backbone, "weights": str(Path(weights).resolve()) if weights else None}
    dist, dev = init_distributed(device)
    try:
        idx = build_index_from_run(
            target,  # type: ignore[arg-type]
            data,
            split,
            metric,
            index_type,
            out,
            batch_size=batch_size,
            device=str(dev),
            num_workers=num_workers,
            source=source,
            nprobe=nprobe,
            ef_search=ef_search,
            overwrite=overwrite,
            model_info=model_info,
            crop_mode=crop_mode,
            dist=dist,
        )
    finally:
        cleanup(dist)
    if idx is None:  # not rank 0
        return
    info = idx.info
    typer.echo(
        f"indexed {info['n']} photos ({info['dim']}-d, {metric}, {index_type}) "
        f"in {info['embed_time_s']:.1f} s "
        f"→ {out}\nnext: carspotter evaluate {out}   |   carspotter search {out} PHOTO.jpg"
    )


@friendly_errors
def search(
    index_dir: Path = typer.Argument(..., help="An index directory."),
    images: list[Path] = typer.Argument(..., help="Query photos."),
    k: int = typer.Option(10, "--k", min=1, max=1000),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Print the nearest gallery photos with distances and class names."""
    from rich.console import Console
    from rich.table import Table

    from carspotter.data.images import open_rgb
    from carspotter.retrieval.catalogue import photo_path
    from carspotter.retrieval.index import GalleryIndex
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    idx = GalleryIndex.load(index_dir)
    model = embedder_for_index(idx, device)
    photos = [open_rgb(p) for p in images]
    q = embed_queries(idx, model, photos, device)  # (Q, D)
    dists, ids = idx.search(q, k)
    for path, drow, irow in zip(images, dists, ids, strict=True):
        t = Table(title=str(path), title_justify="left")
        for h in ("#", "distance", "class", "photo"):
            t.add_column(h)
        for rank, (d, i) in enumerate(zip(drow, irow, strict=True), start=1):
            if i < 0:
                continue
            m = idx.meta[int(i)]
            t.add_row(str(rank), f"{d:.4f}", m["class_name"], str(photo_path(index_dir, idx, int(i))))
        Console().print(t)


def register(app: typer.Typer) -> None:
    """Add `index` and `search`."""
    app.command("index")(index)
    app.command("search")(search)
