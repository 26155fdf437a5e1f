"""Read run dirs and index dirs into plain records for the report.

The report reads only files (config.yaml, model.json, metrics.csv, metrics_test.json, metrics_test_knn*.json,
predictions_test.csv — or their pre-contract names metrics.json, metrics_knn*.json, predictions.csv; index.json,
meta.csv, metrics.json; names from `carspotter.rundir`), never a model, so it works on any machine that has
the directories. Every missing or unreadable piece becomes a note instead of an exception.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carspotter import rundir
from carspotter.config import ConfigError, ExperimentConfig, load_config

SCRATCH = "scratch_cnn"


@dataclass
class KnnResult:
    """One kNN evaluation (a row of the Retrieval (kNN) table)."""

    name: str
    description: str
    metrics: dict[str, Any]
    reference: dict[str, float]
    source: Path


@dataclass
class RunRecord:
    path: Path
    name: str
    cfg: ExperimentConfig | None
    model_info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows
    metrics: dict[str, Any] | None = None  # metrics.json
    knn: list[KnnResult] = field(default_factory=list)  # metrics_knn*.json (+ metrics.json of a knn run)
    has_predictions: bool = False
    predictions: Path | None = None  # predictions_test.csv (or a pre-contract predictions.csv)
    notes: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.cfg.task if self.cfg else "classification"

    @property
    def is_scratch(self) -> bool:
        return bool(self.cfg and self.cfg.model.arch == SCRATCH)

    @property
    def class_names(self) -> list[str]:
        return list(self.model_info.get("class_names") or [])


@dataclass
class IndexRecord:
    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    meta: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{path}: unreadable ({e}); shown as —")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path}: expected a JSON object; shown as —")
        return None
    return obj


def _num(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def read_history(path: Path, notes: list[str]) -> list[dict[str, float]]:
    """metrics.csv → list of {column: float} (empty cells dropped)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        notes.append(f"{path}: unreadable ({e})")
        return []
    return [{k: _num(v) for k, v in r.items() if k and v not in (None, "")} for r in rows]  # type: ignore[misc]


def read_predictions(path: Path) -> tuple[list[int], list[int]]:
    """predictions.csv → (labels, preds); rows with a non-integer label/pred are skipped."""
    y, p = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                y.append(int(row["label"]))
                p.append(int(row["pred"]))
            except (KeyError, TypeError, ValueError):
                continue
    return y, p


def _knn_name(run: RunRecord, m: dict[str, Any], stem: str) -> str:
    if m.get("name"):
        return str(m["name"])
    bits = [f"k={m['k']}" if "k" in m else "", str(m.get("metric", ""))]
    bits = [b for b in bits if b]
    suffix = stem.removeprefix("metrics_test_knn").removeprefix("metrics_knn").strip("_-") or ""
    label = ", ".join(bits) or suffix or "kNN"
    return f"{run.name} + kNN ({label})"


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Everything the report needs from one run dir; never raises for missing/bad files."""
    path = Path(run_dir)
    notes: list[str] = []
    cfg = None
    if not path.is_dir():
        notes.append(f"{path}: not a directory")
    elif (path / rundir.CONFIG).is_file():
        try:
            cfg = load_config(path / rundir.CONFIG)
        except ConfigError as e:
            notes.append(f"{path / rundir.CONFIG}: unreadable ({e})")
    else:
        notes.append(f"{path}: no {rundir.CONFIG}")
    name = cfg.name if cfg and cfg.name and cfg.name != "custom" else path.name
    rec = RunRecord(path=path, name=name, cfg=cfg, notes=notes)
    rec.model_info = _read_json(path / rundir.MODEL_JSON, notes) or {}
    rec.history = read_history(path / rundir.HISTORY, notes)
    metrics_path = rundir.find_test_metrics(path) if path.is_dir() else None
    rec.metrics = _read_json(metrics_path, notes) if metrics_path else None
    rec.predictions = rundir.find_predictions(path) if path.is_dir() else None
    rec.has_predictions = rec.predictions is not None
    knn_files = rundir.knn_result_files(path)
    if path.is_dir() and rec.metrics is None:
        if rec.task != "knn":
            notes.append(
                f"{path.name}: no {rundir.metrics_name('test')} (run `carspotter evaluate {path}`); shown as —"
            )
        elif not knn_files:
            notes.append(f"{path.name}: no kNN evaluation (metrics_test_knn*.json) yet; shown as —")
    ref = dict(cfg.reference) if cfg else {}
    desc = cfg.description if cfg else ""
    if rec.task == "knn" and rec.metrics is not None:
        rec.knn.append(KnnResult(rec.name, desc, rec.metrics, ref, metrics_path or path))
    for p in knn_files:
        m = _read_json(p, notes)
        if m is None:
            continue
        own = rec.task == "knn" and not rec.knn  # a knn run's own evaluation carries its preset's reference
        rec.knn.append(
            KnnResult(
                name=rec.name if own else _knn_name(rec, m, p.stem),
                description=str(m.get("description") or desc),
                metrics=m,
                reference=ref if own else dict(m.get("reference") or {}),
                source=p,
            )
        )
    return rec


def load_index_record(index_dir: str | Path) -> IndexRecord:
    path = Path(index_dir)
    rec = IndexRecord(path=path)
    rec.info = _read_json(path / rundir.INDEX_JSON, rec.notes) or {}
    if not rec.info:
        rec.notes.append(f"{path}: no {rundir.INDEX_JSON} — not an index dir?")
    meta = path / rundir.META_CSV
    if meta.is_file():
        with meta.open(newline="", encoding="utf-8") as f:
            rec.meta = list(csv.DictReader(f))
    rec.metrics = _read_json(path / rundir.INDEX_METRICS, rec.notes)
    if rec.metrics is None:
        rec.notes.append(f"{path.name}: no metrics.json (run `carspotter index evaluate {path}`); shown as —")
    return rec
