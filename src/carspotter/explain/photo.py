"""One photo in, "why this answer" out: prediction, heat-map over the photo, evidence photos, a panel.

`PhotoExplainer` is what the CLI (`explain`, `predict --explain`), the report and the service share. It
explains on its own BatchNorm-folded copy of the run's network (explain.cam.Explainer) and, when the gallery
index was built from the same run, embeds the query with that copy too: one forward pass gives the logits
and the heat-map, a second the query vector, and the caller's model is never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from carspotter.data.transforms import Preprocess
from carspotter.explain.cam import DEFAULT_METHOD, Explainer, ExplainError, cam_to_photo, overlay
from carspotter.explain.evidence import check_same_classes, evidence

TILE = 160  # panel tile height in pixels


@dataclass
class PhotoExplanation:
    """Everything about one explained photo; `to_json()` is what explain.json holds."""

    top: list[dict[str, Any]]  # [{"class_id", "class_name", "probability"}], best first
    explained_class: int
    layer: str
    method: str
    heat: np.ndarray  # (S, S) over the network's input square, in [0, 1]
    heat_photo: np.ndarray  # (h, w) over the photo, 0 outside the region the network saw
    overlay: Image.Image
    evidence: list[dict[str, Any]] | None = None  # explain.evidence.evidence(), None without an index
    # where the car is: the CAM box of the explained class (explain/box.py), normalised x1, y1, x2, y2 of
    # the photo; the box /api/classify and `predict` give for the same photo and class
    box: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        top1 = self.top[0]
        return {
            "prediction": top1,
            "runner_up": self.top[1] if len(self.top) > 1 else None,
            "top": self.top,
            "explained_class": self.explained_class,
            "method": self.method,
            "target_layer": self.layer,
            "heat_empty": bool(self.heat.max() <= 0),  # no positive evidence for the class at this layer
            "evidence": self.evidence,
            "box": [round(float(v), 4) for v in self.box] if self.box is not None else None,
            **self.extra,
        }


class PhotoExplainer:
    """The run's classifier + heat-maps + (optionally) its gallery index for evidence photos."""

    def __init__(
        self,
        model: torch.nn.Module,
        info: Any,  # rundir.ModelInfo (model.json)
        index: Any = None,  # retrieval.index.GalleryIndex
        run_dir: str | Path | None = None,
        method: str = DEFAULT_METHOD,
        device: str = "cpu",
    ) -> None:
        if info.num_classes <= 0:
            raise ExplainError("a metric-learning run has no classifier to explain; use `carspotter search`")
        self.info = info
        self.class_names = list(info.class_names)
        self.device = device
        self.pre = Preprocess.from_dict(info.preprocess)  # exactly what classify feeds the network
        self.transform = self.pre.transform()
        self.explainer = Explainer(model, method, img_size=self.pre.img_size)
        self.index = index
        self.embed_model: torch.nn.Module | None = None
        if index is not None:
            check_same_classes(index, self.class_names)
            from carspotter.retrieval.query import built_from_run, embedder_for_index

            if built_from_run(index, run_dir):
                self.embed_model = self.explainer.model  # used under the explainer's lock only
            else:
                self.embed_model = copy.deepcopy(embedder_for_index(index, device)).eval()

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        index_dir: str | Path | None = None,
        method: str = DEFAULT_METHOD,
        device: str = "cpu",
    ) -> PhotoExplainer:
        from carspotter.models.loading import load_run

        model, info = load_run(run_dir, device)
        index = None
        if index_dir is not None:
            from carspotter.retrieval.index import GalleryIndex

            index = GalleryIndex.load(index_dir)
        return cls(model, info, index, run_dir=run_dir, method=method, device=device)

    @property
    def layer(self) -> str:
        return self.explainer.layer

    def explain(
        self,
        photos: list[Image.Image],
        k: int = 3,
        class_idx: list[int] | None = None,
        top: int = 5,
        display_max: int | None = 1024,
    ) -> list[PhotoExplanation]:
        """Explain each photo's top-1 class (or `class_idx`); `k` evidence photos of it, 1 of the runner-up.

        The network sees each photo exactly as `classify` does; the overlay is drawn on a copy no longer
        than `display_max` pixels (None: full size), so a 40-megapixel upload does not cost a 40 MP overlay.
        """
        if not photos:
            return []
        x = torch.stack([self.transform(p) for p in photos]).to(self.device)  # (B, 3, S, S)
        with self.explainer.lock:
            heat, logits, feats, fm = self._explain(x, class_idx)
            queries = None
            if self.index is not None and self.embed_model is not None:
                queries = self._queries(photos, feats)  # (B, D)
            classes = logits.argmax(dim=1) if class_idx is None else torch.as_tensor(class_idx)
            boxes = self._boxes(photos, x, fm, logits, classes)
        probs = logits.float().softmax(dim=1).cpu()
        tp, ti = probs.topk(min(top, probs.shape[1]), dim=1)
        out = []
        for b, photo in enumerate(photos):
            ranked = [
                {"class_id": int(c), "class_name": self.class_names[int(c)], "probability": float(p)}
                for p, c in zip(tp[b].tolist(), ti[b].tolist(), strict=True)
            ]
            cls = int(class_idx[b]) if class_idx is not None else ranked[0]["class_id"]
            shown = photo
            if display_max and max(photo.size) > display_max:
                shown = photo.copy()
                shown.thumbnail((display_max, display_max), Image.Resampling.BILINEAR)
            hp = cam_to_photo(heat[b], shown.size, self.pre.resize_side, self.pre.crop_mode)
            ev = None
            if queries is not None:
                runner = ranked[1]["class_id"] if len(ranked) > 1 else None
                ev = evidence(self.index, queries[b], ranked[0]["class_id"], runner, k)
                for group in ev:
                    group["class_name"] = self.class_names[group["class_id"]]
            out.append(
                PhotoExplanation(
                    ranked,
                    cls,
                    self.layer,
                    self.explainer.method,
                    heat[b],
                    hp,
                    overlay(photo, hp),
                    ev,
                    box=tuple(float(v) for v in boxes[b]),  # type: ignore[arg-type]
                )
            )
        return out

    def _shares_pass(self) -> bool:
        """The index embeds with this very network and preprocessing: its query vector is the pooled
        feature (or embedding) of the Grad-CAM forward pass, so no second forward is needed."""
        if self.index is None or self.embed_model is not self.explainer.model:
            return False
        from carspotter.retrieval.query import index_preprocess

        return index_preprocess(self.index, self.explainer.model).to_dict() == self.pre.to_dict()

    def _explain(
        self, x: torch.Tensor, class_idx: list[int] | None
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Heat-maps, logits, (when the index can use them) the pooled backbone features of that pass, and
        the target layer's output (the feature map the CAM box is made from, when it is the last one)."""
        from carspotter.explain.cam import explain_batch

        ex = self.explainer  # the lock is held by the caller
        grabbed: list[torch.Tensor] = []
        layer_out: list[torch.Tensor] = []
        hooks = [  # registered before explain_batch's own hook: sees the layer's output as computed
            ex.model.get_submodule(ex.layer).register_forward_hook(
                lambda _m, _i, out: layer_out.append(out.detach()) if isinstance(out, torch.Tensor) else None
            )
        ]
        if self._shares_pass():
            hooks.append(
                ex.model.backbone.register_forward_hook(lambda _m, _i, out: grabbed.append(out.detach()))
            )
        try:
            heat, logits = explain_batch(ex.model, x, class_idx, ex.method, ex.layer)
        finally:
            for hook in hooks:
                hook.remove()
        return heat, logits, (grabbed[0] if grabbed else None), (layer_out[0] if layer_out else None)

    def _boxes(
        self,
        photos: list[Image.Image],
        x: torch.Tensor,
        fm: torch.Tensor | None,
        logits: torch.Tensor,
        classes: torch.Tensor,
    ) -> np.ndarray:
        """(B, 4) CAM boxes of `classes`, normalised to each photo (explain/box.py). When the explained layer
        is the backbone's last feature map (EfficientNet bn2, ResNet layer4, …: its pooled head gives the
        same logits) the box reuses that pass; otherwise it costs one more forward."""
        from carspotter.explain.box import activation_maps, maps_from_feature_map, photo_boxes

        model = self.explainer.model
        act = None
        if fm is not None and fm.ndim == 4:
            try:
                act = maps_from_feature_map(model, fm, classes)
            except (ValueError, RuntimeError):  # not a map the head takes
                act = None
            if act is not None and not torch.allclose(
                act.logits.float().cpu(), logits.float().cpu(), rtol=1e-3, atol=1e-3
            ):
                act = None  # the explained layer is not the last feature map
        if act is None:
            act = activation_maps(model, x, classes)
        return photo_boxes(act.maps, [p.size for p in photos], self.pre)

    def _queries(self, photos: list[Image.Image], feats: torch.Tensor | None) -> np.ndarray:
        from carspotter.retrieval.query import embed_queries

        assert self.index is not None and self.embed_model is not None
        if feats is None:
            return embed_queries(self.index, self.embed_model, photos, self.device)
        model = self.explainer.model
        source = self.index.info.get("embed_source") or "auto"
        with torch.no_grad():
            use_features = source == "features" or (source == "auto" and model.embedding is None)
            q = feats if use_features else model.embedding(feats)
        return np.ascontiguousarray(q.float().cpu().numpy(), dtype=np.float32)

    def gallery_photo(self, item_id: int) -> Image.Image | None:
        """A gallery photo by index id (None when the index records no data_root or the file is gone)."""
        from carspotter.data.images import ImageError, open_rgb

        if self.index is None or not self.index.info.get("data_root"):
            return None
        path = Path(self.index.info["data_root"]) / str(self.index.meta[item_id]["path"])
        try:
            return open_rgb(path)
        except (ImageError, OSError):
            return None


# ---- pictures ----------------------------------------------------------------------------------------------
def _tile(img: Image.Image | None, caption: list[str], colour: tuple[int, int, int]) -> Image.Image:
    """A photo scaled to TILE px high with a coloured frame and a caption underneath."""
    if img is None:
        img = Image.new("RGB", (TILE, TILE), (235, 236, 240))
    w = max(1, round(img.width * TILE / max(1, img.height)))
    body = img.convert("RGB").resize((w, TILE), Image.Resampling.BILINEAR)
    tw = max(w, 150) + 6
    out = Image.new("RGB", (tw, TILE + 6 + 14 * len(caption) + 4), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.rectangle((0, 0, w + 5, TILE + 5), fill=colour)
    out.paste(body, (3, 3))
    for i, line in enumerate(caption):
        d.text((3, TILE + 8 + 14 * i), line[:40], fill=(20, 20, 30))
    return out


def panel(expl: PhotoExplanation, photo: Image.Image, gallery: Any) -> Image.Image:
    """Photo with its heat-map | nearest photo(s) of the predicted class | nearest of the runner-up.

    `gallery(id) -> PIL image or None` loads evidence photos (PhotoExplainer.gallery_photo).
    """
    top1 = expl.top[0]
    tiles = [
        _tile(photo, ["your photo"], (120, 120, 120)),
        _tile(expl.overlay, [f"heat-map ({expl.method})", f"{top1['class_name']}", f"p = {top1['probability']:.2f}"],
              (47, 111, 222)),
    ]  # fmt: skip
    for group in expl.evidence or []:
        colour = (18, 128, 92) if group["role"] == "top1" else (180, 35, 24)
        label = "predicted" if group["role"] == "top1" else "runner-up"
        for hit in group["hits"][: 2 if group["role"] == "top1" else 1]:
            tiles.append(
                _tile(
                    gallery(hit["id"]),
                    [f"{label}: {hit['class_name']}", f"distance {hit['distance']:.3f}"],
                    colour,
                )
            )
        if not group["hits"]:
            tiles.append(_tile(None, [f"{label}: {group['class_name']}", "no gallery photo"], colour))
    if expl.evidence is None:
        tiles.append(_tile(None, ["no gallery index:", "no evidence photos"], (200, 200, 200)))
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 8
    return out
