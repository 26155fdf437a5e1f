"""Robust image decoding shared by prepare, datasets and the web service.

Pillow's decompression-bomb guard stays on (we never touch `Image.MAX_IMAGE_PIXELS` globally) and
`LOAD_TRUNCATED_IMAGES` is never set: a truncated file is an error found at prepare time, not a grey
stripe in a training batch.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageError(ValueError):
    """An image cannot be used; `reason` is a short machine-friendly cause, the message names the file."""

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (CMYK, L, P, RGBA, I;16 …) to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clipping everything to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def decode(
    data: bytes | Path | str,
    source: str = "",
    allowed_formats: tuple[str, ...] | None = None,
    parsers: tuple[str, ...] | None = None,
) -> Image.Image:
    """Decode fully (so truncation shows up now) and return an RGB image, or raise ImageError.

    `parsers` limits which Pillow format plugins may even look at the bytes (untrusted uploads).
    """
    name = source or (str(data) if not isinstance(data, bytes) else "<bytes>")
    if isinstance(data, bytes):
        if len(data) == 0:
            raise ImageError(name, "empty file")
        fp: io.BytesIO | Path = io.BytesIO(data)
    else:
        fp = Path(data)
        try:
            st = fp.stat()  # follows symlinks: a dangling or looping link fails here
        except OSError as e:
            raise ImageError(name, "unreadable", e.strerror or str(e)) from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(name, "unreadable", "is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise ImageError(name, "unreadable", "not a regular file")
        if st.st_size == 0:
            raise ImageError(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=parsers) as img:
                fmt = img.format or ""
                if allowed_formats is not None and fmt.upper() not in allowed_formats:
                    raise ImageError(
                        name, "unsupported format", f"{fmt or 'unknown'}; allowed: {allowed_formats}"
                    )
                img.load()
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, "too many pixels (decompression bomb)", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image") from None
    except PermissionError as e:
        raise ImageError(name, "unreadable", e.strerror or str(e)) from None
    except OSError as e:
        msg = str(e)
        reason = (
            "truncated image" if "truncated" in msg.lower() or "premature" in msg.lower() else "corrupt image"
        )
        raise ImageError(name, reason, msg) from None
    except (ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        raise ImageError(name, "corrupt image", str(e)) from None


def open_rgb(path: str | Path) -> Image.Image:
    return decode(Path(path), source=str(path))
