"""The model and the gallery index, loaded once per app, and the one thread that runs them.

Every forward pass runs on a single worker thread (so the model is never used by two threads at once and
the event loop never blocks). Requests that arrive while that thread is busy are taken together as one
batch (up to `max_batch`): under load the service runs one forward of B images instead of B forwards of
one, and with a single client it adds no waiting at all.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from carspotter.engine.answer import Hierarchy, build_answers
from carspotter.engine.calibration import load_calibration
from carspotter.explain.box import BoxSettings
from carspotter.explain.zoom import Looker, ZoomSettings, expand, rounded, zoom_rect
from carspotter.models.factory import CarModel
from carspotter.models.inference import autocast_dtype
from carspotter.models.loading import load_run
from carspotter.rundir import RunError

log = logging.getLogger(__name__)

BatchFn = Callable[[list[Image.Image], list[int]], list[Any]]


class Busy(RuntimeError):
    """The request queue is full; the client should retry later (503)."""


@dataclass
class _Job:
    kind: str
    image: Image.Image
    k: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class MicroBatcher:
    """A queue drained by one thread: whatever waits when the thread is free becomes one batch per kind."""

    def __init__(self, fns: dict[str, BatchFn], max_batch: int = 8, max_queue: int = 256) -> None:
        self.fns = fns
        self.max_batch = max(1, max_batch)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # number of forward groups run (for /api/health and the benchmark)
        self.jobs = 0

    def submit(self, kind: str, image: Image.Image, k: int) -> concurrent.futures.Future:
        self._ensure_started()
        job = _Job(kind, image, k)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(
                f"server busy: {self._queue.maxsize} requests already waiting; retry shortly"
            ) from None
        return job.future

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        self._thread = None

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="carspotter-infer", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            self._run([j for j in jobs if j.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        for kind in dict.fromkeys(j.kind for j in jobs):
            group = [j for j in jobs if j.kind == kind]
            try:
                results = self.fns[kind]([j.image for j in group], [j.k for j in group])
            except Exception as e:  # reported to each waiting request; the thread lives on
                log.exception("inference failed for a batch of %d %s requests", len(group), kind)
                for j in group:
                    j.future.set_exception(e)
                continue
            self.batches += 1
            self.jobs += len(group)
            for j, r in zip(group, results, strict=True):
                j.future.set_result(r)


class Predictor:
    """The run's classifier, plus (optionally) the gallery index and the network that embeds its queries."""

    def __init__(
        self,
        run_dir: str | Path,
        index_dir: str | Path | None = None,
        device: str = "cpu",
        max_batch: int = 8,
        zoom: ZoomSettings | None = None,
        box: BoxSettings | None = None,
        tta: str | None = None,
    ) -> None:
        from carspotter.models.inference import normalize_tta

        self.run_dir = Path(run_dir)
        self.device = device
        self.model, self.info = load_run(self.run_dir, device)
        # the run's precision and TTA (model.json), exactly as `evaluate` and `predict` run it
        self.tta = normalize_tta(self.info.tta if tta is None else tta, where="--tta")
        self.class_names: list[str] = list(self.info.class_names)
        self.calibration = load_calibration(self.run_dir)  # temperature + open-set threshold (T=1 if none)
        self.hierarchy = Hierarchy.from_names(self.class_names)
        self.transform = self.model.preprocess.transform()
        self.looker = (
            Looker(
                self.model,
                self.info,
                box,
                zoom,
                device,
                autocast=autocast_dtype(self.info.amp, device),
                tta=self.tta,
            )
            if self.info.num_classes > 0
            else None
        )
        self.index = None
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.embed_model: CarModel | None = None
        # Held while a batch runs and while enrolment swaps the index: never a half-updated gallery.
        self.lock = threading.RLock()
        self.open: Any = None  # retrieval.open_classify.OpenClassifier when the gallery adds classes
        if index_dir is not None:
            from carspotter.retrieval.index import GalleryIndex

            self.index = GalleryIndex.load(index_dir)
            self.embed_model = self._embedding_model()
            self._refresh_open()
        self.batcher = MicroBatcher({"classify": self.classify_batch, "search": self.search_batch}, max_batch)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _embedding_model(self) -> CarModel:
        """The network the index was built with: this very run (shared), another run, or a bare backbone."""
        from carspotter.retrieval.query import built_from_run, embedder_for_index

        assert self.index is not None
        same_run = built_from_run(self.index, self.run_dir)
        model = self.model if same_run else embedder_for_index(self.index, self.device)
        dim, got = (
            int(self.index.info.get("dim") or 0),
            self._embed(model, [Image.new("RGB", (32, 32))]).shape[1],
        )
        if dim and got != dim:
            raise RunError(f"the index holds {dim}-d vectors but its query network gives {got}-d ones")
        return model

    def _embed(self, model: CarModel, images: list[Image.Image]) -> np.ndarray:
        from carspotter.retrieval.query import embed_queries

        assert self.index is not None
        return embed_queries(self.index, model, images, self.device)

    # ---- the open catalogue (retrieval.catalogue): enrolled classes join the answers -------------------
    def _refresh_open(self) -> None:
        """Answer over trained + gallery classes when the gallery knows classes the classifier does not."""
        from carspotter.retrieval.open_classify import OpenClassifier

        has_clf = self.info.num_classes > 0
        oc = (
            OpenClassifier(self.index, self.class_names if has_clf else None)
            if self.index is not None
            else None
        )
        self.open = oc if oc is not None and (not has_clf or oc.extends_classifier) else None

    @property
    def answer_names(self) -> list[str]:
        """The classes /api/classify answers with (class_id = position here)."""
        return self.open.names if self.open is not None else self.class_names

    def enrol(self, photos: list[Any], add_to_existing: bool = False) -> Any:
        """Enrol photos (retrieval.catalogue.Photo) into the served index; searches wait, then see it all."""
        from carspotter.retrieval.catalogue import enrol

        assert self.index_dir is not None and self.embed_model is not None
        with self.lock:
            res, index = enrol(
                self.index_dir,
                photos,
                add_to_existing=add_to_existing,
                device=self.device,
                model=self.embed_model,
            )
            self.index = index
            self._refresh_open()
        return res

    def unenrol(self, class_name: str) -> int:
        from carspotter.retrieval.catalogue import unenrol

        assert self.index_dir is not None
        with self.lock:
            n, index = unenrol(self.index_dir, class_name)
            self.index = index
            self._refresh_open()
        return n

    # ---- batch functions: run on the batcher's single thread only ----------------------------------------
    def classify_batch(self, images: list[Image.Image], ks: list[int]) -> list[dict[str, Any]]:
        """Per photo: the answer of `engine.answer.build_answers` (its top list cut to that request's k),
        plus "box" (where the car is, normalised x1, y1, x2, y2) and "zoom" (the second look, when on).
        With a gallery that knows classes the run does not (enrolled ones), the answer is over the union."""
        if self.looker is None and self.open is None:
            raise RunError(f"{self.run_dir}: a metric-learning run has no classifier; use /api/search")
        with self.lock:
            looks = self.looker(images) if self.looker is not None else None  # logits + CAM box (+ zoom)
            logits = looks.logits.float().cpu() if looks is not None else None  # (B, C)
            if self.open is None:
                answers = build_answers(logits, self.class_names, self.calibration, max(ks), self.hierarchy)
            else:
                clf = None
                if logits is not None and self.open.clf_names:
                    clf = logits.softmax(dim=1).numpy()  # the mixture's weights were measured on softmax
                q = self._embed(self.embed_model, images)  # type: ignore[arg-type]
                probs = torch.from_numpy(self.open.probs(clf, q))  # (B, U) over trained + gallery classes
                answers = build_answers(None, self.open.names, self.calibration, max(ks), probs=probs)
        for b, (a, k) in enumerate(zip(answers, ks, strict=True)):
            a["predictions"] = a["predictions"][:k]
            a["box"] = rounded(looks.boxes[b]) if looks is not None else None
            a["zoom"] = None
            if looks is not None and looks.zoomed is not None:
                w, h = images[b].size
                crop_box = expand(tuple(looks.boxes[b]), self.looker.zoom.margin)  # type: ignore[arg-type, union-attr]
                x0, y0, x1, y1 = zoom_rect(w, h, crop_box)
                a["zoom"] = {"used": bool(looks.zoomed[b]), "crop": rounded((x0 / w, y0 / h, x1 / w, y1 / h))}
        return answers

    def search_batch(self, images: list[Image.Image], ks: list[int]) -> list[list[dict[str, Any]]]:
        with self.lock:
            return self._search_batch(images, ks)

    def _search_batch(self, images: list[Image.Image], ks: list[int]) -> list[list[dict[str, Any]]]:
        assert self.index is not None and self.embed_model is not None
        q = np.ascontiguousarray(self._embed(self.embed_model, images), dtype=np.float32)  # (B, D)
        kmax = min(max(ks), len(self.index.meta))
        # the class_id /api/classify uses for the same class (positions in the union when it is open)
        ids_by_name = {n: i for i, n in enumerate(self.open.names)} if self.open is not None else {}
        dist, ids = self.index.search(q, kmax)  # (B, kmax) each
        out = []
        for b, k in enumerate(ks):
            hits = []
            for d, i in zip(dist[b, :k].tolist(), ids[b, :k].tolist(), strict=True):
                if i < 0:  # FAISS pads with -1 when fewer than k vectors are reachable
                    continue
                m = self.index.meta[i]
                hits.append(
                    {
                        "id": int(i),
                        "class_id": ids_by_name.get(str(m["class_name"]), int(m["label"])),
                        "class_name": str(m["class_name"]),
                        "distance": float(d),
                        "thumbnail_url": f"/api/gallery/{int(i)}",
                    }
                )
            out.append(hits)
        return out

    def close(self) -> None:
        self.batcher.close()
