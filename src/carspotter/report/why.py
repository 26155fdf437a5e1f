"""The report's "why" section: heat-maps for a few correct and a few wrong test predictions of the best
classification run (chosen with a fixed seed), and one example photo of each class of the most-confused
pairs, so one can see what the network attends to and what it mixes up."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from carspotter.report.html import Figure, Para, Section
from carspotter.report.plots import GridCell, retrieval_grid

THUMB = 160


def _rows(pred_csv: Path) -> list[dict[str, Any]]:
    out = []
    with pred_csv.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                out.append({"path": row["path"], "label": int(row["label"]), "pred": int(row["pred"]),
                            "confidence": float(row.get("confidence") or "nan")})  # fmt: skip
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _small(img: Any) -> Any:
    img = img.copy()
    img.thumbnail((THUMB, THUMB))
    return img


def why_section(
    run: Any, slug: str, n_correct: int = 3, n_wrong: int = 3, n_pairs: int = 3, seed: int = 0
) -> Section:
    """`run` is a report.load.RunRecord with test predictions (the best classification run)."""
    from carspotter.data.images import ImageError, open_rgb
    from carspotter.data.manifest import read_manifest
    from carspotter.explain.cam import Explainer, cam_to_photo, overlay
    from carspotter.models.loading import load_run
    from carspotter.report.plots import confusion, most_confused_pairs
    from carspotter.rundir import find_predictions

    sec = Section("Why: what the network looks at")
    pred_csv = find_predictions(run.path)
    rows = _rows(pred_csv) if pred_csv is not None else []
    root = Path(run.cfg.data.root) if run.cfg is not None and run.cfg.data.root else None
    if not rows or root is None or not (root / rows[0]["path"]).is_file():
        sec.blocks.append(
            Para(f"— {run.name}: the test photos of predictions.csv are not on this machine.", "note")
        )
        return sec
    model, info = load_run(run.path)
    names = list(info.class_names)
    pre = model.preprocess
    ex = Explainer(model, img_size=pre.img_size)
    tf = pre.transform()
    rng = np.random.default_rng(seed)
    right = [r for r in rows if r["label"] == r["pred"]]
    wrong = [r for r in rows if r["label"] != r["pred"]]
    chosen = [rows_[int(i)] for rows_, n in ((right, n_correct), (wrong, n_wrong))
              for i in rng.permutation(len(rows_))[:n]]  # fmt: skip
    grid: list[list[GridCell]] = []
    import torch

    for r in chosen:
        try:
            photo = open_rgb(root / r["path"])
        except (ImageError, OSError):
            continue
        classes = [r["pred"]] + ([r["label"]] if r["pred"] != r["label"] else [])
        x = torch.stack([tf(photo)] * len(classes))
        heat, _ = ex(x, classes)
        shown = _small(photo)
        cells = [GridCell(shown, f"true: {names[r['label']]}")]
        for c, h in zip(classes, heat, strict=True):
            hp = cam_to_photo(h, shown.size, pre.resize_side, pre.crop_mode)
            what = "predicted" if c == r["pred"] else "heat-map of the true class"
            label = f"{what}: {names[c]}" + (f" ({r['confidence']:.2f})" if c == r["pred"] else "")
            cells.append(GridCell(overlay(shown, hp), label, correct=c == r["label"]))
        grid.append(cells)
    if grid:
        sec.blocks.append(
            Para(
                f"{run.name}: {ex.method} heat-maps (target layer {ex.layer}) for {n_correct} correct and "
                f"{n_wrong} wrong test predictions, chosen with seed {seed}. For a wrong prediction the last "
                "column shows where the evidence for the true class lies."
            )
        )
        sec.blocks.append(
            Figure(f"why_{slug}.png", retrieval_grid(grid, "Where the network looks"), "Heat-maps")
        )
    y, p = [r["label"] for r in rows], [r["pred"] for r in rows]
    pairs = most_confused_pairs(confusion(y, p, len(names)), names, n=n_pairs)
    if pairs:
        examples: dict[str, str] = {}
        for rec in read_manifest(root):
            if rec.split == "train":
                examples.setdefault(rec.class_name, rec.path)
        pair_rows = []
        for t, q, n, _ in pairs:
            row = []
            for name, role in ((t, "true"), (q, "taken for")):
                img = None
                if name in examples:
                    try:
                        img = _small(open_rgb(root / examples[name]))
                    except (ImageError, OSError):
                        img = None
                row.append(GridCell(img, f"{role}: {name}", correct=role == "true"))
            row[0].label += f" ({n}×)"
            pair_rows.append(row)
        sec.blocks.append(
            Para("The most-confused pairs, with one training photo of each class side by side.")
        )
        sec.blocks.append(
            Figure(
                f"why_pairs_{slug}.png", retrieval_grid(pair_rows, "Most-confused pairs"), "Confused pairs"
            )
        )
    return sec
