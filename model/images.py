"""Image preparation for the model: what training does to a dataset image, for one upload.

`prepare_image` gives the exact uint8 tensor a training image of the same file would be
(training/datasets/base.py: EXIF orientation, transparency composited on white, shorter
side resized to the model's size with bicubic resampling, centre crop), converted to the
model's channels (grey: PIL's "L" conversion of that RGB image). A test checks it against
the training pipeline byte for byte. The model package imports nothing of ours, so the
steps are written here rather than imported from training/.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import PromptPixError


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (dropping alpha would leave black)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the centre size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(image: Image.Image | bytes | str | Path, image_size: int,
                  channels: int) -> torch.Tensor:
    """An image (PIL, encoded bytes, or a file path) as uint8 [channels, size, size],
    prepared exactly as training prepares dataset images.

    Raises PromptPixError when the bytes or file cannot be decoded, or channels is not 1/3.
    """
    if channels not in (1, 3):
        raise PromptPixError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise PromptPixError(f"image_size must be >= 1, got {image_size}")
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, bytes):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(Path(image))
        img = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PromptPixError(f"cannot read the image: {e}; expected a PNG, JPEG or other "
                             "image file Pillow can decode") from e
    img = resize_center_crop(img, image_size)
    if channels == 1:
        img = img.convert("L")
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
