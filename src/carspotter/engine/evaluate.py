"""Evaluate a run directory: metrics, per-image predictions, and inference speed; returned, not written.

Speed is timed around the forward pass only (decoding and resizing excluded), so images/s compares models,
not disks.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carspotter.models import inference
from carspotter.models.fuse import CPU_CHUNK, forward_chunked
from carspotter.models.loading import load_run
from carspotter.retrieval.metrics import classification_metrics
from carspotter.rundir import (
    EvalResult,
    RunError,
    data_tag,
    metrics_name,
    predictions_name,
    read_run_config,
)
from carspotter.utils import resolve_device

__all__ = ["PRED_COLUMNS", "autocast_dtype", "classification_metrics", "evaluate_run", "predict_images"]

PRED_COLUMNS = ["path", "label", "pred", "confidence", "top5_labels", "top5_probs"]


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The run's precision (train.amp; models/inference.py) on `device`; None = fp32."""
    return inference.autocast_dtype(amp, device)


def _predictions_csv(paths: list[str], labels: np.ndarray, probs: np.ndarray) -> str:
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
    (rundir names: a result on another split or dataset never overwrites this one).
    """
    from carspotter.data.dataset import PreparedDataset

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dev = torch.device(resolve_device(device))
    model, info = load_run(run_dir, str(dev))
    data_dir = Path(data_dir or cfg.data.root)
    tag = data_tag(data_dir, cfg.data.root)
    ds = PreparedDataset(
        data_dir, split, transform=model.preprocess.transform(), crop_bbox=cfg.data.crop_bbox
    )
    ds.one_thread_transforms = cfg.data.num_workers == 0
    if ds.class_names != info.class_names:
        raise RunError(
            f"{data_dir}: its {len(ds.class_names)} classes differ from the {len(info.class_names)} "
            f"the run {run_dir} was trained on"
        )
    if len(ds) == 0:
        raise RunError(f"{data_dir}: split {split!r} has no images")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size or cfg.data.batch_size, num_workers=cfg.data.num_workers
    )
    if dev.type == "cpu" or cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    outputs, seconds = [], 0.0
    metric_task = cfg.task == "metric"
    amp = autocast_dtype(info.amp, dev)  # the run's precision, as in predict, serve and index
    tta = inference.normalize_tta(info.tta if tta is None else tta, where="--tta")
    fn = inference.with_tta(model.embed if metric_task else model, "none" if metric_task else tta)
    with inference.autocast(info.amp, dev), torch.inference_mode():
        for x, _ in loader:
            x = x.to(dev, memory_format=torch.channels_last)
            t0 = time.perf_counter()
            out = forward_chunked(fn, x, CPU_CHUNK if dev.type == "cpu" else None)  # (B, D) or (B, C)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            outputs.append(out.float().cpu())
    out = torch.cat(outputs)
    labels = np.asarray(ds.labels)
    speed = {
        "predict_time_s": seconds,
        "images_per_s": len(ds) / seconds if seconds > 0 else None,
        "n_images": len(ds),
        "split": split,
    }
    files: dict[str, Any] = {metrics_name(split, tag): None}
    if metric_task:
        from carspotter.retrieval.metrics import retrieval_metrics

        metrics = {**retrieval_metrics(out.numpy(), labels, metric=cfg.retrieval.metric), **speed}
    else:
        loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(labels)).item()
        probs = out.softmax(dim=1).numpy()
        metrics = {**classification_metrics(labels, probs.argmax(1), probs, loss), **speed}
        files[predictions_name(split, tag)] = _predictions_csv(ds.paths, labels, probs)
    metrics["device"] = str(dev)
    metrics["autocast"] = str(amp).replace("torch.", "") if amp else "off"
    metrics["tta"] = "none" if metric_task else tta
    if tag:
        metrics["data"] = str(data_dir)
    return EvalResult(metrics, run_dir, files)


def predict_images(
    run_dir: str | Path, paths: list[str | Path], k: int = 5, device: str = "cpu", tta: str | None = None
) -> list[dict[str, Any]]:
    """Top-k classes per image: [{"path", "top": [{"label", "class_name", "prob"}, …]}], at the run's
    precision and TTA (model.json; `tta` overrides), exactly as `evaluate` scores them."""
    from carspotter.data.images import open_rgb

    model, info = load_run(run_dir, device)
    if info.num_classes <= 0:
        raise RunError(f"{run_dir}: a metric-learning run has no classifier; use `carspotter search` instead")
    tf = model.preprocess.transform()
    x = torch.stack([tf(open_rgb(Path(path))) for path in paths]).to(device)  # (N, 3, S, S)
    tta = inference.normalize_tta(info.tta if tta is None else tta, where="--tta")
    probs = inference.run_model(model, x, info.amp, tta).softmax(dim=1).cpu()  # (N, C)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        {
            "path": str(path),
            "top": [
                {"label": int(c), "class_name": info.class_names[int(c)], "prob": float(pr)}
                for pr, c in zip(top.values[i], top.indices[i], strict=True)
            ],
        }
        for i, path in enumerate(paths)
    ]
