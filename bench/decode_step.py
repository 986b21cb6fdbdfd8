"""Where a decode step goes: the decoder blocks vs the work outside them, two trees side by side.

    OMP_NUM_THREADS=1 python bench/decode_step.py [--base-ref main] [--batch 1] [--rounds 8]
        [--hidden-dim 16]

Both this tree's `model` and `--base-ref`'s (read with `git archive`, as in
`bench/sampling.py`) build the default 32x32 model (untrained weights, same seed; at
`--hidden-dim` 16 the arithmetic is nothing, so the blocks' time is their dispatch), sample
pixels 0..399 of one request, then time `--steps` eager decode steps from pixel 400 again
and again (each round rewinds the position; the cache rows are rewritten), interleaving
the trees round by round. Per tree, medians over the rounds of:

- step: a whole `decode_step`;
- blocks: the time inside `PromptPix.decode` (the 8 blocks and the final norm) in those
  steps, so "outside" = step - blocks is the embedding, the channel head and sampling of
  the pixel's sub-pixels and the step's bookkeeping, measured in place (cold caches
  after the blocks' ~30 MB of weights);
- outside, hot: the step with `decode` replaced by a constant state, so only the work
  outside the blocks runs, hot in cache (its dispatch and Python cost).

The 64 MB copy bandwidth is printed before and after: absolute figures move with it.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as this_model
from bench.sampling import PROMPT, build, copy_bandwidth, load_ref

START = 400


class Tree:
    """One tree's model, sampler module and a decode state filled up to pixel START."""

    def __init__(self, pkg: ModuleType, batch: int, hidden_dim: int) -> None:
        self.model = build(pkg, 32, hidden_dim=hidden_dim)
        self.sampling: Any = importlib.import_module(pkg.__name__ + ".sampling")
        S = self.sampling
        rows = S._layout(self.model, [pkg.SampleRequest([PROMPT], num_images=batch, seed=0)])
        m = self.model
        with torch.inference_mode():
            self.state = s = S.prepare_state(m, rows, S.row_params(rows, m.device), True,
                                             torch.float32)
            for _ in range(START):
                S.decode_step(m, s)
            # A real state at pixel START, reused by "outside, hot".
            s.pos.fill_(START)
            prev = s.tokens.view(s.tokens.shape[0], m.num_pixels, -1)[:, START - 1:START]
            self.constant = m.decode(m.embed(prev, s.pos, s.cond), s.text, s.caches, s.pos,
                                     START + 1)
        self.inside = 0.0
        decode = m.decode

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            out = decode(*args, **kwargs)
            self.inside += time.perf_counter() - t0
            return out

        self.timed = timed

    @torch.inference_mode()
    def run(self, steps: int, hot: bool) -> tuple[float, float]:
        """(ms a step, ms a step inside `decode`) over `steps` steps from pixel START."""
        s, m = self.state, self.model
        s.pos.fill_(START)
        s.host_pos = START
        self.inside = 0.0
        m.decode = (lambda *a, **k: self.constant) if hot else self.timed  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                self.sampling.decode_step(m, s)
            total = time.perf_counter() - t0
        finally:
            del m.decode  # the class's method again
        return total / steps * 1e3, self.inside / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-ref", default="main")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden-dim", type=int, default=256, help="the decoder's width")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"64 MB copy {copy_bandwidth():.1f} GB/s (before)")
    tmp = tempfile.TemporaryDirectory()
    base = load_ref(args.base_ref, Path(tmp.name), "model_base")
    trees = {name: Tree(pkg, args.batch, args.hidden_dim)
             for name, pkg in (("this tree", this_model), (args.base_ref, base))}
    got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            step, inside = tree.run(args.steps, hot=False)
            hot, _ = tree.run(args.steps, hot=True)
            got[name].append((step, inside, hot))
    print(f"width {args.hidden_dim}, batch {args.batch}, {args.steps} steps from pixel {START}, "
          f"medians of {args.rounds} interleaved rounds (ms a step)")
    print("| tree | step | blocks | outside (in place) | outside, hot |")
    print("|---|---|---|---|---|")
    med = {}
    for name, rows in got.items():
        step, inside, hot = (statistics.median(r[i] for r in rows) for i in range(3))
        outside = statistics.median(r[0] - r[1] for r in rows)
        med[name] = step
        print(f"| {name} | {step:.3f} | {inside:.3f} | {outside:.3f} | {hot:.3f} |")
    print(f"step, {args.base_ref} / this tree: {med[args.base_ref] / med['this tree']:.3f}x")
    print(f"64 MB copy {copy_bandwidth():.1f} GB/s (after)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
