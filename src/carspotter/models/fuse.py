"""Inference-only CPU speed-ups: fold eval-mode BatchNorm into the convolution that feeds it, and run a
loader's batch through the network in cache-sized chunks (`forward_chunked`).

In eval mode BN is a per-channel affine map, so `bn(conv(x)) == conv'(x)` with rescaled weights and a bias.
Removing the BN pass saves a full read+write of every activation map: measured 1.3x for ResNet-50 @224 and
1.7x for EfficientNet-Lite0 @128 on a 2-core CPU (see BENCHMARKS.md); the result agrees to ~1e-6 relative.

Pairs are found by running one forward with hooks (a BN whose input *is* a conv's untouched output), so it
works for any timm model and needs no graph tracing; the folded copy is checked against the original and
discarded if it does not agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class _PostNorm(nn.Module):
    """What remains of timm's BatchNormAct2d (norm + drop + act) once the norm is folded away."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor, forward: Forward) -> tuple[list, torch.Tensor]:
    """(conv, bn) pairs where the BN's input is exactly the conv's output, both called once."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}  # id → (conv, tensor kept alive, version)
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def on_conv(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        outputs[id(out)] = (mod, out, out._version)

    def on_bn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        x = inp[0]
        hit = outputs.get(id(x))
        if hit is not None and hit[1] is x and x._version == hit[2]:  # untouched conv output (no in-place op)
            pairs.append((hit[0], mod))

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(on_conv))
        elif isinstance(mod, nn.BatchNorm2d) and mod.track_running_stats and mod.running_var is not None:
            hooks.append(mod.register_forward_hook(on_bn))
    try:
        with torch.no_grad():
            ref = forward(model, example)
    finally:
        for h in hooks:
            h.remove()
    return [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1], ref


def fold_batchnorm(
    model: nn.Module, example: torch.Tensor, forward: Forward | None = None, rtol: float = 1e-4
) -> tuple[nn.Module, int]:
    """A folded eval-mode copy of `model` and the number of BatchNorms folded (0 = plain copy).

    `example` is one small input batch (B ≥ 1, the shape used later); `forward(model, x)` is the call to
    speed up (default `model(x)`). The original model is not modified.
    """
    with torch.inference_mode(False):  # callable from inside inference_mode (e.g. embed_dataset)
        return _fold(model, example.clone(), forward or (lambda m, x: m(x)), rtol)


def _fold(model: nn.Module, example: torch.Tensor, forward: Forward, rtol: float) -> tuple[nn.Module, int]:
    folded = copy.deepcopy(model).eval()
    pairs, ref = _conv_bn_pairs(folded, example, forward)
    if not pairs:
        return folded, 0
    parents = {child: (mod, name) for mod in folded.modules() for name, child in mod.named_children()}
    with torch.no_grad():
        for conv, bn in pairs:
            scale = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            if bn.affine:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
            conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.ndim - 1))).to(conv.weight.dtype))
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            parent, name = parents[bn]
            has_post = hasattr(bn, "act") and hasattr(bn, "drop")  # timm BatchNormAct2d
            setattr(parent, name, _PostNorm(bn.drop, bn.act) if has_post else nn.Identity())
        out = forward(folded, example)
    scale = float(ref.abs().max().clamp_min(1e-6))
    if out.shape != ref.shape or float((out - ref).abs().max()) > rtol * scale:
        return copy.deepcopy(model).eval(), 0  # something shares a conv output: keep it unfolded
    return folded, len(pairs)


CPU_CHUNK = 16  # images per forward on CPU: measured best for Lite0 @128 and ResNet-50 @224 (BENCHMARKS.md)


def forward_chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int | None
) -> torch.Tensor:
    """fn over `x` in slices of `chunk` images, concatenated (chunk None or ≥ len(x): one call).

    Why: on a CPU the activations of a 64-image batch spill out of the caches; 16 images at a time keep them
    close and run 2.3x faster for EfficientNet-Lite0 @128 (1.2x for ResNet-50 @224) with the same outputs.
    """
    if chunk is None or chunk <= 0 or x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(chunk)])  # (B, ...)
