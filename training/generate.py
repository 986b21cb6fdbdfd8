"""Local sampling for `generate_llm_prompt.py` / `promptpix generate`: PNGs and grids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .images import make_grid, save_png, slugify

log = logging.getLogger(__name__)


@dataclass
class SampleOptions:
    num_images: int = 1
    batch_size: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float | None = None  # None: the checkpoint's default
    seed: int = 0
    class_label: int = -1


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines (and surrounding whitespace) are skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def unique_slugs(prompts: list[str]) -> list[str]:
    """A readable, file-name-safe stem per prompt; repeats get -2, -3, ..."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        base = slugify(p) if p else "unconditional"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


@torch.no_grad()
def generate_to_dir(model: torch.nn.Module, prompts: list[str], output_dir: str | Path,
                    opts: SampleOptions, show_progress: bool = True) -> list[Path]:
    """Sample `opts.num_images` images per prompt; write one PNG each and a grid per prompt.

    Image i of every prompt uses seed `opts.seed + i` (one generator per image), so an image
    is reproducible from its file name whatever else was in the batch.
    Returns the written paths (images first per prompt, then its grid).
    """
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    rows = model.config.image_size
    n_calls = sum(-(-opts.num_images // opts.batch_size) for _ in prompts)
    bar = tqdm(total=n_calls * rows, desc="sampling", unit="row", disable=not show_progress)
    labels = [opts.class_label] if opts.class_label >= 0 else None
    written: list[Path] = []
    try:
        for prompt, slug in zip(prompts, unique_slugs(prompts), strict=True):
            images = []
            for start in range(0, opts.num_images, opts.batch_size):
                count = min(opts.batch_size, opts.num_images - start)
                seeds = [opts.seed + i for i in range(start, start + count)]
                done = [0]

                def progress(rows_done: int, rows_total: int, partial: torch.Tensor,
                             done: list[int] = done) -> None:
                    bar.update(rows_done - done[0])
                    done[0] = rows_done

                images.append(model.generate(
                    [prompt], num_images=count, class_labels=labels,
                    temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                    guidance_scale=opts.guidance_scale, seed=seeds, progress=progress))
                bar.update(rows - done[0])
            batch = torch.cat(images)  # uint8 [num_images, C, H, W]
            for i, img in enumerate(batch):
                written.append(save_png(img, out_dir / f"{slug}_{i:03d}_seed{opts.seed + i}.png"))
            written.append(save_png(make_grid(batch), out_dir / f"{slug}_grid.png"))
            log.info("%r -> %d images in %s", prompt, len(batch), out_dir)
    finally:
        bar.close()
    return written
