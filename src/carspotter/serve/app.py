"""The web service: one self-contained page and a small JSON API over a trained run (+ a gallery index).

`create_app` loads the model and the index once and keeps them in `app.state` (no module globals).
Untrusted input never reaches the filesystem: uploads are decoded from memory, and gallery photos are
addressed by integer id only, their paths taken from the index's own metadata.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from carspotter.explain.box import BoxSettings
from carspotter.explain.zoom import ZoomSettings
from carspotter.serve.explain import ExplainService
from carspotter.serve.hosts import DEFAULT_HOSTS, HostAllowListMiddleware
from carspotter.serve.inference import Busy, Predictor
from carspotter.serve.uploads import BodyLimitMiddleware, UploadLimits, load_upload, too_large_detail

log = logging.getLogger(__name__)
K_MAX = 50
THUMB_SIZE = 256
PAGE_CSP = (
    "default-src 'none'; img-src 'self' blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NOSNIFF = {"X-Content-Type-Options": "nosniff"}

router = APIRouter()
KQuery = Annotated[int | None, Query(alias="k", ge=1, le=K_MAX, description=f"how many results (1..{K_MAX})")]
KForm = Annotated[int | None, Form(alias="k", ge=1, le=K_MAX, description="the same, as a form field")]
Upload = Annotated[UploadFile, File(description="the photo: JPEG, PNG or WebP")]


class Service:
    """Everything one app instance holds: the predictor, limits, the page, a thumbnail cache."""

    def __init__(self, predictor: Predictor, limits: UploadLimits, admin_token: bytes | None = None) -> None:
        self.predictor = predictor
        self.explainer = ExplainService(predictor, max_batch=predictor.batcher.max_batch)  # its own worker
        self.limits = limits
        self.admin_token = admin_token  # None: enrolment is off (serve.enrol)
        self.started = time.time()
        self.page = resources.files("carspotter.serve").joinpath("templates/index.html").read_text("utf-8")
        self.thumbnail = lru_cache(maxsize=2048)(self._make_thumbnail)

    def gallery_path(self, item_id: int) -> Path:
        index = self.predictor.index
        if index is None:
            raise HTTPException(404, "this server has no gallery index (start it with --index INDEX_DIR)")
        if not 0 <= item_id < len(index.meta):
            raise HTTPException(404, f"no gallery image {item_id}; ids run 0..{len(index.meta) - 1}")
        from carspotter.retrieval.catalogue import photo_path
        from carspotter.retrieval.index import GalleryIndexError

        try:  # enrolled photos lie under the index dir, indexed ones under data_root; never outside them
            path = photo_path(self.predictor.index_dir or ".", index, item_id)
        except GalleryIndexError as e:  # a tampered meta.csv must not expose other files
            raise HTTPException(404, str(e)) from None
        if not path.is_file():
            raise HTTPException(404, f"gallery image {item_id} is missing on the server")
        return path

    def _make_thumbnail(self, item_id: int) -> bytes:
        from carspotter.data.images import ImageError, open_rgb

        path = self.gallery_path(item_id)
        try:
            img = open_rgb(path)
        except ImageError as e:
            raise HTTPException(404, f"gallery image {item_id} cannot be read ({e.reason})") from None
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()


def _service(request: Request) -> Service:
    return request.app.state.service


async def _read_image(request: Request, file: UploadFile):  # -> PIL.Image.Image
    svc = _service(request)
    data = await file.read(svc.limits.max_bytes + 1)  # never more than the limit + 1 byte in memory
    return await run_in_threadpool(load_upload, data, svc.limits)


async def _infer(request: Request, kind: str, image: Any, k: int) -> list[dict[str, Any]]:
    try:
        fut = _service(request).predictor.batcher.submit(kind, image, k)
    except Busy as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    return await asyncio.wrap_future(fut)


@router.get("/", include_in_schema=False)
def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_service(request).page, headers={"Content-Security-Policy": PAGE_CSP, **NOSNIFF})


@router.get("/api/health", summary="Liveness and what is loaded")
def health(request: Request) -> dict[str, Any]:
    svc = _service(request)
    p = svc.predictor
    index = None
    if p.index is not None:
        index = {k: p.index.info.get(k) for k in ("metric", "index_type", "dim")} | {
            "size": len(p.index.meta)
        }
    return {
        "status": "ok",
        "model": p.info.model.get("arch"),
        "num_classes": len(p.class_names),
        "img_size": p.info.preprocess.get("img_size"),
        "device": p.device,
        "index": index,
        "temperature": p.calibration.temperature,
        "open_set": {"score": p.calibration.open_set_score, "threshold": p.calibration.threshold},
        "max_upload_mb": svc.limits.max_mb,
        "enrolment": svc.admin_token is not None and p.index is not None,
        "max_batch": p.batcher.max_batch,
        "explain": True,
        "zoom": p.looker.zoom.combine if p.looker is not None and p.looker.zoom is not None else None,
        "batches_run": p.batcher.batches,
        "images_inferred": p.batcher.jobs,
        "uptime_s": round(time.time() - svc.started, 1),
    }


@router.get("/api/classes", summary="The class names, in label order")
def classes(request: Request) -> dict[str, Any]:
    p = _service(request).predictor
    with p.lock:
        names, index = list(p.answer_names), p.index
    pos = {n: i for i, n in enumerate(names)}
    counts, indexed = [0] * len(names), [0] * len(names)
    for m in index.meta if index is not None else []:
        i = pos.get(str(m["class_name"]))
        if i is not None:
            counts[i] += 1
            indexed[i] += m.get("root") != "index"  # retrieval.catalogue.ROOT_INDEX marks enrolled photos
    n_clf = len(p.class_names) if p.info.num_classes > 0 else 0
    origin = [
        "trained" if i < n_clf else ("indexed" if indexed[i] else "enrolled") for i in range(len(names))
    ]
    return {
        "classes": [
            {"id": i, "name": n, "gallery_count": counts[i], "origin": origin[i]} for i, n in enumerate(names)
        ]
    }


@router.post("/api/classify", summary="Make → model → year with calibrated probabilities, or 'unknown'")
async def classify(request: Request, file: Upload, k: KQuery = None, k_form: KForm = None) -> dict[str, Any]:
    """The same structure as `carspotter predict --json` gives per photo; `predictions` is the top-k."""
    k = min(k or k_form or 5, len(_service(request).predictor.answer_names))
    image = await _read_image(request, file)
    t0 = time.perf_counter()
    answer = await _infer(request, "classify", image, k)
    return {
        "path": None,
        "error": None,
        **answer,
        "k": k,
        "time_ms": round(1000 * (time.perf_counter() - t0), 2),
    }


@router.post("/api/search", summary="The k most similar gallery photos")
async def search(request: Request, file: Upload, k: KQuery = None, k_form: KForm = None) -> dict[str, Any]:
    p = _service(request).predictor
    if p.index is None:
        raise HTTPException(
            409, "this server has no gallery index; start it with --index INDEX_DIR to search"
        )
    k = k or k_form or 8
    image = await _read_image(request, file)
    t0 = time.perf_counter()
    hits = await _infer(request, "search", image, k)
    return {
        "results": hits,
        "k": k,
        "metric": p.index.info.get("metric"),
        "time_ms": round(1000 * (time.perf_counter() - t0), 2),
    }


@router.post("/api/explain", summary="Why the top class: heat-map overlay and evidence photos per class")
async def explain(request: Request, file: Upload, k: KQuery = None, k_form: KForm = None) -> dict[str, Any]:
    """The photo with its Grad-CAM heat-map (PNG data URL), the target layer, and the k nearest gallery photos
    of the predicted class plus the nearest of the runner-up (with an index). Runs on its own worker, so a
    slow explanation never holds up /api/classify."""
    k = min(k or k_form or 3, 20)
    image = await _read_image(request, file)
    t0 = time.perf_counter()
    try:
        fut = _service(request).explainer.submit(image, k)
    except Busy as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    result = await asyncio.wrap_future(fut)
    return {**result, "k": k, "time_ms": round(1000 * (time.perf_counter() - t0), 2)}


@router.get(
    "/api/gallery/{item_id}",
    summary="A gallery photo's thumbnail, by its id in the index",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
def gallery(request: Request, item_id: int) -> Response:
    data = _service(request).thumbnail(item_id)
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600", **NOSNIFF}
    )


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        name = ".".join(loc) or "request"
        if name == "file" and err.get("type") == "missing":
            return "no photo: send it as multipart/form-data in the field 'file'"
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"detail": "..."}`; bad input is a 4xx, never a 5xx."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None)
        )

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        status = 400 if detail.startswith("no photo") else 422
        return JSONResponse({"detail": detail}, status)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug of ours, still JSON
        log.error(
            "internal error on %s", request.url.path, exc_info=exc
        )  # details to the log, never the client
        return JSONResponse({"detail": "internal error; see the server log"}, 500)

    app.add_exception_handler(Exception, server_error)
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]


def create_app(
    run_dir: str | Path,
    index_dir: str | Path | None = None,
    *,
    max_upload_mb: float = 10,
    device: str = "cpu",
    max_batch: int = 8,
    max_pixels: int = 40_000_000,
    zoom: ZoomSettings | None = None,
    box: BoxSettings | None = None,
    allowed_hosts: list[str] | None = None,
    admin_token_file: str | Path | None = None,
    tta: str | None = None,
) -> FastAPI:
    """Load the run's model (and the gallery index) now, and return the ASGI app serving them.

    `allowed_hosts`: Host header names accepted (default: localhost and the loopback addresses); any
    other Host is refused, so a DNS-rebinding page in a browser cannot read the API.
    `admin_token_file` turns on enrolment (serve.enrol) for callers that present its token.
    """
    from carspotter.serve import enrol

    token = enrol.read_admin_token(admin_token_file) if admin_token_file is not None else None
    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    limits = UploadLimits(max_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels)
    predictor = Predictor(run_dir, index_dir, device=device, max_batch=max_batch, zoom=zoom, box=box, tta=tta)
    Image.init()  # load Pillow's format plugins now, not during the first (non-image) upload: ~1 s here

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        predictor.close()
        app.state.service.explainer.close()

    from carspotter import __version__

    app = FastAPIOffline(  # /docs with Swagger UI's files bundled: it renders with no internet
        title="carspotter",
        version=__version__,
        description="Fine-grained car classification and look-alike search (Stanford Cars).",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, detail=too_large_detail(limits))
    app.add_middleware(HostAllowListMiddleware, allowed=allowed_hosts or list(DEFAULT_HOSTS))  # outermost
    app.state.service = Service(predictor, limits, token)
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(enrol.router)
    return app
