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

from carspotter.models.factory import CarModel
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
        tta: str | None = None,
    ) -> None:
        from carspotter.models.inference import normalize_tta

        self.run_dir = Path(run_dir)
        self.device = device
        self.model, self.info = load_run(self.run_dir, device)
        # the run's precision and TTA (model.json), exactly as `evaluate` and `predict` run it
        self.tta = normalize_tta(self.info.tta if tta is None else tta, where="--tta")
        self.class_names: list[str] = list(self.info.class_names)
        self.transform = self.model.preprocess.transform()
        self.index = None
        self.embed_model: CarModel | None = None
        if index_dir is not None:
            from carspotter.retrieval.index import GalleryIndex

            self.index = GalleryIndex.load(index_dir)
            self.embed_model = self._embedding_model()
        self.batcher = MicroBatcher({"classify": self.classify_batch, "search": self.search_batch}, max_batch)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _embedding_model(self) -> CarModel:
        """The network the index was built with: this very run (shared), another run, or a bare backbone."""
        from carspotter.retrieval.query import embedder_for_index

        assert self.index is not None
        src = self.index.info.get("run_dir")
        same_run = bool(src) and Path(src).resolve() == self.run_dir.resolve()
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

    # ---- batch functions: run on the batcher's single thread only ----------------------------------------
    @torch.inference_mode()
    def classify_batch(self, images: list[Image.Image], ks: list[int]) -> list[list[dict[str, Any]]]:
        from carspotter.models.inference import run_model

        x = torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, S, S)
        probs = torch.softmax(run_model(self.model, x, self.info.amp, self.tta), dim=1).cpu()  # (B, C)
        top_p, top_i = probs.topk(min(max(ks), probs.shape[1]), dim=1)  # (B, kmax), sorted descending
        return [
            [
                {"class_id": int(i), "class_name": self.class_names[int(i)], "probability": float(p)}
                for p, i in zip(top_p[b, :k].tolist(), top_i[b, :k].tolist(), strict=True)
            ]
            for b, k in enumerate(ks)
        ]

    def search_batch(self, images: list[Image.Image], ks: list[int]) -> list[list[dict[str, Any]]]:
        assert self.index is not None and self.embed_model is not None
        q = np.ascontiguousarray(self._embed(self.embed_model, images), dtype=np.float32)  # (B, D)
        kmax = min(max(ks), len(self.index.meta))
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
                        "class_id": int(m["label"]),
                        "class_name": str(m["class_name"]),
                        "distance": float(d),
                        "thumbnail_url": f"/api/gallery/{int(i)}",
                    }
                )
            out.append(hits)
        return out

    def close(self) -> None:
        self.batcher.close()
