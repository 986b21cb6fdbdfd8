"""PNG encoding of results and of the live preview strip (Pillow)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model import PromptPixError, prepare_image

from .protocol import Keys

GREY = 128  # rows not sampled yet in the preview


class UploadRefused(ValueError):
    """The stored upload is gone or the model cannot take it (`invalid_request`)."""


def prepared_upload(store: Any, job_id: str, size: int, channels: int
                    ) -> tuple[torch.Tensor, bool]:
    """A job's stored upload (score image, init image) as the model's input, uint8
    [channels, size, size] prepared as training data is (`model.prepare_image`), and
    whether it had to be resized."""
    data = store.get_blob(Keys.upload(job_id))
    if data is None:
        raise UploadRefused("the submitted image is no longer stored (expired)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            resized = img.size != (size, size)
        return prepare_image(data, size, channels), resized
    except (PromptPixError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise UploadRefused(f"the model cannot take this image: {e}") from e


def _to_pil(chw: np.ndarray) -> Image.Image:
    c = chw.shape[0]
    if c == 1:
        return Image.fromarray(np.ascontiguousarray(chw[0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), mode="RGB")


def encode_png(chw: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """One uint8 C×H×W image as PNG bytes, with `text` as tEXt/iTXt chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)  # iTXt: UTF-8, so any prompt survives
    buf = io.BytesIO()
    _to_pil(chw).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def result_pngs(images: torch.Tensor, prompt: str, seeds: list[int], params: dict[str, Any],
                model_id: str, bits: list[float] | None = None) -> list[bytes]:
    """PNG bytes of each image (N×C×H×W uint8), carrying prompt, seed, params, model id
    and, given `bits`, the image's exact bits/dim under its prompt (`image_bits_per_dim`).

    Nothing job-specific goes in, so the same request reproduces byte-identical files."""
    arr = images.detach().to("cpu").numpy()
    out = []
    for k, chw in enumerate(arr):
        text = {
            "prompt": prompt, "seed": str(seeds[k]),
            "parameters": json.dumps({**params, "seed": seeds[k]}, sort_keys=True),
            "model_id": model_id, "Software": "promptpix",
        }
        if bits is not None:
            text["image_bits_per_dim"] = repr(round(bits[k], 6))
        out.append(encode_png(chw, text))
    return out


def preview_png(partial: torch.Tensor, rows_done: int) -> bytes:
    """All images side by side in one strip; rows not sampled yet are grey."""
    arr = partial.detach().to("cpu").numpy().copy()  # (N, C, H, W)
    arr[:, :, rows_done:, :] = GREY
    strip = np.concatenate(list(arr), axis=2)  # (C, H, N*W)
    return encode_png(strip)


def grey_preview(n: int, channels: int, size: int) -> bytes:
    """The preview before the first row: all grey."""
    return encode_png(np.full((channels, size, size * n), GREY, dtype=np.uint8))
