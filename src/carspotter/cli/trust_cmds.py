"""`carspotter predict` (make → model → year, calibrated, "unknown"; batch JSON/CSV) and `carspotter calibrate`."""

from __future__ import annotations

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


def predict(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    paths: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    k: int = typer.Option(5, "--k", help="How many classes to list per photo."),
    as_json: bool = typer.Option(False, "--json", help="Print the answers as JSON (as /api/classify gives)."),
    out: Path | None = typer.Option(None, "--out", help="Write the answers to a .csv (or .json) file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    device: str = typer.Option("cpu", "--device"),
    batch_size: int = typer.Option(32, "--batch-size"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    tta: str | None = typer.Option(None, "--tta", help="none | flip (default: the run's eval.tta)."),
    zoom: ZoomFlag = False,
    zoom_combine: ZoomCombine = "gate",
    zoom_margin: ZoomMargin = None,
    box_threshold: BoxThreshold = None,
    box_margin: BoxMargin = None,
    index: Path | None = typer.Option(
        None,
        "--index",
        help="A gallery index: answer over trained + gallery (incl. enrolled) classes; evidence for --explain.",
    ),
    gallery_weight: float | None = typer.Option(
        None, "--gallery-weight", min=0.0, max=1.0, help="With --index: weight of the gallery's vote (0.5)."
    ),
    explain: Path | None = typer.Option(
        None,
        "--explain",
        help="Also write heat-map, evidence panel and explain.json per photo into this folder.",
    ),
) -> None:
    """Say which car each photo shows: make → model → year with calibrated probabilities, or "not sure",
    and where the car is in the photo (`box`, normalised x1, y1, x2, y2)."""
    from functools import partial

    from carspotter.engine.answer import answer_lines
    from carspotter.engine.batch_predict import answers_csv, answers_json, expand_paths, predict_files
    from carspotter.explain.zoom import Looker
    from carspotter.models.inference import autocast_dtype, normalize_tta
    from carspotter.utils import OutputExistsError, atomic_write_text

    if k < 1:
        raise ValueError(f"--k {k}: must be at least 1")
    if out is not None and out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out}: already exists; pass --overwrite to replace it or choose another --out"
        )
    if out is not None and out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; --out takes a file name (predictions.csv)")
    files = expand_paths(paths)
    if not files:
        raise ValueError(f"no image files found in {', '.join(map(str, paths))}")
    from tqdm import tqdm

    bar = tqdm(
        total=len(files), unit="img", desc="photos", leave=False, disable=not progress or len(files) < 2
    )
    try:
        from carspotter.rundir import read_model_info

        info = read_model_info(run_dir)
        tta_used = normalize_tta(info.tta if tta is None else tta, where="--tta")
        looker = partial(
            Looker,
            box=box_settings(box_threshold, box_margin),
            zoom=zoom_settings(zoom, zoom_combine, zoom_margin),
            device=device,
            autocast=autocast_dtype(info.amp, device),
            tta=tta_used,
        )
        rows = predict_files(
            run_dir,
            files,
            k=k,
            device=device,
            batch_size=batch_size,
            progress=bar.update,
            tta=tta_used,
            looker=looker,
            index_dir=index,
            gallery_weight=gallery_weight,
        )
    finally:
        bar.close()
    if out is not None:
        text = answers_json(rows) if out.suffix.lower() == ".json" else answers_csv(rows)
        atomic_write_text(out, text)
        n_err = sum(1 for r in rows if r.get("error"))
        n_unk = sum(1 for r in rows if r.get("unknown"))
        typer.echo(f"wrote {len(rows)} rows to {out} ({n_err} unreadable, {n_unk} answered 'unknown')")
    if as_json:
        typer.echo(answers_json(rows), nl=False)
    elif out is None:
        for r in rows:
            where = f"  car at x1,y1,x2,y2 = {r['box']}" if r.get("box") else ""
            typer.echo(r["path"] + where + ("  (zoomed)" if r.get("zoomed") else ""))
            for line in answer_lines(r):
                typer.echo(f"  {line}")
            if not r.get("error"):
                for i, t in enumerate(r["predictions"]):
                    typer.echo(f"    {i + 1}. {t['class_name']}  {100 * t['probability']:.1f} %")

    if explain is not None:
        from carspotter.cli.explain_cmds import load_explainer, write_batch
        from carspotter.explain.cam import DEFAULT_METHOD

        px = load_explainer(run_dir, index, DEFAULT_METHOD, device)
        ok = [f for f, r in zip(files, rows, strict=True) if not r.get("error")]
        typer.echo(f"explanations → {write_batch(px, ok, explain, 3, overwrite, typer.echo)}")


def calibrate(
    run_dir: Path = typer.Argument(..., help="A classification run directory."),
    data: Path | None = typer.Option(None, "--data", help="Prepared dataset (default: the run's own)."),
    split: str = typer.Option("val", "--split", help="Known photos to fit on (never the test split)."),
    score: str = typer.Option("msp", "--score", help="Open-set score: msp | energy."),
    accept: float = typer.Option(0.95, "--accept", help="Share of known photos the threshold lets through."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
) -> None:
    """Fit temperature scaling and the open-set threshold on val; writes RUN/calibration.json."""
    from carspotter.engine.calibration import CALIBRATION, calibrate_run

    if split == "test":
        raise ValueError("--split test: calibrating on the test split would leak it into every test figure")
    cal = calibrate_run(
        run_dir, data, split, score=score, accept=accept, device=device, batch_size=batch_size
    )
    m = cal.fit_metrics
    typer.echo(f"temperature {cal.temperature:.4f}  (fitted on {cal.n_fit} photos of {split})")
    typer.echo(
        f"on {split}: ECE {m['ece_uncalibrated']:.4f} → {m['ece']:.4f}, "
        f"NLL {m['nll_uncalibrated']:.4f} → {m['nll']:.4f}"
    )
    typer.echo(
        f"open set: {cal.open_set_score} threshold {cal.threshold:.4f} ({100 * accept:.0f} % of known pass)"
    )
    typer.echo(f"wrote {run_dir / CALIBRATION}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app (`predict` replaces the flat top-k one)."""
    app.command("predict")(friendly_errors(predict))
    app.command("calibrate")(friendly_errors(calibrate))
