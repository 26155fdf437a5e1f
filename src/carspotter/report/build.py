"""`build_report(run_dirs, index_dirs, out_dir)`: report.md + one self-contained report.html + the PNGs.

It reads run and index directories only; every missing piece becomes "—" and a note, never an exception,
so a half-finished set of experiments still gets a useful report.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from carspotter.report import plots
from carspotter.report.html import Figure, Para, Section, render_html, render_markdown
from carspotter.report.load import RunRecord, load_index_record, load_run_record, read_predictions
from carspotter.report.tables import (
    confused_pairs_table,
    hyperparameter_table,
    metric_table,
    random_weight_runs,
    results_tables,
    scratch_runs,
    transfer_runs,
)
from carspotter.utils import OutputExistsError, atomic_write_bytes, atomic_write_text, prepare_out_dir

log = logging.getLogger(__name__)
MARKER = "report.html"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "run"


def best_classification_run(runs: list[RunRecord]) -> RunRecord | None:
    """Highest test accuracy among classification runs that have predictions.csv."""
    cands = [
        r
        for r in transfer_runs(runs) + scratch_runs(runs)
        if r.has_predictions and r.metrics and isinstance(r.metrics.get("accuracy"), int | float)
    ]
    return max(cands, key=lambda r: r.metrics["accuracy"]) if cands else None  # type: ignore[index]


def _curves_section(runs: list[RunRecord]) -> Section:
    sec = Section("Training curves")
    for r in runs:
        if r.task == "knn":  # no training of its own: its network's curves are under that run
            continue
        png = plots.training_curves(r.history, r.name) if r.history else None
        if png:
            sec.blocks.append(
                Figure(f"curves_{_slug(r.name)}.png", png, f"{r.name}: loss and accuracy per epoch")
            )
        else:
            sec.blocks.append(Para(f"{r.name}: — (no metrics.csv with per-epoch numbers)", "note"))
    if not sec.blocks:
        sec.blocks.append(Para("— no run has per-epoch metrics.", "note"))
    return sec


def _confusion_section(runs: list[RunRecord], top_n: int) -> Section:
    sec = Section("Confusion matrix")
    best = best_classification_run(runs)
    if best is None:
        sec.blocks.append(Para("— no classification run with metrics.json and predictions.csv.", "note"))
        return sec
    y, p = read_predictions(best.predictions)
    names = best.class_names
    n = max([len(names), *(v + 1 for v in y + p)]) if (y or p) else len(names)
    names = names + [f"class {i}" for i in range(len(names), n)]
    if not y:
        sec.blocks.append(Para(f"— {best.predictions} has no usable rows.", "note"))
        return sec
    cm = plots.confusion(y, p, n)
    acc = best.metrics.get("accuracy") if best.metrics else None
    sec.blocks.append(
        Para(
            f"Best classification run: {best.name} (test accuracy {acc * 100:.1f} %, {len(y)} test images)."
            if isinstance(acc, float)
            else best.name
        )
    )
    png = plots.confusion_heatmap(cm, names, f"{best.name}", top_n=top_n)
    sec.blocks.append(
        Figure(
            f"confusion_{_slug(best.name)}.png",
            png,
            "Rows: true class; colour: share of the true class's test images",
        )
    )
    sec.blocks.append(confused_pairs_table(plots.most_confused_pairs(cm, names), best.name))
    return sec


def _grid_section(index_dirs: list[Path], n_queries: int, k: int) -> Section:
    from carspotter.report.grid import retrieval_examples

    sec = Section("Retrieval examples")
    if not index_dirs:
        sec.blocks.append(Para("— no index dir given (pass --index INDEX_DIR).", "note"))
    names = [ix.name for ix in index_dirs]
    for ix in index_dirs:
        # two indexes with one folder name (run-a/index-test, run-b/index-test) must not share a figure
        label = f"{ix.parent.name}/{ix.name}" if names.count(ix.name) > 1 else ix.name
        try:
            png, how = retrieval_examples(ix, n_queries=n_queries, k=k)
        except Exception as e:  # a broken index must not sink the rest of the report
            log.warning("retrieval grid for %s failed: %s", ix, e)
            sec.blocks.append(
                Para(f"{ix}: — retrieval examples unavailable ({type(e).__name__}: {e})", "note")
            )
            continue
        sec.blocks.append(Para(how + ". Green frame / ✓ = same class as the query; red / ✗ = another class."))
        sec.blocks.append(Figure(f"retrieval_{_slug(label)}.png", png, f"Retrieval examples from {label}"))
    return sec


def build_sections(
    run_dirs: list[Path],
    index_dirs: list[Path],
    *,
    top_n: int = 20,
    grid_queries: int = 4,
    grid_k: int = 5,
    notes: list[str] | None = None,
) -> list[Section]:
    runs = [load_run_record(d) for d in run_dirs]
    seen: dict[str, int] = {}
    for r in runs:  # two runs of one preset (e.g. two seeds) need distinct rows and figure names
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.name} ({r.path.name})"
    indexes = [load_index_record(d) for d in index_dirs]
    head = Section("Results", [Para(n) for n in notes or []])
    rand = random_weight_runs(runs)
    if rand:
        head.blocks.append(
            Para(
                "Runs from random weights: "
                + ", ".join(r.name for r in rand)
                + ". No ImageNet weights were available (offline, no --weights file), so transfer "
                "learning could not transfer anything; expect much lower numbers than the reference column.",
                "warn",
            )
        )
    head.blocks += results_tables(runs)
    mt = metric_table(runs, indexes)
    if mt is not None:
        head.blocks.append(mt)
    hp = Section("Hyperparameters", [hyperparameter_table(runs)])
    return [
        head,
        hp,
        _curves_section(runs),
        _confusion_section(runs, top_n),
        _grid_section([i.path for i in indexes], grid_queries, grid_k),
    ]


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    index_dirs: list[str | Path] | None = None,
    overwrite: bool = False,
    title: str = "carspotter experiment report",
    grid_queries: int = 4,
    grid_k: int = 5,
    notes: list[str] | None = None,
) -> Path:
    """Write OUT/report.md, OUT/report.html (self-contained) and OUT/*.png; returns the html path.

    `notes` are paragraphs shown above the tables (e.g. how the runs were scaled).
    """
    runs = [Path(d) for d in run_dirs]
    idx = [Path(d) for d in index_dirs or []]
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: already exists and is not empty; pass --overwrite to replace it or choose another --out"
        )
    out = prepare_out_dir(out, overwrite=overwrite, marker=MARKER)
    sections = build_sections(runs, idx, grid_queries=grid_queries, grid_k=grid_k, notes=notes)
    subtitle = (
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(runs)} run dir(s)"
        f"{f' and {len(idx)} index dir(s)' if idx else ''}."
    )
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                atomic_write_bytes(out / b.filename, b.png)
    atomic_write_text(out / "report.md", render_markdown(title, sections, subtitle))
    atomic_write_text(out / MARKER, render_html(title, sections, subtitle))
    return out / MARKER
