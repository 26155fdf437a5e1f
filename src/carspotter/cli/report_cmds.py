"""`carspotter report` (tables + plots from run/index dirs) and `carspotter demo` (everything, end to end)."""

from __future__ import annotations

from pathlib import Path

import typer

from carspotter.cli.common import friendly_errors


@friendly_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (from `carspotter train`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory: report.html, report.md and PNGs."),
    index: list[Path] = typer.Option(
        [], "--index", help="Index directory for retrieval examples (repeatable)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report directory."),
) -> None:
    """Write the experiment report (report.html + report.md) from run and index dirs.

    Results tables in the reference layout, hyperparameters, training curves, the confusion matrix of
    the best run and retrieval examples. Reads run/index dirs only."""
    from carspotter.report import build_report

    for d in [*run_dirs, *index]:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such directory")
    html = build_report(run_dirs, out, index_dirs=index, overwrite=overwrite)
    typer.echo(f"report: {html}")
    typer.echo(f"        {html.parent / 'report.md'}")


@friendly_errors
def demo(
    out: Path = typer.Option(Path("carspotter-demo"), "--out", "-o", help="Output directory for everything."),
    data: Path | None = typer.Option(
        None, "--data", help="A prepared dataset; default: generate a synthetic one."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="ImageNet weights for the transfer backbone (e.g. tf_efficientnet_lite0 .safetensors).",
    ),
    backbone: str = typer.Option(
        "tf_efficientnet_lite0", "--backbone", help="timm backbone for transfer/kNN runs."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing demo directory."),
    budget_s: float = typer.Option(
        180.0, "--budget-s", help="Time budget in seconds; epochs are scaled to fit."
    ),
    threads: int = typer.Option(
        0, "--threads", help="CPU threads for torch; 0 = auto (leaves busy cores alone)."
    ),
    scale: str = typer.Option(
        "default", "--scale", help="default | tiny (a smoke test) | full (preset epochs)."
    ),
) -> None:
    """Run the whole study end to end, scaled down to minutes.

    All nine reference experiments plus strong recipes (real presets, small overrides), then the gallery
    index and the report; prints how to serve the best model."""
    import time

    from carspotter.demo import process_age, run_demo

    run_demo(
        out,
        data=data,
        weights=weights,
        backbone=backbone,
        overwrite=overwrite,
        budget_s=budget_s,
        scale=scale,
        threads=threads,
        started_at=time.perf_counter() - process_age(),  # `time carspotter demo` counts start-up too
        echo=typer.echo,
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("report")(report)
    app.command("demo")(demo)
