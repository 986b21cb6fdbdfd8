"""Seconds per training step of the shapes demo's configuration: per-pixel vs sub-pixel.

    OMP_NUM_THREADS=1 python bench/demo_training.py [--old-ref 5e05fe0] [--rounds 3] \
        [--steps 5]

The demo's model (16x16 RGB, decoder 128 x 4, scratch text encoder 128 x 2, 4 heads), both
layouts side by side in one process (the sub-pixel package read from `--old-ref` with
`git archive`, as `bench/sampling.py` does), untrained weights: a training step is
forward, bits/dim loss, backward and AdamW. The per-pixel layout runs at batch 16 (the
sub-pixel demo's batch) and at batch 48: the same number of decoder positions a step as
the sub-pixel layout at batch 16 (48 x 256 pixels = 16 x 768 sub-pixels), three times the
images and sub-pixels in the loss. Rounds are interleaved across the runs, the best of
each kept; the 64 MB copy bandwidth is printed beside.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as new_model
from bench.sampling import build, copy_bandwidth, load_ref, time_training

DEMO = {"hidden_dim": 128, "num_layers": 4, "text_embed_dim": 128, "num_text_layers": 2,
        "text_nhead": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-ref", default="5e05fe0", help="a commit with the sub-pixel layout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps a round")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        old = load_ref(args.old_ref, Path(tmp), "model_subpixel")
        runs = {("per-pixel", 16): new_model, ("per-pixel", 48): new_model,
                ("sub-pixel", 16): old}
        best = dict.fromkeys(runs, float("inf"))
        print(f"copy bandwidth before: {copy_bandwidth():.1f} GB/s")
        for r in range(args.rounds):
            for (layout, batch), pkg in runs.items():
                m = build(pkg, 16, **DEMO)
                step = batch / time_training(m, batch, args.steps)
                best[(layout, batch)] = min(best[(layout, batch)], step)
                print(f"round {r + 1}: {layout} batch {batch}: {step:.3f} s/step", flush=True)
        print(f"copy bandwidth after: {copy_bandwidth():.1f} GB/s")
    sub = best[("sub-pixel", 16)]
    print(f"\nbest s/step: per-pixel b16 {best[('per-pixel', 16)]:.3f}, per-pixel b48 "
          f"{best[('per-pixel', 48)]:.3f}, sub-pixel b16 {sub:.3f}")
    print(f"sub-pixel b16 / per-pixel b16: {sub / best[('per-pixel', 16)]:.2f}x; "
          f"sub-pixel b16 / per-pixel b48 (equal tokens a step): "
          f"{sub / best[('per-pixel', 48)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
