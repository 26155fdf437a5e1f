"""Rebuild a saved network: a run's best weights, or the bare backbone behind an index. Never downloads.

The network is built with `pretrained=False` and the saved state dict (or the local weights file the
run dir / index dir names) is loaded into it; file names and JSON come from `carspotter.rundir`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from carspotter.config import ModelConfig, from_dict
from carspotter.data.transforms import Preprocess
from carspotter.models.factory import CarModel, create_model
from carspotter.rundir import BEST, MODEL_JSON, ModelInfo, RunError, read_model_info
from carspotter.utils import atomic_path


def unwrap(model: object) -> object:
    """Strip DDP / torch.compile / EMA wrappers."""
    import torch

    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def save_weights(model: object, path: Path) -> None:
    """Atomic safetensors of a model's state dict (wrappers stripped)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}  # type: ignore[attr-defined]
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))


def _load_into(model: CarModel, wpath: Path, what: str) -> None:
    if not wpath.is_file():
        raise RunError(f"{wpath}: missing; the run has not finished an epoch yet?")
    try:
        sd = load_file(str(wpath))
    except Exception as e:
        raise RunError(f"{wpath}: not readable safetensors ({e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RunError(
            f"{wpath}: does not fit the model in {what} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_run(run_dir: str | Path, device: str = "cpu", weights: str = BEST) -> tuple[CarModel, ModelInfo]:
    """Rebuild the network from model.json and load its best weights; the model is in eval mode."""
    run_dir = Path(run_dir)
    info = read_model_info(run_dir)
    mcfg: ModelConfig = from_dict(ModelConfig, info.model, where=f"{run_dir / MODEL_JSON}:model")
    mcfg.pretrained, mcfg.weights, mcfg.freeze = False, None, "none"
    model = create_model(mcfg, info.num_classes, img_size=info.img_size)
    _load_into(model, run_dir / weights, MODEL_JSON)
    model.preprocess = Preprocess.from_dict(info.preprocess)
    return model.to(device).eval(), info


def backbone_model(arch: str, weights: str | None, img_size: int, pretrained: bool = True) -> CarModel:
    """A frozen pretrained backbone as an embedder: frozen features need no training run.

    Downloads ImageNet weights only when asked (`pretrained` and no local `weights`): building an index does,
    loading one never does (`backbone_from_saved`).
    """
    if arch == "scratch_cnn" and not weights:
        raise ValueError("a bare scratch_cnn backbone has random weights; pass --weights PATH or index a run")
    cfg = ModelConfig(arch=arch, pretrained=pretrained and not weights, weights=weights)
    return create_model(cfg, num_classes=0, img_size=img_size).eval()


def backbone_from_saved(
    arch: str, img_size: int, weights_file: Path, preprocess: dict | None = None
) -> CarModel:
    """A bare backbone rebuilt with pretrained=False from a saved whole-model state dict (no download)."""
    model = create_model(ModelConfig(arch=arch, pretrained=False), num_classes=0, img_size=img_size)
    _load_into(model, Path(weights_file), "the index's backbone")
    if preprocess:
        model.preprocess = Preprocess.from_dict(preprocess)
    return model.eval()
