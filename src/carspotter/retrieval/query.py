"""Rebuild the network that made an index, so queries are embedded exactly like the gallery. Never downloads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carspotter.data.transforms import Preprocess
from carspotter.models.factory import CarModel
from carspotter.models.loading import backbone_from_saved, backbone_model, load_run
from carspotter.retrieval.embed import embed_images
from carspotter.retrieval.index import GalleryIndex, GalleryIndexError
from carspotter.rundir import EMBEDDER, MODEL_JSON


def built_from_run(index: GalleryIndex, run_dir: str | Path | None) -> bool:
    """True when the index was built from this very run: the run's loaded model embeds its queries (no
    second copy of the network)."""
    src = index.info.get("run_dir")
    return bool(src and run_dir) and Path(src).resolve() == Path(run_dir).resolve()  # type: ignore[arg-type]


def embedder_for_index(index: GalleryIndex, device: str = "cpu") -> CarModel:
    """The run's best weights, or the bare backbone recorded in index.json: built with pretrained=False and
    loaded from its local weights file or the state dict saved beside the index (`embedder.safetensors`)."""
    info = index.info
    if info.get("run_dir"):
        run_dir = Path(info["run_dir"])
        if not (run_dir / MODEL_JSON).is_file():
            raise GalleryIndexError(f"the index was built from run {run_dir}, which is not on this machine")
        return load_run(run_dir, device)[0]
    if info.get("backbone"):
        pre = info.get("preprocess") or {}
        img_size = int(pre.get("img_size", 224))
        weights = info.get("weights")
        saved = Path(index.path) / EMBEDDER if index.path is not None else None
        if saved is not None and saved.is_file():
            model = backbone_from_saved(info["backbone"], img_size, saved)
        elif weights:
            if not Path(weights).is_file():
                raise GalleryIndexError(
                    f"the index was built with weights {weights}, which are not on this machine"
                )
            model = backbone_model(info["backbone"], weights, img_size, pretrained=False)
        else:
            raise GalleryIndexError(
                f"{index.path}: index.json names backbone {info['backbone']!r} with downloaded weights and no "
                f"{EMBEDDER} beside it; loading an index never downloads — rebuild it with --weights PATH"
            )
        if pre:
            model.preprocess = Preprocess.from_dict(pre)
        return model.to(device)
    raise GalleryIndexError("index.json names neither run_dir nor backbone; cannot embed queries")


def index_preprocess(index: GalleryIndex, model: CarModel) -> Preprocess:
    """The gallery's own evaluation preprocessing (index.json), else the model's."""
    pre = index.info.get("preprocess")
    return Preprocess.from_dict(pre) if pre else model.preprocess


def query_transform(index: GalleryIndex, model: CarModel) -> Callable[[Image.Image], torch.Tensor]:
    """The gallery's own evaluation transform, for query photos."""
    return index_preprocess(index, model).transform()


def embed_queries(
    index: GalleryIndex, model: CarModel, images: Sequence[Image.Image], device: str = "cpu"
) -> np.ndarray:
    """(len(images), D) query vectors comparable with the gallery's: its preprocessing, its embedding source."""
    return embed_images(
        model,
        images,
        device=device,
        source=index.info.get("embed_source") or "auto",
        preprocess=index_preprocess(index, model),
        amp=index.info.get("amp", "auto"),
        tta=index.info.get("embed_tta", "none"),
    )
