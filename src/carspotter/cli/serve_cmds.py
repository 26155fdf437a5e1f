"""`carspotter serve`: the web page and JSON API over a trained run (and optionally a gallery index)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from carspotter.cli.common import (
    BoxMargin,
    BoxThreshold,
    ZoomCombine,
    ZoomFlag,
    ZoomMargin,
    box_settings,
    friendly_errors,
    zoom_settings,
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@friendly_errors
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory (model.json + best.safetensors)."),
    index: Path | None = typer.Option(None, "--index", help="A gallery index dir (from `carspotter index`)."),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to bind; the default is reachable from this machine only."
    ),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(
        10.0, "--max-upload-mb", min=0.01, help="Largest accepted photo (MB)."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | mps | auto."),
    max_batch: int = typer.Option(
        8, "--max-batch", min=1, max=256, help="Most requests grouped in one forward."
    ),
    threads: int = typer.Option(
        1,
        "--threads",
        min=0,
        help="torch threads for the model (0 = torch's default; see docs/RELIABILITY.md).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    zoom: ZoomFlag = False,
    zoom_combine: ZoomCombine = "gate",
    zoom_margin: ZoomMargin = None,
    box_threshold: BoxThreshold = None,
    box_margin: BoxMargin = None,
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        help="A Host name clients may use besides localhost and the bind address (repeatable; '*' = any).",
    ),
    admin_token_file: Path | None = typer.Option(
        None, "--admin-token-file", help="Enable POST/DELETE /api/enrol for callers with this file's token."
    ),
    tta: str | None = typer.Option(None, "--tta", help="none | flip (default: the run's eval.tta)."),
) -> None:
    """Serve a page where a photo gets its top-5 classes and its most similar gallery photos."""
    import torch
    import uvicorn

    from carspotter.serve.app import create_app
    from carspotter.serve.hosts import allowed_hosts_for
    from carspotter.utils import resolve_device

    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if index is not None and not index.is_dir():
        raise FileNotFoundError(f"--index {index}: no such index directory")
    if not _is_loopback(host):
        typer.echo(f"warning: binding {host} makes the service reachable from other machines", err=True)
        if not allow_host:
            typer.echo("note: only Host names localhost/127.0.0.1/the bind address are accepted; add "
                       "--allow-host NAME for the name clients use", err=True)  # fmt: skip
    if threads:
        # One intra-op thread by default: the HTTP and decode threads share the cores, and OpenMP threads
        # waiting on a descheduled sibling made a forward 10x slower on a busy 2-core machine.
        torch.set_num_threads(threads)
    app = create_app(
        run_dir,
        index,
        max_upload_mb=max_upload_mb,
        device=resolve_device(device),
        max_batch=max_batch,
        zoom=zoom_settings(zoom, zoom_combine, zoom_margin),
        box=box_settings(box_threshold, box_margin),
        allowed_hosts=allowed_hosts_for(host, allow_host),
        admin_token_file=admin_token_file,
        tta=tta,
    )
    typer.echo(
        f"carspotter: serving {run_dir}"
        + (f" with index {index}" if index else "")
        + f" on http://{host}:{port}/"
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)


def register(app: typer.Typer) -> None:
    """Add `serve` to the main app."""
    app.command("serve")(serve)
