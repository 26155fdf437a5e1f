"""The report's "Answers people can trust" section: make-level results, make confusions, calibration.

Built from the best classification run's predictions.csv (true label, predicted label, calibrated
confidence) and metrics.json; rows of classes the run does not know (label -1) are left out.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.report.html import Figure, Para, Section
from carspotter.report.load import RunRecord
from carspotter.report.tables import DASH, Table, num, pct

TRUST_KEYS = [
    ("accuracy", "class accuracy"),
    ("make_accuracy", "make accuracy"),
    ("model_accuracy", "make + model accuracy"),
    ("body_accuracy", "body type accuracy"),
    ("year_within_1_accuracy", "year within ±1"),
    ("ece_uncalibrated", "ECE before calibration (15 bins)"),
    ("ece", "ECE after temperature scaling"),
    ("nll", "NLL (calibrated)"),
    ("temperature", "temperature"),
    ("open_set_auroc", "open-set AUROC"),
    ("open_set_fpr_at_95tpr", "open-set FPR at 95 % TPR"),
    ("n_unknown", "photos of unknown classes"),
]


def read_scored_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, preds, confidences) of the rows whose label is a class of the run."""
    y, p, c = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                label, pred, conf = int(row["label"]), int(row["pred"]), float(row["confidence"])
            except (KeyError, TypeError, ValueError):
                continue
            if label >= 0:
                y.append(label)
                p.append(pred)
                c.append(conf)
    return np.array(y, dtype=np.int64), np.array(p, dtype=np.int64), np.array(c, dtype=np.float64)


def make_table(names: list[str], y: np.ndarray, p: np.ndarray, run_name: str) -> Table:
    """Per make: test photos, share classified exactly, share given the right make."""
    from carspotter.data.taxonomy import describe_all

    makes = [c.make for c in describe_all(names)]
    rows = []
    for make in sorted(set(makes)):
        ids = {i for i, m in enumerate(makes) if m == make}
        sel = np.isin(y, list(ids))
        n = int(sel.sum())
        if not n:
            continue
        exact = float(np.mean(p[sel] == y[sel]))
        right_make = float(np.mean([makes[int(q)] == make if 0 <= q < len(makes) else False for q in p[sel]]))
        rows.append([make, str(len(ids)), str(n), pct(exact), pct(right_make)])
    rows.sort(key=lambda r: -int(r[2]))
    return Table(
        f"Results per make ({run_name}; flat top-1 class)",
        ["Make", "Classes", "Test photos", "Class accuracy", "Right make"],
        rows or [[DASH] * 5],
    )


def make_confusions(names: list[str], y: np.ndarray, p: np.ndarray, n: int = 10) -> Table:
    from carspotter.data.taxonomy import describe_all
    from carspotter.report.plots import confusion, most_confused_pairs

    makes = [c.make for c in describe_all(names)]
    make_names = sorted(set(makes))
    idx = {m: i for i, m in enumerate(make_names)}
    ym = [idx[makes[int(v)]] for v in y]
    pm = [idx[makes[int(v)]] if 0 <= v < len(makes) else 0 for v in p]
    pairs = most_confused_pairs(confusion(ym, pm, len(make_names)), make_names, n)
    rows = [[t, q, str(k), pct(f)] for t, q, k, f in pairs] or [[DASH] * 4]
    return Table("Most-confused makes", ["True make", "Predicted as", "Count", "Share of true make"], rows)


def reliability_png(conf: np.ndarray, correct: np.ndarray, title: str, n_bins: int = 15) -> bytes:
    """Accuracy vs confidence per bin, with the diagonal a calibrated model would sit on."""
    from carspotter.report.plots import _figure, _png

    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct.astype(float), minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    fig = _figure(5.2, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    ok = count > 0
    ax.bar(centres[ok], acc[ok], width=1 / n_bins, edgecolor="#1d4e89", color="#5b8fd1", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="#888", label="perfect calibration")
    ax.plot(mean_conf[ok], acc[ok], "o", color="#d62728", ms=3, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("calibrated confidence (top-1)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def trust_section(best: RunRecord | None, slug: str = "run") -> Section:
    sec = Section("Answers people can trust")
    if best is None or not best.has_predictions or best.predictions is None:
        sec.blocks.append(Para("— no classification run with metrics.json and predictions.csv.", "note"))
        return sec
    m: dict[str, Any] = best.metrics or {}
    rows = [
        [label, pct(m[k]) if k.endswith("accuracy") else num(m.get(k), 4)]
        for k, label in TRUST_KEYS
        if k in m
    ]
    if rows:
        sec.blocks.append(Table(f"Trust metrics ({best.name}, test split)", ["Metric", "Value"], rows))
    y, p, c = read_scored_predictions(best.predictions)
    names = best.class_names
    if not len(y) or not names:
        sec.blocks.append(Para(f"— {best.predictions} has no usable rows.", "note"))
        return sec
    sec.blocks.append(make_table(names, y, p, best.name))
    sec.blocks.append(make_confusions(names, y, p))
    title = f"{best.name}: ECE {num(m.get('ece'), 3)} (uncalibrated {num(m.get('ece_uncalibrated'), 3)})"
    sec.blocks.append(
        Figure(
            f"reliability_{slug}.png", reliability_png(c, p == y, title), "Reliability diagram, test split"
        )
    )
    return sec
