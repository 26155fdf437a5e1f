"""Teaching the service a new car: `POST /api/enrol`, `DELETE /api/enrol/{class}` (admin only).

Off unless the server was started with `--admin-token-file PATH`; then every call needs
`Authorization: Bearer <token>`, compared in constant time. The token is checked before the request body
is read, so an unauthenticated upload is never parsed. Writes go through retrieval.catalogue (atomic swap
of the index directory) under the predictor's lock, so concurrent searches see the old or the new gallery.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

MAX_ENROL_FILES = 50
TRUE = ("1", "true", "yes", "on")

router = APIRouter()


def read_admin_token(path: str | Path) -> bytes:
    """The admin token: the file's first line, stripped; refuses an empty or too-short token."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--admin-token-file {p}: no such file")
    lines = p.read_text(encoding="utf-8").strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ValueError(
            f"--admin-token-file {p}: the token must be at least 16 characters (got {len(token)})"
        )
    return token.encode("utf-8")


def require_admin(request: Request) -> None:
    token = request.app.state.service.admin_token
    if token is None:
        raise HTTPException(
            403, "enrolment is off: start the server with --admin-token-file PATH to enable it"
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, "admin token required: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not hmac.compare_digest(given.strip().encode("utf-8"), token):
        raise HTTPException(403, "wrong admin token")


def _predictor(request: Request) -> Any:
    p = request.app.state.service.predictor
    if p.index is None:
        raise HTTPException(409, "this server has no gallery index; start it with --index INDEX_DIR to enrol")
    return p


@router.post("/api/enrol", summary="Enrol photos of a (new) class into the gallery (admin token)")
async def enrol(request: Request) -> dict[str, Any]:
    """multipart/form-data: `class` (the name), one or more `file`s, optional `add_to_existing=true`."""
    from carspotter.retrieval.catalogue import CatalogueError, Photo
    from carspotter.serve.uploads import load_upload

    require_admin(request)  # before a byte of the body is parsed
    p = _predictor(request)
    limits = request.app.state.service.limits
    form = await request.form(max_files=MAX_ENROL_FILES, max_fields=10)
    name = form.get("class")
    files = [f for f in form.getlist("file") if hasattr(f, "read")]
    if not isinstance(name, str) or not name.strip():
        raise HTTPException(400, "no class name: send it in the form field 'class'")
    if not files:
        raise HTTPException(400, "no photo: send one or more in the form field 'file'")
    photos = []
    for f in files:
        data = await f.read(limits.max_bytes + 1)
        await run_in_threadpool(load_upload, data, limits)  # size, format and pixel checks (4xx on failure)
        photos.append(Photo(name, f.filename or "upload", data))
    add = str(form.get("add_to_existing", "")).lower() in TRUE
    try:
        res = await run_in_threadpool(p.enrol, photos, add)
    except CatalogueError as e:
        raise HTTPException(409, str(e)) from None
    return {
        "class": " ".join(name.split()),
        "added": res.photos_added,
        "new_class": bool(res.new_classes),
        "duplicates": res.duplicates,
        "gallery_size": res.n_gallery,
    }


@router.delete("/api/enrol/{class_name:path}", summary="Remove an enrolled class (admin token)")
async def unenrol(request: Request, class_name: str) -> dict[str, Any]:
    from carspotter.retrieval.catalogue import CatalogueError

    require_admin(request)
    p = _predictor(request)
    try:
        n = await run_in_threadpool(p.unenrol, class_name)
    except CatalogueError as e:
        raise HTTPException(404 if str(e).startswith("no class") else 409, str(e)) from None
    return {"class": class_name, "removed": n, "gallery_size": len(p.index.meta)}
