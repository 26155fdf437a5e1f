"""`create_model(cfg, num_classes)`: any timm backbone (or the scratch CNN) + our head, with its preprocessing.

The returned `CarModel` has a uniform interface (timm-style):
    forward_features(x) -> (B, F) pooled backbone features
    feature_map(x)      -> (B, C, h, w) unpooled; pool_map(feature_map(x)) == forward_features(x)
    embed(x)            -> (B, D) the retrieval embedding (embedding head if present, else pooled features)
    forward_head(f)     -> (B, num_classes) logits from pooled features
    forward(x)          -> logits
and `model.preprocess` (img_size, mean, std) so the preprocessing travels with the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from carspotter.config import ModelConfig
from carspotter.data.transforms import Preprocess
from carspotter.utils import hub_reachable

log = logging.getLogger(__name__)

SCRATCH = "scratch_cnn"


class WeightsError(RuntimeError):
    """Pretrained weights cannot be had or do not fit; the message says what to pass instead."""


class CarModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        dropout: float = 0.0,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone  # timm model built with num_classes=0: forward() returns pooled (B, F)
        self.num_features = num_features
        self.num_classes = num_classes
        self.embedding = nn.Linear(num_features, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or num_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        head_in = embed_dim or num_features
        self.classifier = nn.Linear(head_in, num_classes) if num_classes > 0 else nn.Identity()
        self.preprocess = Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, 3, H, W) -> (B, F)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone features before pooling: where the evidence lies (CAM boxes, explain/box.py)."""
        return self.backbone.forward_features(x)

    def pool_map(self, fm: torch.Tensor) -> torch.Tensor:
        """The rest of the backbone: pool_map(feature_map(x)) == forward_features(x), so a box costs no forward."""
        return self.backbone.forward_head(fm, pre_logits=True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return self.embedding(f) if self.embedding is not None else f  # (B, D)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            f = self.embedding(f)
        return self.classifier(self.dropout(f))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameters(self) -> list[nn.Parameter]:
        mods = [self.classifier] + ([self.embedding] if self.embedding is not None else [])
        return [p for m in mods for p in m.parameters()]

    def backbone_stages(self) -> list[list[nn.Parameter]]:
        """Backbone parameters grouped stem → last stage (timm's coarse group matcher), for unfreezing."""
        return backbone_stages(self.backbone)


def backbone_stages(backbone: nn.Module) -> list[list[nn.Parameter]]:
    if hasattr(backbone, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        named = dict(backbone.named_parameters())
        return [[named[n] for n in groups[k]] for k in sorted(groups)]
    return [list(m.parameters()) for m in backbone.children() if any(True for _ in m.parameters())]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise WeightsError(f"--weights {path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"--weights {path}: refused to load — not a plain tensor state dict "
            f"(loaded with weights_only=True; pickled code is never executed): {str(e).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"--weights {path}: expected a state dict of tensors")
    return obj


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local state dict into a headless backbone. Classifier keys of any size are dropped, not a crash."""
    path = Path(path)
    sd = _read_state_dict(path)
    for prefix in ("module.", "backbone.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a whole CarModel (e.g. a run's best.safetensors)
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    usable, mismatched = {}, []
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            mismatched.append(f"{k} {tuple(v.shape)}→{tuple(own[k].shape)}")
        elif k in own:
            usable[k] = v
    missing = [k for k in own if k not in usable]
    unexpected = [k for k in sd if k not in own]
    if not usable:
        raise WeightsError(
            f"--weights {path}: none of its {len(sd)} tensors match this backbone's parameter names; "
            "is it for another architecture?"
        )
    backbone.load_state_dict(usable, strict=False)
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if missing:
        log.warning("weights %s: %d missing keys (e.g. %s)", path, len(missing), missing[:3])
    if unexpected:
        log.info(
            "weights %s: %d unused keys (e.g. %s) — classifier keys are expected here",
            path,
            len(unexpected),
            unexpected[:3],
        )
    return report


def _timm_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.weights:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    if cfg.pretrained:
        try:
            if not hub_reachable():
                raise ConnectionError("the weights hub (huggingface.co) cannot be reached from this machine")
            return timm.create_model(cfg.arch, pretrained=True, num_classes=0)
        except Exception as e:  # no network, hub down, no such weights
            raise WeightsError(
                f"could not download ImageNet weights for {cfg.arch!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local file with --weights PATH "
                "(.safetensors or a state dict), or --pretrained false to start from random weights."
            ) from None
    return timm.create_model(cfg.arch, pretrained=False, num_classes=0)


def create_model(cfg: ModelConfig, num_classes: int, img_size: int = 224) -> CarModel:
    """Build backbone + head; load local or downloaded weights; attach preprocessing."""
    if cfg.arch == SCRATCH:
        from carspotter.models.scratch import ScratchBackbone

        backbone: nn.Module = ScratchBackbone(
            cfg.channels, batchnorm=cfg.batchnorm, hidden_dim=cfg.hidden_dim, hidden_bn=cfg.hidden_bn
        )
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        interp = "bilinear"
    else:
        if not timm.is_model(cfg.arch.split(".")[0]):
            raise WeightsError(
                f"unknown backbone {cfg.arch!r}; any timm model name works (timm.list_models())"
            )
        backbone = _timm_backbone(cfg)
        if cfg.weights:
            load_backbone_weights(backbone, cfg.weights)
        dc = backbone.pretrained_cfg or {}
        mean, std = tuple(dc.get("mean", (0.485, 0.456, 0.406))), tuple(dc.get("std", (0.229, 0.224, 0.225)))
        interp = dc.get("interpolation", "bilinear")
    model = CarModel(backbone, backbone.num_features, num_classes, cfg.dropout, cfg.embed_dim)
    if cfg.arch == SCRATCH:
        from carspotter.models.scratch import he_init

        backbone.apply(he_init)  # He init where a ReLU follows; the linear classifier keeps a small init
        if isinstance(model.classifier, nn.Linear):
            nn.init.normal_(model.classifier.weight, std=0.01)
            nn.init.zeros_(model.classifier.bias)
        if cfg.weights:
            load_backbone_weights(backbone, cfg.weights)
    model.preprocess = Preprocess(
        img_size,
        tuple(cfg.mean or mean),
        tuple(cfg.std or std),
        interp,  # type: ignore[arg-type]
    )
    apply_freeze(model, cfg.freeze)
    return model


def apply_freeze(model: CarModel, freeze: str) -> None:
    if freeze not in ("none", "backbone"):
        raise ValueError(f"model.freeze must be 'none' or 'backbone', got {freeze!r}")
    for p in model.backbone.parameters():
        p.requires_grad = freeze == "none"


def set_trainable_stages(model: CarModel, n_trailing: int) -> None:
    """Progressive unfreezing: make the last `n_trailing` backbone stages trainable (-1 = all, 0 = none)."""
    stages = model.backbone_stages()
    n = len(stages) if n_trailing < 0 else min(n_trailing, len(stages))
    for i, params in enumerate(stages):
        for p in params:
            p.requires_grad = i >= len(stages) - n
