"""Rebuild the network that made an index, so queries are embedded exactly like the gallery."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carspotter.models.factory import CarModel
from carspotter.retrieval.embed import embed_images, eval_transform
from carspotter.retrieval.index import GalleryIndex, GalleryIndexError


def embedder_for_index(index: GalleryIndex, device: str = "cpu") -> CarModel:
    """The run's best weights, or the bare backbone + weights file recorded in index.json."""
    info = index.info
    if info.get("run_dir"):
        from carspotter.engine.checkpoint import load_run

        run_dir = Path(info["run_dir"])
        if not (run_dir / "model.json").is_file():
            raise GalleryIndexError(f"the index was built from run {run_dir}, which is not on this machine")
        return load_run(run_dir, device)[0]
    if info.get("backbone"):
        from carspotter.retrieval.build import backbone_model

        weights = info.get("weights")
        if weights and not Path(weights).is_file():
            raise GalleryIndexError(
                f"the index was built with weights {weights}, which are not on this machine"
            )
        pre = info.get("preprocess") or {}
        model = backbone_model(info["backbone"], weights, int(pre.get("img_size", 224))).to(device)
        return model
    raise GalleryIndexError("index.json names neither run_dir nor backbone; cannot embed queries")


def query_transform(index: GalleryIndex, model: CarModel) -> Callable[[Image.Image], torch.Tensor]:
    """The gallery's own evaluation preprocessing (index.json: resize_size, crop_mode), for query photos."""
    return eval_transform(model, index.info.get("resize_size"), index.info.get("crop_mode", "center"))


def embed_queries(
    index: GalleryIndex, model: CarModel, images: Sequence[Image.Image], device: str = "cpu"
) -> np.ndarray:
    """(len(images), D) query vectors comparable with the gallery's: its preprocessing, its embedding source."""
    info = index.info
    return embed_images(
        model,
        images,
        device=device,
        source=info.get("embed_source") or "auto",
        resize_size=info.get("resize_size"),
        crop_mode=info.get("crop_mode", "center"),
        amp=info.get("amp", "auto"),
        tta=info.get("embed_tta", "none"),
    )
