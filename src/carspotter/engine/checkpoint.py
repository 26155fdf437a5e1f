"""Training-side checkpoints: resumable `last.pt` state, and the model.json a run writes.

File names and the model.json schema belong to `carspotter.rundir`; rebuilding a network from a run dir is
`carspotter.models.loading.load_run`. They are re-exported here for the training loop's convenience; code
outside `engine` imports them from those modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from carspotter.config import ExperimentConfig, to_dict
from carspotter.models.factory import CarModel
from carspotter.models.loading import load_run, save_weights, unwrap
from carspotter.rundir import (
    BEST,
    CONFIG,
    LAST,
    MODEL_JSON,
    ModelInfo,
    RunError,
    read_model_info,
    read_run_config,
    write_model_json,
)
from carspotter.utils import atomic_path

__all__ = [
    "BEST",
    "CONFIG",
    "LAST",
    "MODEL_JSON",
    "ModelInfo",
    "RunError",
    "load_run",
    "load_state",
    "model_info",
    "read_model_info",
    "read_run_config",
    "save_model_json",
    "save_state",
    "save_weights",
    "unwrap",
]


def model_info(model: CarModel, cfg: ExperimentConfig, class_names: list[str]) -> ModelInfo:
    """model.json of a run: its model config, classes and the complete preprocessing it was evaluated with."""
    return ModelInfo(
        model=to_dict(cfg.model),
        num_classes=model.num_classes,
        class_names=list(class_names),
        preprocess=model.preprocess.with_data(cfg.data).to_dict(),
        amp=cfg.train.amp,
        tta=cfg.eval.tta,
    )


def save_model_json(run_dir: Path, info: ModelInfo) -> None:
    write_model_json(run_dir, info)


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
