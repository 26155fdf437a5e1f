"""`carspotter train | evaluate | predict | presets`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from carspotter.cli.common import (
    BoxMargin,
    BoxThreshold,
    ZoomCombine,
    ZoomFlag,
    ZoomMargin,
    box_settings,
    config_options,
    friendly_errors,
    zoom_settings,
)


def _table(title: str, rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    Console().print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def _relaunch(nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with `nproc` processes (minus `--nproc`)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*cmd, "-m", "carspotter", *args])


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@config_options
def train(
    preset: str | None = typer.Option(None, "--preset", help="A preset name (see `carspotter presets`)."),
    config: Path | None = typer.Option(None, "--config", help="An ExperimentConfig YAML file."),
    data: Path | None = typer.Option(None, "--data", help="A prepared dataset directory."),
    out: Path = typer.Option(..., "--out", help="The run directory to create (or --resume)."),
    overrides: dict[str, Any] | None = None,  # --epochs, --img-size, …: one option per config.ALIASES entry
    set_: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE config override, e.g. optim.name=sgd (repeatable)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    nproc: int = typer.Option(1, "--nproc", help="Train data-parallel with N processes (torchrun)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a classifier (or metric-learning model) from a preset or config file."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(nproc))
    from carspotter.config import apply_overrides, load_config, parse_set_args
    from carspotter.presets import load_preset
    from carspotter.rundir import CONFIG, read_run_config

    if preset and config:
        raise ValueError("give either --preset or --config, not both")
    if preset:
        cfg = load_preset(preset)
    elif config:
        cfg = load_config(config)
    elif resume and (out / CONFIG).is_file():
        cfg = read_run_config(out)
    else:
        raise ValueError("give --preset NAME (see `carspotter presets`) or --config FILE")
    cfg = apply_overrides(cfg, overrides or {})
    cfg = apply_overrides(cfg, parse_set_args(set_))
    data_dir = data or (Path(cfg.data.root) if cfg.data.root else None)
    if data_dir is None:
        raise ValueError("give --data PREPARED_DIR (make one with `carspotter data prepare`)")

    from carspotter.engine.train import fit

    summary = fit(cfg, data_dir, out, resume=resume, overwrite=overwrite, progress=progress)
    if _is_main_rank():
        last = summary["last"]
        rows = [
            ("run", summary["run_dir"]),
            ("epochs", summary["epochs_completed"]),
            (f"best epoch (by {summary['select_metric']})", summary["best_epoch"]),
            ("best value", summary["best_value"]),
            *[(k, v) for k, v in last.items() if k.startswith(("train_", "val_"))],
            ("wall time (s)", summary["wall_time_s"]),
        ]
        _table("training done", rows, ("", "value"))
        typer.echo(f"next: carspotter evaluate {summary['run_dir']}")


def evaluate(
    path: Path = typer.Argument(..., help="A run directory, or an index directory (holding index.faiss)."),
    data: Path | None = typer.Option(None, "--data", help="Prepared dataset (default: the run's own)."),
    split: str = typer.Option("test", "--split"),
    knn: bool = typer.Option(
        False, "--knn", help="kNN-classify with the run's retrieval settings (k, metric, weighting, gallery)."
    ),
    k: int | None = typer.Option(None, "--k", help="kNN neighbours (default: the run's retrieval.k)."),
    metric: str | None = typer.Option(
        None, "--metric", help="kNN distance: euclidean | cosine (default: the run's retrieval.metric)."
    ),
    gallery_split: str | None = typer.Option(
        None,
        "--gallery-split",
        help="kNN gallery split of a run: train | train+val | all (default: the run's).",
    ),
    weighting: str | None = typer.Option(
        None, "--weighting", help="kNN vote: majority | distance (default: the run's retrieval.weighting)."
    ),
    device: str = typer.Option("auto", "--device"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    zoom: ZoomFlag = False,
    zoom_combine: ZoomCombine = "gate",
    zoom_margin: ZoomMargin = None,
    box_threshold: BoxThreshold = None,
    box_margin: BoxMargin = None,
    tta: str | None = typer.Option(
        None, "--tta", help="none | flip (default: the run's eval.tta; with --knn: flip-averaged embeddings)."
    ),
    embed_source: str = typer.Option(
        "auto", "--embed-source", help="kNN layer: auto | features (pooled pre-logit) | embedding | logits."
    ),
    l2: bool = typer.Option(False, "--l2/--no-l2", help="kNN: L2-normalise embeddings before the search."),
) -> None:
    """Evaluate a run on a split (metrics_SPLIT.json, predictions_SPLIT.csv), kNN on its embeddings, or an index."""
    from carspotter.rundir import is_index_dir, read_run_config

    knn = knn or k is not None
    if is_index_dir(path) and knn:
        from carspotter.retrieval.knn import evaluate_knn_index

        if data is None:
            raise ValueError("--data is required to kNN-classify a split against an index")
        if k is None:
            raise ValueError("--k K is required to kNN-classify against an index (it has no preset)")
        result = evaluate_knn_index(path, data, k, split, weighting or "majority", device=device)
        title = f"kNN k={k} ({result['metric']}) of {split} against index {path}"
    elif is_index_dir(path):
        from carspotter.retrieval import evaluate_index

        result = evaluate_index(path)
        title = f"index {path}"
    elif knn:
        from carspotter.config import RetrievalConfig
        from carspotter.retrieval.knn import evaluate_knn_run
        from carspotter.rundir import CONFIG

        # the run's (its preset's) kNN settings unless overridden here
        r = read_run_config(path).retrieval if (path / CONFIG).is_file() else RetrievalConfig()
        k, metric = k if k is not None else r.k, metric or r.metric
        result = evaluate_knn_run(
            path,
            data,
            k,
            metric,
            split,
            gallery_split or r.gallery_split,
            device=device,
            weighting=weighting or r.weighting,
            source=embed_source,
            tta=tta or "none",
            normalize=l2,
        )
        title = f"kNN k={k} ({metric}) on {split}"
    elif zoom:
        from carspotter.explain.zoom import evaluate_zoom

        result = evaluate_zoom(
            path,
            data,
            split,
            device,
            batch_size or 32,
            zoom_settings(True, zoom_combine, zoom_margin),
            box_settings(box_threshold, box_margin),
        )
        title = f"{path} on {split}, with a second look at the CAM box ({zoom_combine})"
    else:
        from carspotter.engine.evaluate import evaluate_run

        result = evaluate_run(path, data, split=split, device=device, batch_size=batch_size, tta=tta)
        title = f"{path} on {split}"
    written = result.save()
    _table(title, [(k, v) for k, v in result.items() if not isinstance(v, dict | list)], ("metric", "value"))
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def presets() -> None:
    """List the built-in experiment presets."""
    from carspotter.presets import preset_descriptions

    _table(
        "presets (use with `carspotter train --preset NAME`)",
        list(preset_descriptions().items()),
        ("name", "description"),
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("train")(friendly_errors(train))
    app.command("evaluate")(friendly_errors(evaluate))
    app.command("presets")(friendly_errors(presets))
