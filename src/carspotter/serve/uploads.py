"""Turning an untrusted upload into a safe RGB image, or a 4xx that says what is wrong.

Order matters: size and format are checked from the header *before* any pixel is decoded, so a
decompression bomb or a 30000×30000 PNG is refused without allocating its pixels.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carspotter.data.images import ImageError, decode

# "MPO" is how Pillow labels the multi-picture JPEGs many phones write; they are JPEG files.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
# The only Pillow parsers that ever see untrusted bytes (MPO files are opened by the JPEG parser).
PARSERS = ("JPEG", "PNG", "WEBP")
ALLOWED_HUMAN = "JPEG, PNG or WebP"
MULTIPART_SLACK = 64 * 1024  # multipart headers and the small `k` field on top of the photo itself


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000

    @property
    def max_mb(self) -> float:
        return self.max_bytes / (1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return self.max_bytes + MULTIPART_SLACK


def too_large_detail(limits: UploadLimits) -> str:
    return f"upload too large: the limit is {limits.max_mb:.3g} MB"


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-stream; an HTTPException, so FastAPI's body parsing passes it on as 413."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` while they stream in, so a 50 MB body never sits in memory.

    A declared Content-Length over the limit is answered at once, before the app reads a byte (uvicorn then
    discards the rest of the body as it arrives); a body without one (chunked) is counted chunk by chunk.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, detail: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reply(send)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._reply(send)

    async def _reply(self, send: Send) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def check_header(data: bytes, limits: UploadLimits) -> tuple[str, tuple[int, int]]:
    """Read only the image header: format and size. Raises HTTPException 400/413/415/422."""
    if not data:
        raise HTTPException(400, "empty upload: the field 'file' holds no bytes")
    if len(data) > limits.max_bytes:
        raise HTTPException(413, too_large_detail(limits))
    try:
        with Image.open(io.BytesIO(data), formats=PARSERS) as img:  # lazy: parses the header only
            fmt, size = (img.format or "").upper(), img.size
    except Image.DecompressionBombError:
        raise HTTPException(413, "image has too many pixels (decompression bomb refused)") from None
    except UnidentifiedImageError:
        raise HTTPException(415, f"not an image we can read; send a {ALLOWED_HUMAN} photo") from None
    except Exception:  # a malformed header makes Pillow raise all sorts of things; never echo its text
        raise HTTPException(422, "corrupt image header") from None
    if fmt not in ALLOWED_FORMATS:
        raise HTTPException(415, f"unsupported image format {fmt or 'unknown'}; send a {ALLOWED_HUMAN} photo")
    w, h = size
    if w <= 0 or h <= 0:
        raise HTTPException(422, f"corrupt image header (size {w}×{h})")
    if w * h > limits.max_pixels:
        raise HTTPException(
            413, f"image is {w}×{h} = {w * h / 1e6:.0f} Mpx; the limit is {limits.max_pixels / 1e6:g} Mpx"
        )
    return fmt, size


_REASON_STATUS = {
    "empty file": 400,
    "not an image": 415,
    "unsupported format": 415,
    "too many pixels (decompression bomb)": 413,
    "truncated image": 422,
    "corrupt image": 422,
}


def load_upload(data: bytes, limits: UploadLimits) -> Image.Image:
    """Header checks, then a full decode (truncation shows up here) to RGB. Runs in a worker thread."""
    check_header(data, limits)
    try:
        return decode(data, source="upload", allowed_formats=ALLOWED_FORMATS, parsers=PARSERS)
    except ImageError as e:  # the short reason only: decoder messages stay on the server
        status = _REASON_STATUS.get(e.reason, 422)
        raise HTTPException(status, e.reason) from None
    except Exception:  # decoders can fail in ways Pillow does not wrap (e.g. MemoryError, struct.error)
        raise HTTPException(422, "corrupt image") from None
