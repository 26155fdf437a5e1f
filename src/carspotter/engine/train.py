"""Training, torchvision-references style: `fit()` runs epochs of `train_one_epoch()` + `evaluate()`.

`_fit` reads as its steps: `setup_run` (run dir, config, data, model, loss, loaders, optimiser → a
`TrainState`), `resume_from` (last.pt), `open_run_dir` (config.yaml, model.json, TensorBoard), then per epoch
`begin_epoch` (unfrozen stages, DDP wrapper, progressive size, seeds) → `train_one_epoch` → `evaluate_epoch`
(val + the eval-mode train probe) → `select_and_checkpoint` (best, early stop, last.pt, metrics.csv), and
`finish_run` (calibration on val, the summary).

Resume is exact. Every random choice in an epoch is seeded from (seed, epoch[, rank][, item]): the sampler
order (DistributedSampler.set_epoch), each item's augmentation (engine/loader.py) and the global RNG that
dropout draws from (reseeded at each epoch start). `last.pt` holds model, optimizer, scheduler, EMA and loss
state, so an epoch replays bit for bit after a restart and the final weights equal an uninterrupted run's.

Under `torchrun` each process trains on its DistributedSampler shard with `data.batch_size` images per step
(global batch = batch_size × world size); rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from carspotter.config import ExperimentConfig, dump_config, to_dict
from carspotter.data.dataset import PreparedDataset
from carspotter.data.manifest import class_names, read_manifest, split_records
from carspotter.engine import checkpoint as ck
from carspotter.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    gather_by_index,
    init_distributed,
)
from carspotter.engine.evaluate import autocast_dtype, classification_metrics
from carspotter.engine.loader import (
    SeededItems,
    TensorItems,
    eval_sampler,
    make_loader,
    train_sampler,
)
from carspotter.engine.optim import build_optimizer, build_scheduler
from carspotter.models.factory import CarModel, apply_freeze, create_model, set_trainable_stages
from carspotter.utils import atomic_write_text, mix_seed, prepare_out_dir, seed_everything

log = logging.getLogger(__name__)

__all__ = ["build_optimizer", "build_scheduler", "evaluate", "fit", "train_one_epoch"]

CLS_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "train_eval_loss",  # eval mode (no dropout, BN running stats, no augmentation) on training photos
    "train_eval_accuracy",
    "val_loss",
    "val_accuracy",
    "val_f1_macro",
    "epoch_time_s",
]
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_recall_at_1", "val_map_at_r", "epoch_time_s"]
CLS_SELECT = ("loss", "accuracy", "top5_accuracy", "f1_macro", "precision_macro", "recall_macro")
# Fields a resumed run may change; any other difference from the saved config.yaml is ignored with a warning.
RUNTIME_FIELDS = ("train.epochs", "train.device", "data.num_workers", "data.root", "train.log_every")


@dataclass
class StepContext:
    """What the per-batch loops need besides the model and data."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    accum: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    dist: DistInfo = field(default_factory=DistInfo)
    ema: Any = None  # timm ModelEmaV3
    ema_source: nn.Module | None = None  # the (unwrapped) model the EMA follows
    writer: Any = None  # SummaryWriter on rank 0
    log_every: int = 20
    progress: bool = False
    classify: bool = True  # outputs are logits: track accuracy
    mix: Any = None  # timm.data.Mixup: (x, y) -> (mixed x, soft targets); the loss takes soft targets


def _bar(it: Iterable, ctx: StepContext, desc: str) -> Any:
    show = ctx.progress and ctx.dist.is_main and sys.stderr.isatty()
    return tqdm(it, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def _to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    x = x.to(ctx.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if ctx.channels_last and x.ndim == 4 else x


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype)


def amp_dtype_for(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp on `device` (None = fp32), the same rule inference uses."""
    return autocast_dtype(cfg.train.amp, device)


def train_one_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable,
    epoch: int,
    ctx: StepContext,
    *,
    global_step: int = 0,
    ddp_net: nn.Module | None = None,
) -> tuple[dict[str, float | None], int]:
    """One pass over `loader` with gradient accumulation; returns ({train_loss, train_accuracy}, step)."""
    n_batches = len(loader)  # type: ignore[arg-type]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = correct = seen = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(_bar(loader, ctx, f"epoch {epoch + 1}")):
        x, y = _to_device(x, ctx), y.to(ctx.device, non_blocking=True)
        target = y
        if ctx.mix is not None:
            x, target = ctx.mix(x, y)
        group_start = i - i % ctx.accum
        group_size = min(ctx.accum, n_batches - group_start)  # the last group of an epoch may be shorter
        step_now = i + 1 - group_start == group_size
        no_sync = ddp_net is not None and not step_now
        with ddp_net.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[union-attr]
            with _autocast(ctx):
                out = forward(x)  # (B, C) logits or (B, D) embeddings
            loss = loss_fn(out.float(), target)
            (loss / group_size).backward()
        if step_now:
            if ctx.clip_grad_norm:
                nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], ctx.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            global_step += 1
            if ctx.ema is not None:
                ctx.ema.update(ctx.ema_source, step=global_step)
            if ctx.writer is not None and global_step % ctx.log_every == 0:
                ctx.writer.add_scalar("train/loss_step", loss.item(), global_step)
                ctx.writer.add_scalar("train/lr_step", optimizer.param_groups[0]["lr"], global_step)
        b = y.shape[0]
        loss_sum += loss.item() * b
        if ctx.classify:
            correct += (out.argmax(dim=1) == y).sum().item()
        seen += b
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], ctx.dist, ctx.device)
    stats = {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1) if ctx.classify else None,
    }
    return stats, global_step


@torch.inference_mode()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, ctx: StepContext, desc: str = "val"
) -> dict[str, np.ndarray]:
    """Run `forward` over a loader of (x, label, index); every rank gets {index, label, output} for each item
    exactly once (DistributedSampler padding removed), sorted by dataset index."""
    idx, labels, outs = [], [], []
    for x, y, i in _bar(loader, ctx, desc):
        with _autocast(ctx):
            out = forward(_to_device(x, ctx))  # (B, C) or (B, D)
        outs.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
        idx.append(torch.as_tensor(i))
    parts = {
        "index": torch.cat(idx).numpy(),
        "label": torch.cat(labels).numpy(),
        "output": torch.cat(outs).numpy(),
    }
    return gather_by_index(parts, ctx.dist)


def val_metrics(cfg: ExperimentConfig, parts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Recall@K/MAP@R (metric task) or loss/accuracy/F1… (classification) of gathered `evaluate` outputs."""
    if cfg.task == "metric":
        from carspotter.retrieval.metrics import retrieval_metrics

        return dict(retrieval_metrics(parts["output"], parts["label"], metric=cfg.retrieval.metric))
    logits, y = torch.from_numpy(parts["output"]), torch.from_numpy(parts["label"]).long()
    loss = nn.functional.cross_entropy(logits, y).item()
    probs = logits.softmax(dim=1).numpy()
    return classification_metrics(parts["label"], probs.argmax(1), probs, loss)


def trainable_stages(cfg: ExperimentConfig, epoch: int) -> int | None:
    """Trailing backbone stages trainable at `epoch` (0-based); None = as `model.freeze` says."""
    if cfg.task == "metric" and epoch < cfg.train.warmup_head_epochs:
        return 0
    keys = [k for k in cfg.model.unfreeze_schedule if k <= epoch]
    return cfg.model.unfreeze_schedule[max(keys)] if keys else None


def progressive_size(cfg: ExperimentConfig, epoch: int) -> int:
    """The training input size at `epoch` under data.progressive (the last key <= epoch), else img_size."""
    keys = [int(e) for e in cfg.data.progressive if int(e) <= epoch]
    return int(cfg.data.progressive[max(keys)]) if keys else cfg.data.img_size


def apply_stages(cfg: ExperimentConfig, model: CarModel, epoch: int) -> None:
    """Freeze/unfreeze backbone stages as `trainable_stages` says for `epoch` (progressive unfreezing)."""
    n = trainable_stages(cfg, epoch)
    if n is None:
        apply_freeze(model, cfg.model.freeze)
    else:
        set_trainable_stages(model, n)


def set_train_mode(model: CarModel, cfg: ExperimentConfig) -> None:
    """train(), except a fully frozen backbone keeps BatchNorm statistics fixed (frozen means frozen), and
    `model.freeze_bn` keeps every BatchNorm in eval mode."""
    model.train()
    if not any(p.requires_grad for p in model.backbone.parameters()):
        model.backbone.eval()
    if cfg.model.freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed the global RNGs (dropout, samplers that use them) from (seed, epoch, rank)."""
    s = mix_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, in tensors and lists so last.pt loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.array(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved, so a resumed epoch draws the same numbers."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict (sorted keys): equal digests ⇔ identical weights, e.g. across DDP ranks."""
    h = hashlib.sha256()
    for k, v in sorted(ck.unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("unfreeze_schedule", "reference"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(
    saved: ExperimentConfig, given: ExperimentConfig, say: Callable[..., None]
) -> ExperimentConfig:
    """The saved config wins (exact resume); only RUNTIME_FIELDS may change, e.g. more epochs."""
    cfg = copy.deepcopy(saved)
    s, g = _flat(to_dict(saved)), _flat(to_dict(given))
    ignored = [k for k in s if s[k] != g.get(k) and k not in RUNTIME_FIELDS]
    if ignored:
        say(f"warning: resuming with the run's saved config.yaml; ignoring changed {', '.join(ignored)}")
    cfg.train.epochs, cfg.train.device = given.train.epochs, given.train.device
    cfg.data.num_workers, cfg.train.log_every = given.data.num_workers, given.train.log_every
    return cfg


def write_metrics_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """metrics.csv, rewritten whole (atomically) each epoch so a killed run never leaves half a row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r[c] for c in columns])
    atomic_write_text(path, buf.getvalue())


def can_cache_features(cfg: ExperimentConfig, dist: DistInfo) -> bool:
    """Frozen backbone, no augmentation, nothing unfreezes: backbone outputs never change, so compute them
    once and train the head on them (same updates, a fraction of the time). Mixup/CutMix mix photos, so they
    count as augmentation."""
    a, t = cfg.data.aug, cfg.train
    augmented = (
        a.random_crop or a.random_resized_crop or a.hflip or a.rotation or a.color_jitter or a.random_erasing
    ) or bool(t.mixup_alpha or t.cutmix_alpha)
    return (
        cfg.model.freeze == "backbone"
        and not cfg.model.unfreeze_schedule
        and not augmented
        and cfg.task != "metric"
        and not dist.enabled
    )


def fit(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train per `cfg` on a prepared dataset; write the run directory; return a summary of the run."""
    from carspotter.data.transforms import check_crop_mode

    check_crop_mode(cfg.data)  # before the run directory exists
    dist, device = init_distributed(cfg.train.device)
    try:
        return _fit(cfg, Path(data_dir), Path(out_dir), dist, device, resume, overwrite, progress)
    finally:
        cleanup(dist)


def _fit(
    cfg: ExperimentConfig,
    data_dir: Path,
    out_dir: Path,
    dist: DistInfo,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> dict[str, Any]:
    """The training loop as its steps: set up, resume, then per epoch train + evaluate + checkpoint; finish."""
    t_start = time.perf_counter()
    run = setup_run(
        cfg, data_dir, out_dir, dist, device, resume=resume, overwrite=overwrite, progress=progress
    )
    if run.resuming:
        resume_from(run)
    open_run_dir(run)
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        if run.stopped_early:
            break
        t0 = time.perf_counter()
        forward = begin_epoch(run, epoch)
        lr = run.optimizer.param_groups[0]["lr"]
        train_stats, run.global_step = train_one_epoch(
            forward,
            run.loss_fn,
            run.optimizer,
            run.scheduler,
            run.loaders.train,
            epoch,
            run.ctx,
            global_step=run.global_step,
            ddp_net=run.ddp_net,
        )
        val, probe = evaluate_epoch(run)
        select_and_checkpoint(run, epoch, lr, {**train_stats, **probe}, val, t0)
    return finish_run(run, t_start)


# --- the steps of _fit, in order ------------------------------------------------------------------------------


@dataclass
class Loaders:
    """The run's data as the epochs see it (`build_loaders`)."""

    sampler: Any  # the training order: set_epoch(epoch) before each epoch
    train: Any
    val: Any | None  # None: the dataset has no val images
    probe: Any | None  # eval-mode pass over (a fixed subset of) the training photos, every epoch
    cache: bool  # frozen backbone: train/val/probe hold pooled features and the head trains on them
    train_at: Callable[[int], Any]  # progressive resizing: the training loader (same photos, order) at a size


@dataclass
class TrainState:
    """One training run: what `setup_run` builds, then the progress each epoch advances (saved in last.pt)."""

    cfg: ExperimentConfig  # resolved: the saved one when resuming, data.root = the absolute data_dir
    data_dir: Path
    out_dir: Path
    ctx: StepContext  # device, DDP info, precision, EMA, mixing, TensorBoard writer
    names: list[str]  # class names (labels 0..n-1)
    model: CarModel
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loaders: Loaders
    say: Callable[..., None]  # progress lines (rank 0)
    resuming: bool = False
    train_size: int = 0  # the size the training loader currently makes (data.progressive)
    ddp_net: nn.Module | None = None  # DistributedDataParallel(model), rewrapped when trainability changes
    trainable_sig: tuple[bool, ...] | None = None
    # progress (last.pt)
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    since_best: int = 0
    stopped_early: bool = False

    @property
    def dist(self) -> DistInfo:
        return self.ctx.dist

    @property
    def metric_task(self) -> bool:
        return self.cfg.task == "metric"

    @property
    def last_path(self) -> Path:
        return self.out_dir / ck.LAST

    @property
    def eval_model(self) -> CarModel:
        """The weights that are evaluated and saved as best: the EMA's when there is one."""
        return self.ctx.ema.module if self.ctx.ema is not None else self.model


def setup_run(
    cfg: ExperimentConfig,
    data_dir: Path,
    out_dir: Path,
    dist: DistInfo,
    device: torch.device,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> TrainState:
    """Everything before the first epoch: run dir, resolved config, data, model, loss, loaders, optimiser."""
    say, warn = _loggers(dist, progress)
    resuming = check_run_dir(out_dir, dist, resume=resume, overwrite=overwrite, say=say)
    if resuming:
        cfg = resume_config(ck.read_run_config(out_dir), cfg, warn)
    cfg = copy.deepcopy(cfg)
    data_dir = data_dir.resolve()
    cfg.data.root = str(data_dir)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    records, names = read_data(cfg, data_dir, warn)
    model = build_model(cfg, len(names), dist, device, resuming=resuming, warn=warn)
    loss_fn, mix = build_loss(cfg, model, len(names), device)
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        # warm-up: the decay ramps 1 - (1 + step)^(-2/3) up to ema_decay, so a short run's EMA is not its init
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
    ctx = StepContext(
        device=device,
        amp_dtype=amp_dtype_for(cfg, device),
        accum=max(1, cfg.optim.grad_accum),
        clip_grad_norm=cfg.optim.clip_grad_norm,
        channels_last=_channels_last(cfg, device),
        dist=dist,
        ema=ema,
        ema_source=model,
        log_every=max(1, cfg.train.log_every),
        progress=progress,
        classify=cfg.task != "metric",
        mix=mix,
    )
    loaders = build_loaders(cfg, data_dir, records, model, ctx, say, warn)
    steps_per_epoch = math.ceil(len(loaders.train) / ctx.accum)
    optimizer = build_optimizer(cfg, model, loss_fn.parameters())
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    return TrainState(
        cfg=cfg,
        data_dir=data_dir,
        out_dir=out_dir,
        ctx=ctx,
        names=names,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        loaders=loaders,
        say=say,
        resuming=resuming,
        train_size=cfg.data.img_size,
    )


def _loggers(dist: DistInfo, progress: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    def say(*a: Any) -> None:  # progress lines: INFO (DEBUG with progress=False); the CLI shows INFO
        if dist.is_main:
            log.log(logging.INFO if progress else logging.DEBUG, " ".join(map(str, a)))

    def warn(*a: Any) -> None:  # shown even with progress=False
        if dist.is_main:
            log.warning(" ".join(map(str, a)))

    return say, warn


def check_run_dir(
    out_dir: Path, dist: DistInfo, *, resume: bool, overwrite: bool, say: Callable[..., None]
) -> bool:
    """Rank 0 checks the run directory (never clobbered) and every rank stops with the same error; True when
    there is a last.pt to resume from."""
    error = None
    if dist.is_main:
        try:
            prepare_out_dir(out_dir, overwrite=overwrite, resume=resume, marker=ck.CONFIG)
        except (OSError, ValueError) as e:
            error = e
    message = broadcast_object(None if error is None else str(error), dist)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(message)
    last_path = out_dir / ck.LAST
    resuming = resume and last_path.is_file()
    if resume and not resuming:
        say(f"note: {last_path} does not exist; starting from scratch")
    return resuming


def read_data(
    cfg: ExperimentConfig, data_dir: Path, warn: Callable[..., None]
) -> tuple[list[Any], list[str]]:
    """The manifest's records and class names, refusing a run with no training images (val may be empty)."""
    records = read_manifest(data_dir)
    names = class_names(records)
    if not split_records(records, cfg.data.train_split):
        raise ValueError(f"{data_dir}: split {cfg.data.train_split!r} (data.train_split) has no images")
    if not split_records(records, cfg.data.val_split):
        warn(
            f"warning: {data_dir} has no {cfg.data.val_split!r} images; carving none — "
            "the checkpoint is chosen by train loss (never by test)"
        )
    return records, names


def _channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.train.channels_last and device.type in ("cuda", "cpu")


def build_model(
    cfg: ExperimentConfig,
    n_classes: int,
    dist: DistInfo,
    device: torch.device,
    *,
    resuming: bool,
    warn: Callable[..., None],
) -> CarModel:
    """The network on its device, seeded from train.seed, with the run's preprocessing (and SyncBatchNorm)."""
    seed_everything(cfg.train.seed)
    mcfg = copy.deepcopy(cfg.model)
    if resuming:  # every weight comes from last.pt: no download, no dependence on the original weights file
        mcfg.pretrained, mcfg.weights = False, None
    model = create_model(mcfg, 0 if cfg.task == "metric" else n_classes, cfg.data.img_size)
    model.preprocess = model.preprocess.with_data(cfg.data)  # the run's size/crop, the backbone's mean/std
    if dist.enabled and cfg.train.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
        else:
            warn("warning: train.sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); ignored on CPU")
    model = model.to(device)
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[assignment]
    return model


def build_loss(
    cfg: ExperimentConfig, model: CarModel, n_classes: int, device: torch.device
) -> tuple[nn.Module, Any]:
    """(loss, mixing): a metric-learning loss (with its proxies), or cross-entropy with optional Mixup/CutMix."""
    if cfg.task == "metric":
        from carspotter.retrieval.losses import build_metric_loss

        return build_metric_loss(cfg, n_classes, model.embed_dim).to(device), None
    mix = None
    if cfg.train.mixup_alpha or cfg.train.cutmix_alpha:
        from timm.data import Mixup

        # timm's Mixup smooths the mixed targets itself, so the loss takes them as they are
        mix = Mixup(
            mixup_alpha=cfg.train.mixup_alpha,
            cutmix_alpha=cfg.train.cutmix_alpha,
            prob=cfg.train.mix_prob,
            switch_prob=cfg.train.mix_switch_prob,
            label_smoothing=cfg.train.label_smoothing,
            num_classes=n_classes,
        )
    # with mixing, timm's Mixup already smoothed the targets
    return nn.CrossEntropyLoss(label_smoothing=0.0 if mix else cfg.train.label_smoothing), mix


def build_loaders(
    cfg: ExperimentConfig,
    data_dir: Path,
    records: list[Any],
    model: CarModel,
    ctx: StepContext,
    say: Callable[..., None],
    warn: Callable[..., None],
) -> Loaders:
    """Train/val/probe loaders over the prepared dataset, or over features computed once (`can_cache_features`)."""
    dist, metric_task, seed, pre = ctx.dist, cfg.task == "metric", cfg.train.seed, model.preprocess
    eval_tf = pre.transform()
    train_ds = PreparedDataset(
        data_dir, cfg.data.train_split, pre.train_transform(cfg.data.aug), cfg.data.crop_bbox, records=records
    )
    val_ds = PreparedDataset(data_dir, cfg.data.val_split, eval_tf, cfg.data.crop_bbox, records=records)
    bs, nw, pin = cfg.data.batch_size, cfg.data.num_workers, ctx.device.type == "cuda"
    train_ds.one_thread_transforms = val_ds.one_thread_transforms = nw == 0  # this loop owns the process
    drop_last = metric_task or bool(ctx.mix)
    if metric_task:
        from carspotter.retrieval.losses import build_sampler

        if dist.enabled:
            raise ValueError("task: metric is single-process for now; run it without torchrun / --nproc")
        sampler = train_sampler(len(train_ds), seed, base=build_sampler(train_ds.labels, cfg))
    else:
        sampler = train_sampler(len(train_ds), seed, dist.rank, dist.world_size)

    def train_at(
        size: int,
    ) -> Any:  # the training loader at a size (data.progressive: the same photos and order)
        scaled = cfg.data.resize_size and round(cfg.data.resize_size * size / cfg.data.img_size)
        tf = dataclasses.replace(pre, img_size=size, resize_size=scaled or None).train_transform(cfg.data.aug)
        ds = PreparedDataset(data_dir, cfg.data.train_split, tf, cfg.data.crop_bbox, records=records)
        ds.one_thread_transforms = nw == 0
        return make_loader(SeededItems(ds, seed), sampler, bs, nw, seed, pin_memory=pin, drop_last=drop_last)

    val_sampler = eval_sampler(len(val_ds), dist.rank, dist.world_size)
    cache = can_cache_features(cfg, dist)
    if cache:
        say("frozen backbone, no augmentation: computing pooled features once, training the head on them")
        model.eval()
        once = {"batch_size": bs, "num_workers": nw, "seed": seed, "persistent": False}
        plain = make_loader(SeededItems(train_ds, seed, False), eval_sampler(len(train_ds)), **once)
        tr = evaluate(model.forward_features, plain, ctx, desc="features train")
        train_items: Any = TensorItems(torch.from_numpy(tr["output"]), torch.from_numpy(tr["label"]))
        val_items: Any = None
        if len(val_ds):
            plain = make_loader(SeededItems(val_ds, seed, False), val_sampler, **once)
            va = evaluate(model.forward_features, plain, ctx, desc="features val")
            val_items = TensorItems(torch.from_numpy(va["output"]), torch.from_numpy(va["label"]))
        train_loader = make_loader(train_items, sampler, bs, 0, seed, drop_last=metric_task)
        val_loader = make_loader(val_items, val_sampler, bs, 0, seed) if val_items is not None else None
    else:
        train_loader = train_at(cfg.data.img_size)
        val_loader = (
            make_loader(SeededItems(val_ds, seed, False), val_sampler, bs, nw, seed, pin_memory=pin)
            if len(val_ds)
            else None
        )
    probe_loader = None
    if not metric_task and cfg.train.eval_train_max:
        from torch.utils.data import Subset

        from carspotter.engine.train_probe import probe_indices

        idx = probe_indices(len(train_ds), cfg.train.eval_train_max)
        plain_train = (
            train_items
            if cache
            else SeededItems(
                PreparedDataset(data_dir, cfg.data.train_split, eval_tf, cfg.data.crop_bbox, records=records),
                seed,
                False,
            )
        )
        probe_sampler = eval_sampler(len(idx), dist.rank, dist.world_size)
        probe_loader = make_loader(Subset(plain_train, idx), probe_sampler, bs, 0 if cache else nw, seed)
    if cache and cfg.data.progressive:
        warn(
            "warning: data.progressive is ignored: a frozen backbone trains its head on features computed once"
        )

    if len(train_loader) == 0:
        raise ValueError(f"{data_dir}: too few training images for one batch of {bs}")
    return Loaders(sampler, train_loader, val_loader, probe_loader, cache, train_at)


def resume_from(run: TrainState) -> None:
    """Load model, optimiser, scheduler, EMA, loss, progress and RNG state from last.pt: the next epoch replays
    exactly as it would have run without the interruption."""
    state = ck.load_state(run.last_path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ctx.ema is not None and state.get("ema") is not None:
        run.ctx.ema.load_state_dict(state["ema"])
    if state.get("loss"):
        run.loss_fn.load_state_dict(state["loss"])
    run.start_epoch, run.global_step, run.history = (
        state["epoch"],
        state["global_step"],
        list(state["history"]),
    )
    run.best, run.since_best, run.stopped_early = state["best"], state["since_best"], state["stopped_early"]
    set_rng_state(state["rng"])
    run.say(f"resuming {run.out_dir} after epoch {run.start_epoch}")


def open_run_dir(run: TrainState) -> None:
    """Rank 0 writes config.yaml and model.json and opens TensorBoard, so a run dir is usable from epoch 1."""
    if run.dist.is_main:
        for stale in run.out_dir.glob(".*.tmp"):  # temp files of a write that was killed midway
            stale.unlink(missing_ok=True)
        dump_config(run.cfg, run.out_dir / ck.CONFIG)
        ck.save_model_json(run.out_dir, ck.model_info(run.model, run.cfg, run.names))
        from torch.utils.tensorboard import SummaryWriter

        purge = run.global_step if run.resuming else None
        run.ctx.writer = SummaryWriter(str(run.out_dir / "tb"), purge_step=purge)
    barrier(run.dist)
    if run.stopped_early or run.start_epoch >= run.cfg.train.epochs:
        run.say(
            f"{run.out_dir}: already trained {run.start_epoch} epoch(s); nothing to do (raise --epochs to continue)"
        )


def begin_epoch(run: TrainState, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Set what this epoch trains (unfrozen stages, DDP wrapper, input size), train mode and the epoch's seeds;
    return the forward the training steps call."""
    cfg, model = run.cfg, run.model
    before = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    apply_stages(cfg, model, epoch)
    after = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    if after != before and epoch > 0:
        run.say(
            f"epoch {epoch + 1}: {after / 1e6:.2f} M backbone parameters trainable (was {before / 1e6:.2f} M)"
        )
    if run.dist.enabled:
        sig = tuple(p.requires_grad for p in model.parameters())
        if sig != run.trainable_sig:  # DDP hooks only parameters trainable at wrap time
            device = run.ctx.device
            ids = [device.index] if device.type == "cuda" else None
            run.ddp_net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            run.trainable_sig = sig
    size = progressive_size(cfg, epoch)
    if not run.loaders.cache and size != run.train_size:
        run.say(
            f"epoch {epoch + 1}: training at {size} px (data.progressive; evaluated at {cfg.data.img_size})"
        )
        run.loaders.train, run.train_size = run.loaders.train_at(size), size
    set_train_mode(model, cfg)
    seed_epoch(cfg.train.seed, epoch, run.dist.rank)
    run.loaders.sampler.set_epoch(epoch)
    if run.loaders.cache:
        return model.forward_head
    if run.metric_task:
        return model.embed
    return run.ddp_net if run.ddp_net is not None else model


def evaluate_epoch(run: TrainState) -> tuple[dict[str, float | None] | None, dict[str, float]]:
    """(val metrics or None without val images, train_eval_* of the eval-mode probe) of the eval weights."""
    eval_model, cache = run.eval_model, run.loaders.cache
    val: dict[str, float | None] | None = None
    if run.loaders.val is not None:
        eval_model.eval()
        fwd = eval_model.forward_head if cache else (eval_model.embed if run.metric_task else eval_model)
        metrics = val_metrics(run.cfg, evaluate(fwd, run.loaders.val, run.ctx))
        # plain Python scalars only: last.pt must stay loadable with weights_only=True
        val = {k: (None if v is None else float(v)) for k, v in metrics.items() if _is_scalar(v)}
    probe: dict[str, float] = {}
    if run.loaders.probe is not None:
        eval_model.eval()
        fwd = eval_model.forward_head if cache else eval_model
        p = val_metrics(run.cfg, evaluate(fwd, run.loaders.probe, run.ctx, desc="train (eval mode)"))
        probe = {"train_eval_loss": float(p["loss"]), "train_eval_accuracy": float(p["accuracy"])}
    return val, probe


def select_and_checkpoint(
    run: TrainState,
    epoch: int,
    lr: float,
    train_stats: dict[str, Any],
    val: dict[str, float | None] | None,
    t0: float,
) -> None:
    """Keep the best epoch (best.safetensors), decide early stopping, save last.pt + metrics.csv (rank 0)."""
    cfg = run.cfg
    if val is None:
        name, value, score = "train_loss", train_stats["train_loss"], -train_stats["train_loss"]
    else:
        name = cfg.train.select_metric  # validated against the task by the config
        if name == "auto":
            name = "recall_at_1" if run.metric_task else "accuracy"
        value = val[name]
        score = -value if name == "loss" else value  # type: ignore[operator]
    improved = run.best is None or score > run.best["score"]
    if improved:
        run.best = {"score": score, "epoch": epoch + 1, "metric": name, "value": value}
        run.since_best = 0
    else:
        run.since_best += 1
    patience = cfg.train.early_stop_patience
    run.stopped_early = bool(patience and run.since_best >= patience and epoch + 1 < cfg.train.epochs)

    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train_stats}
    if val is not None:
        row.update({f"val_{k}": v for k, v in val.items()})
    row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
    run.history.append(row)
    if run.dist.is_main:
        save_checkpoint(run, epoch, improved)
        writer = run.ctx.writer
        for k, v in row.items():
            if k != "epoch" and isinstance(v, int | float):
                writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
        writer.flush()
    run.say(_epoch_line(row, cfg.train.epochs, improved, run.metric_task))
    if run.stopped_early:
        run.say(f"early stop: no improvement in {name} for {patience} epochs")


def save_checkpoint(run: TrainState, epoch: int, improved: bool) -> None:
    """best.safetensors when this epoch improved; last.pt (everything an exact resume needs); metrics.csv."""
    if improved:
        ck.save_weights(run.eval_model, run.out_dir / ck.BEST)
    ema = run.ctx.ema
    ck.save_state(
        run.last_path,
        {
            "epoch": epoch + 1,
            "global_step": run.global_step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "loss": run.loss_fn.state_dict(),
            "best": run.best,
            "since_best": run.since_best,
            "stopped_early": run.stopped_early,
            "history": run.history,
            "rng": rng_state(),
            "config": to_dict(run.cfg),
        },
    )
    columns = METRIC_COLUMNS if run.metric_task else CLS_COLUMNS
    write_metrics_csv(run.out_dir / "metrics.csv", run.history, columns)


def finish_run(run: TrainState, t_start: float) -> dict[str, Any]:
    """Close TensorBoard, calibrate on val (rank 0, classification), log each rank's final weights digest;
    return the run's summary."""
    dist, best = run.dist, run.best
    if run.ctx.writer is not None:
        run.ctx.writer.close()
    if dist.is_main and not run.metric_task and run.loaders.val is not None and best is not None:
        from carspotter.engine.calibration import calibrate_run  # temperature + open-set threshold on val

        cal = calibrate_run(run.out_dir, run.data_dir, run.cfg.data.val_split, device=str(run.ctx.device))
        run.say(
            f"calibrated on val: temperature {cal.temperature:.3f}, open-set threshold {cal.threshold:.4f}"
        )

    digest = weights_digest(run.model)
    if dist.enabled:
        log.info("rank %d/%d: final weights sha256 %s", dist.rank, dist.world_size, digest)
    barrier(dist)
    return {
        "run_dir": str(run.out_dir),
        "epochs_completed": len(run.history),
        "best_epoch": best["epoch"] if best else None,
        "select_metric": best["metric"] if best else None,
        "best_value": best["value"] if best else None,
        "stopped_early": run.stopped_early,
        "last": run.history[-1] if run.history else {},
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "world_size": dist.world_size,
        "weights_sha256": digest,
    }


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, int | float | np.number)


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool, metric_task: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.2e}", f"train loss {row['train_loss']:.4f}"]
    if row.get("train_accuracy") is not None:
        parts.append(f"acc {100 * row['train_accuracy']:.1f}%")
    if row.get("train_eval_accuracy") is not None:
        parts.append(
            f"(eval mode: loss {row['train_eval_loss']:.4f} acc {100 * row['train_eval_accuracy']:.1f}%)"
        )
    if metric_task and row.get("val_recall_at_1") is not None:
        parts.append(f"val R@1 {100 * row['val_recall_at_1']:.1f}%")
    elif row.get("val_accuracy") is not None:
        parts.append(
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_accuracy']:.1f}% "
            f"F1 {row['val_f1_macro']:.3f}"
        )
    parts.append(f"{row['epoch_time_s']:.1f} s")
    return "  ".join(parts) + ("  *" if improved else "")
