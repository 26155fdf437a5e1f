"""Optimisers and learning-rate schedules from the config.

Every parameter is in the optimiser from the start (frozen ones simply get no gradient and are skipped), so
progressive unfreezing never rebuilds it and a resumed optimiser state lines up with the same groups.
Schedules step once per optimiser step, so warm-up and cosine are smooth and resume mid-schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from carspotter.config import ExperimentConfig
from carspotter.models.factory import CarModel


def param_groups(
    cfg: ExperimentConfig, model: CarModel, extra_params: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """Groups: head (lr), backbone (lr × backbone_lr_mult, × layer_decay^(n - stage) per stage when
    optim.layer_decay is set), loss (lr × proxy_lr_mult); no weight decay on biases and norm weights (1-D)."""
    o = cfg.optim
    head = {id(p) for p in model.head_parameters()}
    groups: dict[str, dict] = {}

    def add(p: nn.Parameter, name: str, lr_mult: float) -> None:
        decay = p.ndim > 1
        key = name if decay else f"{name}_no_decay"
        g = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": o.lr * lr_mult,
                "weight_decay": o.weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)

    for p in model.head_parameters():
        add(p, "head", 1.0)
    stage_of: dict[int, int] = {}
    decay = o.layer_decay
    if decay is not None:
        stages = model.backbone_stages()
        stage_of = {id(p): i for i, params in enumerate(stages) for p in params}
        n = len(stages)
    for p in model.parameters():
        if id(p) in head:
            continue
        if decay is None:
            add(p, "backbone", cfg.model.backbone_lr_mult)
        else:  # one group per stage; parameters outside every stage count as the earliest
            i = stage_of.get(id(p), 0)
            add(p, f"backbone{i}", cfg.model.backbone_lr_mult * decay ** (n - i))
    for p in extra_params:
        add(p, "loss", cfg.train.proxy_lr_mult)
    return list(groups.values())


def build_optimizer(
    cfg: ExperimentConfig, model: CarModel, extra_params: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model, extra_params)
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    raise ValueError(f"optim.name: unknown optimiser {o.name!r}; use adam, adamw or sgd")


def lr_factor(cfg: ExperimentConfig, steps_per_epoch: int, step: int) -> float:
    """Multiplier on each group's base lr at optimiser step `step` (0-based)."""
    s = cfg.schedule
    warm = s.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm  # linear warm-up from lr / warm to lr
    if s.name == "step":
        return s.gamma ** (step // max(1, s.step_size * steps_per_epoch))  # StepLR, counted in epochs
    if s.name == "cosine":
        total = max(1, cfg.train.epochs * steps_per_epoch - warm)
        t = min(1.0, (step - warm) / total)
        floor = s.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if s.name == "none":
        return 1.0
    raise ValueError(f"schedule.name: unknown schedule {s.name!r}; use step, cosine or none")


def build_scheduler(
    cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> LambdaLR:
    """Per-step schedule (StepLR in epochs, or cosine), both with optional linear warm-up."""
    lr_factor(cfg, steps_per_epoch, 0)  # validate the name now, not at the first step
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, steps_per_epoch, step))
