"""Explanations for the service: heat-map overlay + evidence photos, on a worker of their own.

An explanation costs a forward pass with a partial backward plus an embedding (about 2-3 classify calls,
BENCHMARKS.md), so it runs on its own micro-batching thread with its own copy of the network
(explain.photo.PhotoExplainer): a slow explanation never holds up the classify/search thread, and that
thread's model is never hooked. The explainer is built on first use, on the worker thread.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

from PIL import Image

from carspotter.serve.inference import MicroBatcher

OVERLAY_MAX = 640  # longest side of the overlay sent back (the page shows it in place of the photo)


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ExplainService:
    """`submit(image, k)` → a future of the /api/explain answer; one explanation batch at a time (`lock`).
    `predictor` (serve.inference.Predictor) lends its loaded run, info and index; its model is copied."""

    def __init__(self, predictor: Any, max_batch: int = 4, max_queue: int = 32) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()  # held while explaining
        self._explainer: Any = None
        self.batcher = MicroBatcher({"explain": self.explain_batch}, max_batch=max_batch, max_queue=max_queue)

    def _get(self) -> Any:
        if self._explainer is None:
            from carspotter.explain.photo import PhotoExplainer

            p = self.predictor
            self._explainer = PhotoExplainer(
                p.model, p.info, p.index, run_dir=p.run_dir, device=p.device
            )  # copies p.model: the classify thread's model is not shared
        return self._explainer

    def submit(self, image: Image.Image, k: int) -> Any:
        return self.batcher.submit("explain", image, k)

    def explain_batch(self, images: list[Image.Image], ks: list[int]) -> list[dict[str, Any]]:
        with self.lock:
            px = self._get()
            expls = px.explain(images, k=max(ks), display_max=OVERLAY_MAX)
        out = []
        for e, k in zip(expls, ks, strict=True):
            doc = e.to_json()
            groups = []
            for g in doc["evidence"] or []:
                hits = g["hits"][:k] if g["role"] == "top1" else g["hits"]
                groups.append(
                    {
                        "role": g["role"],
                        "class_id": g["class_id"],
                        "class_name": g["class_name"],
                        "hits": [
                            {
                                "id": h["id"],
                                "class_id": h["class_id"],
                                "class_name": h["class_name"],
                                "distance": h["distance"],
                                "thumbnail_url": f"/api/gallery/{h['id']}",
                            }
                            for h in hits
                        ],
                    }
                )
            out.append(
                {
                    "prediction": doc["prediction"],
                    "runner_up": doc["runner_up"],
                    "method": doc["method"],
                    "target_layer": doc["target_layer"],
                    "heat_empty": doc["heat_empty"],
                    "box": doc["box"],  # CAM box of the explained class, normalised x1, y1, x2, y2
                    "overlay": data_url(e.overlay),
                    "overlay_size": list(e.overlay.size),
                    "evidence": groups if doc["evidence"] is not None else None,
                }
            )
        return out

    def close(self) -> None:
        self.batcher.close()
