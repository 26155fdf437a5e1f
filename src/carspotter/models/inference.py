"""Inference precision and test-time augmentation: one definition for evaluate, predict, serve and index.

Precision (`train.amp`, recorded in model.json and index.json): "none" = fp32 everywhere; "auto" = bf16
autocast on CUDA, fp32 on every CPU (so the same command gives the same numbers on any CPU, with or without
native bf16); "bf16" / "fp16" = that autocast on any device (explicit opt-in; benchmarks/amp_cpu.py measures
bf16 against fp32 on this CPU). Old configs stored a boolean: true reads as "auto", false as "none".
TTA (`eval.tta`): "none", or "flip" = the mean of the logits (or embeddings) of the photo and its mirror image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from carspotter.config import AMP_CHOICES, TTA_CHOICES, normalize_amp, normalize_tta

__all__ = [
    "AMP_CHOICES",
    "TTA_CHOICES",
    "autocast",
    "autocast_dtype",
    "normalize_amp",
    "normalize_tta",
    "run_model",
    "with_tta",
]


def autocast_dtype(amp: Any, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device; None = fp32."""
    mode = normalize_amp(amp)
    dev = torch.device(device)
    if mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(amp: Any, device: torch.device | str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def with_tta(
    fn: Callable[[torch.Tensor], torch.Tensor], tta: str = "none"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` (images (B, 3, H, W) → (B, K)), averaged over the mirror image when tta == "flip"."""
    if normalize_tta(tta) == "none":
        return fn

    def flip_mean(x: torch.Tensor) -> torch.Tensor:
        return (fn(x).float() + fn(torch.flip(x, dims=(3,))).float()) / 2

    return flip_mean


def run_model(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, amp: Any = "none", tta: str = "none"
) -> torch.Tensor:
    """fp32 outputs of `fn(x)` at the run's precision, with its test-time augmentation."""
    with torch.inference_mode(), autocast(amp, x.device):
        return with_tta(fn, tta)(x).float()
