"""Sampling speed at the default width, cached vs full recompute, measured side by side.

    python bench/sampling.py [--sizes 16 32] [--recompute-steps 300] [--write docs/benchmarks.md]

For each image size: parameters, seconds per image at batch 1 and batch 8 with the KV
cache, and sub-pixels/s of the uncached reference (a full causal forward per token),
measured over the first `--recompute-steps` tokens and extrapolated to the whole image
(the uncached cost grows with position, so the extrapolation integrates the measured
per-step cost linearly: it is a lower bound on the real uncached time).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from model import ModelConfig, PromptPix
from model.network import START
from model.sampling import _recompute
from model.tokenizers import build_tokenizer

PROMPT = "a large red circle in the top left on a white background"


def build(size: int) -> PromptPix:
    tok = build_tokenizer("word", [PROMPT], vocab_size=1000)
    cfg = ModelConfig(image_size=size, channels=3, vocab_size=len(tok), max_text_length=64)
    torch.manual_seed(0)
    return PromptPix(cfg, tok).eval()


def time_cached(model: PromptPix, batch: int) -> float:
    t0 = time.perf_counter()
    model.generate([PROMPT], num_images=batch, seed=0)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_recompute(model: PromptPix, steps: int) -> tuple[float, float]:
    """(seconds for `steps` uncached tokens from position 0, extrapolated seconds per image)."""
    ids, mask = model.tokenize([PROMPT])
    cond, text = model._condition(ids, mask, None)
    T = model.config.seq_len
    tokens = torch.zeros(1, T, dtype=torch.long)
    t0 = time.perf_counter()
    for t in range(steps):
        _recompute(model, tokens, t, cond, text, guided=False)
    measured = time.perf_counter() - t0
    # Cost per step is ~ a + b*t; fit from the two halves, integrate over the image.
    half = steps // 2
    t1 = time.perf_counter()
    for t in range(steps - half, steps):
        _recompute(model, tokens, t, cond, text, guided=False)
    late = (time.perf_counter() - t1) / half  # mean cost around position 3/4 * steps
    early = (measured - late * half) / (steps - half)  # mean cost around 1/4 * steps
    b = (late - early) / (steps / 2)
    a = early - b * steps / 4
    total = a * T + b * T * T / 2
    return measured, max(total, measured)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--recompute-steps", type=int, default=300)
    p.add_argument("--write", type=Path, default=None, help="append the table to this file")
    args = p.parse_args(argv)
    assert START == 256
    torch.set_num_threads(os.cpu_count() or 1)
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "| size | params | cached b=1 s/img | cached b=8 s/img | cached b=1 subpx/s "
        "| recompute subpx/s (first N) | recompute s/img (extrap.) | cached/recompute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for size in args.sizes:
        model = build(size)
        T = model.config.seq_len
        model.generate([PROMPT], num_images=1, seed=0) if size <= 8 else None
        b1 = time_cached(model, 1)
        b8 = time_cached(model, 8) / 8
        steps = min(args.recompute_steps, T)
        measured, extrap = time_recompute(model, steps)
        row = (
            f"| {size}x{size}x3 | {model.num_parameters() / 1e6:.2f}M | {b1:.2f} | {b8:.2f} "
            f"| {T / b1:,.0f} | {steps / measured:,.0f} (N={steps}) | {extrap:,.0f} "
            f"| {extrap / b1:,.0f}x |"
        )
        print(row, flush=True)
        lines.append(row)
    if args.write:
        cmd = "python bench/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.write, "a") as f:
            f.write(f"\n### Sampling (`{cmd.strip()}`), {time.strftime('%Y-%m-%d')}\n\n")
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
