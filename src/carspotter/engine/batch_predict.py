"""`predict` over many photos: files and folders in, one answer per photo out (JSON or CSV rows).

A file that cannot be read becomes a row with its error and the batch goes on; nothing is skipped
silently, so N photos in always give N rows out.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from carspotter.data.images import ImageError, open_rgb
from carspotter.data.layouts.base import image_files
from carspotter.engine.answer import Hierarchy, build_answers
from carspotter.engine.calibration import load_calibration
from carspotter.models.loading import load_run
from carspotter.rundir import RunError

CSV_COLUMNS = [
    "path",
    "error",
    "unknown",
    "make",
    "make_probability",
    "model",
    "model_probability",
    "body",
    "body_probability",
    "year",
    "year_probability",
    "year_likely",
    "class",
    "class_probability",
    "open_set_score",
    "top5_classes",
    "top5_probabilities",
]


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: an unreadable one gets an error row), folders recursively."""
    out: list[Path] = []
    for p in map(Path, inputs):
        out.extend(image_files(p) if p.is_dir() else [p])
    return out


def error_row(path: str | Path, error: str) -> dict[str, Any]:
    return {"path": str(path), "error": error}


def predict_files(
    run_dir: str | Path,
    files: list[Path],
    k: int = 5,
    device: str = "cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One answer dict per file, in order (see engine.answer); unreadable files get {"path", "error"}."""
    model, info = load_run(run_dir, device)
    if info.num_classes <= 0:
        raise RunError(f"{run_dir}: a metric-learning run has no classifier; use `carspotter search` instead")
    cal = load_calibration(run_dir)
    tf = model.preprocess.transform()
    hier = Hierarchy.from_names(info.class_names)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        ok_idx, tensors, slot = [], [], {}
        for i, f in enumerate(chunk):
            try:
                tensors.append(tf(open_rgb(f)))
                ok_idx.append(i)
            except ImageError as e:
                slot[i] = error_row(f, f"{e.reason}" + (f": {e}" if e.reason == "unreadable" else ""))
            except Exception as e:  # a decoder failure Pillow did not classify: still a row, never a crash
                slot[i] = error_row(f, f"cannot read ({type(e).__name__})")
        if tensors:
            with torch.inference_mode():
                logits = model(torch.stack(tensors).to(device)).float().cpu()  # (B, C)
            for i, a in zip(ok_idx, build_answers(logits, info.class_names, cal, k, hier), strict=True):
                slot[i] = {"path": str(chunk[i]), "error": None, **a}
        rows.extend(slot[i] for i in range(len(chunk)))
        if progress:
            progress(len(chunk))
    return rows


def answers_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def answers_csv(rows: list[dict[str, Any]]) -> str:
    """One CSV row per photo: the decoded hierarchy with calibrated probabilities, unknown, and the top-5."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        if r.get("error"):
            w.writerow([r["path"], r["error"], *[""] * (len(CSV_COLUMNS) - 2)])
            continue
        top = r["predictions"][:5]
        y = r["year"]
        w.writerow(
            [
                r["path"],
                "",
                int(r["unknown"]),
                r["make"]["name"],
                f"{r['make']['probability']:.4f}",
                r["model"]["name"],
                f"{r['model']['probability']:.4f}",
                r["body"]["name"],
                f"{r['body']['probability']:.4f}",
                "" if y["value"] is None else y["value"],
                f"{y['probability']:.4f}",
                "-".join(str(v) for v in (y["likely"][:1] + y["likely"][-1:]))
                if len(y["likely"]) > 1
                else "",
                r["class_name"],
                f"{r['probability']:.4f}",
                f"{r['open_set']['score']:.4f}",
                ";".join(t["class_name"] for t in top),
                ";".join(f"{t['probability']:.4f}" for t in top),
            ]
        )
    return buf.getvalue()
