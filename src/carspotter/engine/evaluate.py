"""Evaluate a run directory: metrics, per-image predictions, and inference speed; returned, not written.

Speed is timed around the forward pass only (decoding and resizing excluded), so images/s compares models,
not disks.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carspotter.models import inference
from carspotter.retrieval.metrics import classification_metrics
from carspotter.rundir import (
    EvalResult,
    RunError,
    data_tag,
    metrics_name,
    predictions_name,
    read_model_info,
    read_run_config,
)

__all__ = ["PRED_COLUMNS", "autocast_dtype", "classification_metrics", "evaluate_run", "predict_images"]

# label -1: a class the run does not know; confidence = calibrated; unknown = below the open-set threshold
PRED_COLUMNS = ["path", "label", "pred", "confidence", "top5_labels", "top5_probs", "unknown"]


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The run's precision (train.amp; models/inference.py) on `device`; None = fp32."""
    return inference.autocast_dtype(amp, device)


def _predictions_csv(
    paths: list[str], labels: np.ndarray, probs: np.ndarray, unknown: np.ndarray | None = None
) -> str:
    k = min(5, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PRED_COLUMNS)
    for i, path in enumerate(paths):
        t = top[i]
        w.writerow(
            [
                path,
                int(labels[i]),
                int(t[0]),
                f"{probs[i, t[0]]:.6f}",
                ";".join(str(int(c)) for c in t),
                ";".join(f"{probs[i, c]:.6f}" for c in t),
                int(bool(unknown[i])) if unknown is not None else 0,
            ]
        )
    return buf.getvalue()


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    tta: str | None = None,
) -> EvalResult:
    """Evaluate best.safetensors on a split → metrics (+ predictions CSV text for a classifier).

    Precision and TTA are the run's (model.json), as in predict and serve; `tta` overrides the latter.

    `.save()` writes RUN_DIR/metrics_<split>[@<data>].json and predictions_<split>[@<data>].csv
    (rundir names: a result on another split or dataset never overwrites this one). Classes are matched to
    the run's by canonical name; photos of classes the run does not know (or has no training photos of) are
    scored as open-set "unknowns" (open_set_auroc, n_unknown) rather than counted as errors.
    """
    from carspotter.engine.calibration import load_calibration
    from carspotter.engine.predict_logits import split_logits

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    res = split_logits(run_dir, data_dir, split, device=device, batch_size=batch_size, tta=tta)
    tag = data_tag(res.data_dir, cfg.data.root)
    out, labels = res.outputs, res.labels
    n = len(labels)
    speed = {
        "predict_time_s": res.seconds,
        "images_per_s": n / res.seconds if res.seconds > 0 else None,
        "n_images": n,
        "split": split,
    }
    # a TTA other than the run's own gets its own file, beside the run's default result (never over it)
    info = read_model_info(run_dir)
    label = split if res.tta == info.tta else f"{split}_tta-{res.tta}"
    files: dict[str, Any] = {metrics_name(label, tag): None}
    if cfg.task == "metric":
        from carspotter.retrieval.metrics import retrieval_metrics

        metrics = {**retrieval_metrics(out.numpy(), labels, metric=cfg.retrieval.metric), **speed}
    else:
        from carspotter.engine.trust import trust_metrics

        cal = load_calibration(run_dir)
        names = info.class_names
        if cal.known_labels is not None:  # classes the run has outputs for but never trained on: unknown
            untrained = ~np.isin(labels, cal.known_labels) & (labels >= 0)
            res.unknown_classes = sorted({*res.unknown_classes, *(names[i] for i in set(labels[untrained]))})
            labels = np.where(untrained, -1, labels)
        known = labels >= 0
        if not known.any():
            raise RunError(f"{res.data_dir}: split {split!r} holds no photo of a class the run knows")
        lk, yk = cal.mask(out[known]), labels[known]
        loss = torch.nn.functional.cross_entropy(lk, torch.as_tensor(yk)).item()
        probs = cal.probs(lk).numpy()
        metrics = {**classification_metrics(yk, probs.argmax(1), probs, loss), **speed}
        metrics |= trust_metrics(out, labels, names, cal)
        if res.unknown_classes:
            metrics["unknown_classes"] = res.unknown_classes
        files[predictions_name(label, tag)] = _predictions_csv(
            res.paths, labels, cal.probs(out).numpy(), cal.unknown(out).numpy()
        )
    metrics["device"] = res.device
    metrics["autocast"] = res.autocast
    metrics["tta"] = res.tta
    if tag:
        metrics["data"] = str(res.data_dir)
    return EvalResult(metrics, run_dir, files)


def predict_images(
    run_dir: str | Path, paths: list[str | Path], k: int = 5, device: str = "cpu", tta: str | None = None
) -> list[dict[str, Any]]:
    """Top-k classes per image (calibrated): [{"path", "top": [{"label", "class_name", "prob"}, …]}], at the
    run's precision and TTA (model.json; `tta` overrides), exactly as `evaluate` scores them. The short form
    of `predict` (engine.batch_predict.predict_files); an unreadable photo raises ImageError."""
    from carspotter.engine.batch_predict import predict_files, top_lists

    if read_model_info(run_dir).num_classes <= 0:
        raise RunError(f"{run_dir}: a metric-learning run has no classifier; use `carspotter search` instead")
    return top_lists(predict_files(run_dir, [Path(p) for p in paths], k=k, device=device, tta=tta))
