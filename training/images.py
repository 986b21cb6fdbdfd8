"""PNG helpers shared by the trainer's sample grids, `generate` and `eval`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] (C = 1 or 3) -> PIL image of the same size."""
    arr = image.detach().to("cpu", torch.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1,
              pad_value: int = 255) -> torch.Tensor:
    """uint8 [N, C, H, W] -> one uint8 [C, H', W'] grid, `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value,
                      dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i].to("cpu", torch.uint8)
    return grid


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, format="PNG")
    return path


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug: lower-case ASCII letters, digits and '-' only.

    Prompts are user (or dataset) text: nothing of them may reach the file system except
    these characters, so '../', '/', NUL and friends cannot escape the output folder.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"
