"""PNG work the API does itself (Pillow, no torch): sizes, enlargement, partial crops."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import ApiError

MAX_SIDE_PX = 2048  # the largest enlargement served (1024x1024 is what tools send most)
# Magic numbers of the accepted upload formats (WebP: RIFF....WEBP, checked apart).
_FORMATS = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


class SizeError(ValueError):
    """A `size` the model cannot produce (the message names the supported ones)."""


def supported_sizes(image_size: int) -> str:
    """The sizes a model of side `image_size` serves, for error messages."""
    biggest = MAX_SIDE_PX // image_size
    return (f'"auto", "{image_size}x{image_size}" or a square multiple of it up to '
            f'"{image_size * biggest}x{image_size * biggest}" (e.g. "{image_size * 2}x'
            f'{image_size * 2}")')


def parse_size(size: str | None) -> int | None:
    """The side asked for by `size` (None for "auto"/unset); SizeError when not "WxH" square."""
    if size is None or size == "auto":
        return None
    m = _SIZE.match(size)
    if m is None or m.group(1) != m.group(2):
        raise SizeError(f'size {size!r} is not supported: this server makes square images; '
                        'use "auto" or "NxN"')
    return int(m.group(1))


def scale_for(side: int | None, image_size: int) -> int:
    """The nearest-neighbour enlargement factor turning `image_size` into `side`."""
    if side is None:
        return 1
    if side % image_size or side > MAX_SIDE_PX:
        raise SizeError(f'size "{side}x{side}" is not supported by this model; use '
                        f"{supported_sizes(image_size)}")
    return side // image_size


def _save(img: Image.Image, text: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def enlarge_png(data: bytes, scale: int) -> bytes:
    """The PNG enlarged `scale` times by nearest neighbour, text chunks kept."""
    if scale == 1:
        return data
    img = Image.open(io.BytesIO(data))
    img.load()
    text = dict(getattr(img, "text", {}) or {})
    big = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return _save(big, text)


def partial_png(preview: bytes, index: int, image_size: int, scale: int) -> bytes:
    """Image `index` cut from the preview strip (rows not sampled yet grey), enlarged."""
    strip = Image.open(io.BytesIO(preview))
    strip.load()
    left = index * image_size
    tile = strip.crop((left, 0, left + image_size, image_size))
    if scale > 1:
        tile = tile.resize((image_size * scale, image_size * scale), Image.Resampling.NEAREST)
    return _save(tile, {})


def decode_upload(text: str, field: str = "image") -> bytes:
    """The image bytes of a base64 upload (a `data:` URL prefix allowed); 422 naming
    `field` unless it is PNG, JPEG or WebP. The worker decodes and prepares it."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "invalid_request", f"{field} is not valid base64: {e}",
                       field) from e
    if not (any(data.startswith(magic) for magic, _ in _FORMATS)
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise ApiError(422, "invalid_request",
                       f"{field} is not a PNG, JPEG or WebP file (starts with {data[:8]!r})",
                       field)
    return data
