"""One forward pass of a run over a prepared split, with the split's classes matched to the run's by name.

A run and a dataset need not share a class list: classes are matched by canonical name (so a run trained
on one re-pack can be evaluated on another), and photos of classes the run never saw get label -1
("unknown") instead of stopping the evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carspotter.data.taxonomy import canonical_name
from carspotter.models import inference
from carspotter.models.fuse import CPU_CHUNK, forward_chunked
from carspotter.models.loading import load_run
from carspotter.rundir import RunError, read_run_config
from carspotter.utils import resolve_device


@dataclass
class SplitOutputs:
    outputs: torch.Tensor  # (N, C) logits, or (N, D) embeddings for a metric-learning run
    labels: np.ndarray  # (N,) in the RUN's label space; -1 = a class the run does not know
    paths: list[str]
    data_dir: Path
    seconds: float  # forward passes only
    device: str
    autocast: str
    tta: str
    n_dataset_classes: int
    unknown_classes: list[str]

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs


def class_mapping(dataset_names: list[str], run_names: list[str]) -> np.ndarray:
    """Dataset label → run label by canonical class name; -1 where the run has no such class."""
    if dataset_names == run_names:
        return np.arange(len(run_names))
    run_index = {canonical_name(n): i for i, n in enumerate(run_names)}
    return np.array([run_index.get(canonical_name(n), -1) for n in dataset_names], dtype=np.int64)


def split_logits(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    embed: bool | None = None,
    tta: str | None = None,
) -> SplitOutputs:
    """The run's outputs (logits, or embeddings when `embed`/a metric run) for every photo of `split`, at the
    run's precision and test-time augmentation (model.json; `tta` overrides it), as predict and serve run."""
    from carspotter.data.dataset import splits_dataset

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dev = torch.device(resolve_device(device))
    model, info = load_run(run_dir, str(dev))
    data_dir = Path(data_dir or cfg.data.root)
    # one split, or several joined by "+" (val+test of a retrieval-protocol dataset: known + unknown photos)
    ds = splits_dataset(data_dir, split, model.preprocess.transform(), crop_bbox=cfg.data.crop_bbox)
    ds.one_thread_transforms = cfg.data.num_workers == 0
    metric_task = cfg.task == "metric" if embed is None else embed
    if metric_task:  # retrieval metrics compare labels among themselves: names need not match the run's
        mapping = np.arange(len(ds.class_names))
    else:
        mapping = class_mapping(ds.class_names, info.class_names)
        if not (mapping >= 0).any():
            raise RunError(
                f"{data_dir}: none of its {len(ds.class_names)} classes is one of the "
                f"{len(info.class_names)} the run {run_dir} was trained on"
            )
    if len(ds) == 0:
        raise RunError(f"{data_dir}: split {split!r} has no images")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size or cfg.data.batch_size, num_workers=cfg.data.num_workers
    )
    if dev.type == "cpu" or cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    outputs, seconds = [], 0.0
    amp = inference.autocast_dtype(info.amp, dev)  # the run's precision, as in predict, serve and index
    tta = "none" if metric_task else inference.normalize_tta(info.tta if tta is None else tta, where="--tta")
    fn = inference.with_tta(model.embed if metric_task else model, tta)
    with inference.autocast(info.amp, dev), torch.inference_mode():
        for x, _ in loader:
            x = x.to(dev, memory_format=torch.channels_last)
            t0 = time.perf_counter()
            out = forward_chunked(fn, x, CPU_CHUNK if dev.type == "cpu" else None)  # (B, D) or (B, C)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            outputs.append(out.float().cpu())
    labels = mapping[np.asarray(ds.labels, dtype=np.int64)]
    unknown = sorted({ds.class_names[i] for i in range(len(ds.class_names)) if mapping[i] < 0})
    return SplitOutputs(
        outputs=torch.cat(outputs),
        labels=labels,
        paths=ds.paths,
        data_dir=data_dir,
        seconds=seconds,
        device=str(dev),
        autocast=str(amp).replace("torch.", "") if amp else "off",
        tta=tta,
        n_dataset_classes=len(ds.class_names),
        unknown_classes=unknown,
    )
