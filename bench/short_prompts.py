"""Short prompts on a shapes checkpoint: does "a red circle" draw a red circle?

    python bench/short_prompts.py CHECKPOINT [CHECKPOINT ...] [--seeds 8] [--guidance 1.5]
        [--json out.json]

Every `a <colour> <shape>` prompt (6 x 3 = 18) with `--seeds` seeds each (seed k for
the k-th image of every prompt; 8 seeds = 144 images), read back by the shapes analyser
(`training.datasets.shapes.analyse`): the share whose colour, shape, and both, match.
Guidance defaults to each checkpoint's own default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model import load_checkpoint
from training.datasets.shapes import COLOURS, SHAPES, analyse


def score(path: str, seeds: int, guidance: float | None) -> dict[str, object]:
    model, meta = load_checkpoint(path)
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    images = model.generate(prompts, num_images=seeds, guidance_scale=guidance,
                            seed=[k for _ in prompts for k in range(seeds)])
    hits = {"colour": 0, "shape": 0, "both": 0}
    for i, img in enumerate(images):
        colour, shape = prompts[i // seeds].split()[1:]
        got = analyse(img)
        hits["colour"] += got["colour"] == colour
        hits["shape"] += got["shape"] == shape
        hits["both"] += got["colour"] == colour and got["shape"] == shape
    n = len(images)
    g = model.default_guidance_scale if guidance is None else guidance
    return {"checkpoint": path, "guidance": g, "n": n, "steps": meta.get("steps"),
            **{k: v / n for k, v in hits.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for path in args.checkpoints:
        r = score(path, args.seeds, args.guidance)
        print(f"{path}: guidance {r['guidance']}, {r['n']} images: colour {r['colour']:.1%}, "
              f"shape {r['shape']:.1%}, both {r['both']:.1%}", flush=True)
        out.append(r)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
