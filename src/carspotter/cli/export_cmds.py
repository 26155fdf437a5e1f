"""`carspotter export`: a run → one ONNX file (logits + embedding), checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from carspotter.cli.common import friendly_errors


def export(
    run_dir: Path = typer.Argument(..., help="A run directory (model.json + best.safetensors)."),
    onnx: Path = typer.Option(..., "--onnx", help="The ONNX file to write."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size of the exported graph (default: the run's)."
    ),
    check_images: list[Path] = typer.Option(
        [],
        "--check-images",
        help="Images or folders (searched recursively) for the parity check; default: random tensors.",
    ),
    max_check_images: int = typer.Option(
        16, "--max-check-images", help="Use at most this many check images."
    ),
    atol: float = typer.Option(1e-3, "--atol", help="Fail if an output differs by more than this."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --onnx file."),
) -> None:
    """Export a run to ONNX (dynamic batch; outputs `logits`, `embedding`; preprocessing in the metadata)."""
    from carspotter.export import export_onnx

    rep = export_onnx(
        run_dir,
        onnx,
        opset=opset,
        img_size=img_size,
        overwrite=overwrite,
        check_images=check_images or None,
        max_check_images=max_check_images,
    )
    typer.echo(
        f"wrote {rep['onnx']} ({rep['bytes'] / 1e6:.2f} MB, opset {rep['opset']} via {rep['exporter']}, "
        f"input (batch, 3, {rep['img_size']}, {rep['img_size']}), {rep['num_classes']} classes, "
        f"embedding {rep['embed_dim']})"
    )
    typer.echo(f"parity vs onnxruntime on {rep['check_inputs']}, batch sizes {rep['batch_sizes']}:")
    worst = 0.0
    for name, d in rep["max_abs_diff"].items():
        typer.echo(f"  {name:<10} max abs diff {d:.3g}  (max |value| {rep['max_abs_value'][name]:.3g})")
        worst = max(worst, d)
    if worst > atol:
        msg = f"error: parity check failed: max abs diff {worst:.3g} > --atol {atol:g} ({onnx} kept)"
        typer.echo(msg, err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("export")(friendly_errors(export))
