"""The run-directory contract: everything after training reads a run through this module.

RUN_DIR/
  config.yaml        the resolved ExperimentConfig
  model.json         model identity + preprocessing + class names (enough to rebuild the network)
  best.safetensors   weights chosen on the val split (never on test)
  last.pt            resumable state: model, optimizer, scheduler, epoch, RNG, best metric (weights_only-loadable)
  metrics.csv        one row per epoch
  tb/                TensorBoard logs
  metrics.json, predictions.csv   written by `evaluate`
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from carspotter.config import DataConfig, ExperimentConfig, ModelConfig, from_dict, load_config, to_dict
from carspotter.models.factory import CarModel, Preprocess, create_model
from carspotter.utils import atomic_path, atomic_write_json

CONFIG = "config.yaml"
MODEL_JSON = "model.json"
BEST = "best.safetensors"
LAST = "last.pt"


class RunError(ValueError):
    """A run directory is missing pieces or is inconsistent; the message names the file."""


@dataclass
class ModelInfo:
    model: dict[str, Any]  # ModelConfig as a dict
    num_classes: int
    class_names: list[str]
    preprocess: dict[str, Any]  # img_size, mean, std, interpolation
    resize_size: int | None = None
    crop_mode: str = "center"  # data.crop_mode: how eval photos become squares (center crop or squash)
    source: str = ""  # where the weights came from (run dir, pretrained file …)
    amp: str = "auto"  # train.amp: the precision every command runs this model at (models/inference.py)
    tta: str = "none"  # eval.tta: default test-time augmentation of evaluate/predict/serve

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "preprocess": self.preprocess,
            "resize_size": self.resize_size,
            "crop_mode": self.crop_mode,
            "source": self.source,
            "amp": self.amp,
            "tta": self.tta,
        }

    def eval_transform(self) -> Any:
        """PIL photo → the tensor this model is evaluated on (its size, mean/std, resize_size, crop_mode)."""
        from carspotter.data.transforms import build_transform

        p = self.preprocess
        data = DataConfig(img_size=int(p["img_size"]), resize_size=self.resize_size, crop_mode=self.crop_mode)
        return build_transform(data, p["mean"], p["std"], train=False)


def model_info(model: CarModel, cfg: ExperimentConfig, class_names: list[str]) -> ModelInfo:
    return ModelInfo(
        model=to_dict(cfg.model),
        num_classes=model.num_classes,
        class_names=list(class_names),
        preprocess=model.preprocess.to_dict(),
        resize_size=cfg.data.resize_size,
        crop_mode=cfg.data.crop_mode,
        amp=cfg.train.amp,
        tta=cfg.eval.tta,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / torch.compile / EMA wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def save_weights(model: torch.nn.Module, path: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))


def save_model_json(run_dir: Path, info: ModelInfo) -> None:
    atomic_write_json(Path(run_dir) / MODEL_JSON, info.to_json())


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: a crash mid-write leaves the previous `last.pt` intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise RunError(f"{path}: no resumable state here")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{path}: cannot load resumable state ({str(e).splitlines()[0]})") from None


def read_model_info(run_dir: str | Path) -> ModelInfo:
    p = Path(run_dir) / MODEL_JSON
    if not p.is_file():
        raise RunError(
            f"{run_dir}: not a carspotter run directory (no {MODEL_JSON}); train one with `carspotter train`"
        )
    try:
        d = json.loads(p.read_text())
        return ModelInfo(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise RunError(f"{p}: malformed ({e})") from None


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise RunError(f"{run_dir}: no {CONFIG}")
    return load_config(p)


def load_run(run_dir: str | Path, device: str = "cpu", weights: str = BEST) -> tuple[CarModel, ModelInfo]:
    """Rebuild the network from model.json and load its best weights; the model is in eval mode."""
    run_dir = Path(run_dir)
    info = read_model_info(run_dir)
    mcfg: ModelConfig = from_dict(ModelConfig, info.model, where=f"{run_dir / MODEL_JSON}:model")
    mcfg.pretrained, mcfg.weights, mcfg.freeze = False, None, "none"
    model = create_model(mcfg, info.num_classes, img_size=int(info.preprocess["img_size"]))
    wpath = run_dir / weights
    if not wpath.is_file():
        raise RunError(f"{wpath}: missing; the run has not finished an epoch yet?")
    try:
        sd = load_file(str(wpath))
    except Exception as e:
        raise RunError(f"{wpath}: not readable safetensors ({e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RunError(
            f"{wpath}: does not fit the model in {MODEL_JSON} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    p = info.preprocess
    model.preprocess = Preprocess(
        int(p["img_size"]), tuple(p["mean"]), tuple(p["std"]), p.get("interpolation", "bilinear")
    )
    return model.to(device).eval(), info
