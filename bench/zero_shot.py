"""Zero-shot classification by captions with a shapes checkpoint (issue 16, "Measured").

For held-out validation images of the dataset's own renderer (indices from VAL_START), each
fact axis is scored separately: the captions differ only in that fact (colour: 6, shape: 3,
position: 5, background: 3; the other facts as in the true caption, template form 0), and
the top-1 caption by posterior is compared with the truth. Exact likelihood (tolerance 0)
the default tolerance (0.01) and 0.1 side by side, through the worker's own scoring code.

    python -m bench.zero_shot checkpoints/demo/shapes16.pth [--images 30] [--independent]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import load_checkpoint
from training.datasets.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    POSITION_CENTRE,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    VAL_START,
    make_prompt,
    render,
)
from worker.scoring import log_probs, summarize

AXES = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "background": BACKGROUNDS}
TOLERANCES = (0.0, 0.01, 0.1)


def independent(facts: dict, size: int, seed: int) -> np.ndarray:
    """The same facts drawn by a routine of this script's own (not the dataset's): Pillow
    primitives, the same palette, side within +-10 % and centre within +-6 % of the
    grammar's, a triangle from polygon() rather than the dataset's row spans."""
    rng = random.Random(f"independent:{seed}")
    d = SIZE_FRACTION[facts["size"]] * size * rng.uniform(0.9, 1.1)
    fx, fy = POSITION_CENTRE[facts["position"]]
    cx = fx * size + rng.uniform(-0.06, 0.06) * size
    cy = fy * size + rng.uniform(-0.06, 0.06) * size
    x0, y0 = max(0.0, cx - d / 2), max(0.0, cy - d / 2)
    x1, y1 = min(size - 1.0, x0 + d), min(size - 1.0, y0 + d)
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[facts["background"]])
    draw = ImageDraw.Draw(img)
    colour = PALETTE[facts["colour"]]
    if facts["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif facts["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return np.array(img)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--independent", action="store_true",
                   help="draw the facts with this script's own routine instead")
    args = p.parse_args()
    model, _ = load_checkpoint(args.checkpoint, map_location="cpu")
    model.eval()
    size = model.config.image_size
    right = {(a, t): 0 for a in AXES for t in TOLERANCES}
    for n in range(args.images):
        arr, _, facts = render(VAL_START + n, size)
        if args.independent:
            arr = independent(facts, size, n)
        x = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        for axis, values in AXES.items():
            captions = [make_prompt(**{**facts, axis: v}) for v in values]  # type: ignore[arg-type]
            lp = log_probs(model, x, [*captions, ""], None)
            for t in TOLERANCES:
                best = summarize(captions, lp[:-1], lp[-1], t)["ranking"][0]
                right[(axis, t)] += values[best] == facts[axis]
    source = "independent routine" if args.independent else "dataset renderer"
    print(f"{args.checkpoint}: {args.images} validation images (indices {VAL_START}.., "
          f"{source})")
    for axis, values in AXES.items():
        cells = "  ".join(f"tolerance {t}: {100 * right[(axis, t)] / args.images:.0f} %"
                          for t in TOLERANCES)
        print(f"  {axis:<10} ({len(values)} captions)  {cells}")


if __name__ == "__main__":
    main()
