"""Out-of-distribution detection by bits/dim with a shapes checkpoint (issue 16).

AUROC of the unconditional bits/dim (empty prompt, exact) separating held-out shapes
images (validation indices) from: digits (scikit-learn's bundled 8x8 digits, grey to RGB,
prepared as training prepares images), uniform noise, shapes shifted by a quarter of the
image (wrapping), and colour-inverted shapes. Higher bits/dim = more out of distribution;
AUROC 1.0 separates perfectly, 0.5 is chance.

    python -m bench.ood checkpoints/demo/shapes16.pth [--images 50]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from model import load_checkpoint, prepare_image
from training.datasets.digits import load_digit_images
from training.datasets.shapes import VAL_START, render
from worker.scoring import log_probs


def auroc(inside: list[float], outside: list[float]) -> float:
    """P(an outside image scores more bits than an inside one), ties counted half."""
    a, b = np.array(inside)[:, None], np.array(outside)[None, :]
    return float((b > a).mean() + 0.5 * (b == a).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=50)
    args = p.parse_args()
    model, _ = load_checkpoint(args.checkpoint, map_location="cpu")
    model.eval()
    size, n = model.config.image_size, args.images
    rng = np.random.default_rng(0)

    def bits(x: torch.Tensor) -> float:
        lp = log_probs(model, x, [""], None)
        return float(-lp.double().sum() / (lp.numel() * np.log(2)))

    shapes = [render(VAL_START + k, size)[0] for k in range(n)]
    chw = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in shapes]
    inside = [bits(x) for x in chw]
    digit_images, _ = load_digit_images()
    sets = {
        "digits": [prepare_image(Image.fromarray(np.asarray(d, dtype=np.uint8)).convert("RGB"),
                                 size, 3) for d in digit_images[:n]],
        "noise": [torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
                  for _ in range(n)],
        "shifted": [torch.roll(x, shifts=(size // 4, size // 4), dims=(1, 2)) for x in chw],
        "inverted": [255 - x for x in chw],
    }
    print(f"{args.checkpoint}: {n} held-out shapes images, mean {np.mean(inside):.3f} bits/dim")
    for name, images in sets.items():
        outside = [bits(x) for x in images]
        print(f"  {name:<9} mean {np.mean(outside):.3f} bits/dim  AUROC "
              f"{auroc(inside, outside):.3f}")


if __name__ == "__main__":
    main()
