"""Images/s with and without batching across jobs, and eager vs compiled decode, on this CPU.

    nice -n 19 python bench/batching.py [--jobs 8] [--compile] [--write docs/benchmarks.md]

A worker with PROMPTPIX_MAX_BATCH=1 samples queued jobs one after another; with
MAX_BATCH >= jobs it samples them as one batch (`model.generate_batch`). Both are
timed here in one process on the same model, each job with its own prompt, parameters
and seeds, so the ratio is what batching buys the sampler (Redis and PNG encoding, the
same either way, are left out). `--compile` adds the static decode step eager and
compiled with `torch.compile` (default mode; CUDA graphs need CUDA), which decides the
worker's CPU fallback. Runs are repeated and the best kept; on a shared machine the
figures are still noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model import ModelConfig, PromptPix, SampleRequest, StaticDecoder, generate_batch
from model.tokenizers import build_tokenizer

PROMPTS = ["a large red circle in the top left on a white background",
           "a small blue square in the center on a black background",
           "green triangle, large, bottom right, gray background",
           "a yellow circle on white, small, top right"]


def build(size: int, hidden: int, layers: int) -> PromptPix:
    tok = build_tokenizer("word", PROMPTS, vocab_size=1000)
    cfg = ModelConfig(image_size=size, channels=3, hidden_dim=hidden, num_layers=layers,
                      text_embed_dim=128, num_text_layers=2, text_nhead=4, max_text_length=32,
                      vocab_size=len(tok))
    torch.manual_seed(0)
    return PromptPix(cfg, tok).eval()


def jobs(n: int) -> list[SampleRequest]:
    """n one-image jobs, as different as users make them (half guided)."""
    return [SampleRequest([PROMPTS[k % 4]], 1, seed=[k], temperature=0.8 + 0.1 * (k % 3),
                          top_k=(0, 20)[k % 2], guidance_scale=(1.0, 2.0)[(k // 2) % 2])
            for k in range(n)]


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time a compiled static step")
    p.add_argument("--write", type=Path, default=None, help="append the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.size, args.hidden, args.layers)
    n = args.jobs
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; model {model.num_parameters() / 1e6:.2f}M "
        f"parameters (hidden {args.hidden}, {args.layers} layers), {args.size}x{args.size}x3; "
        f"{n} one-image jobs, half guided, best of {args.repeats}",
        "| sampler | images | s | images/s | vs one at a time |",
        "|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    generate_batch(model, jobs(2))  # warm-up

    def row(name: str, seconds: float, base: float) -> None:
        lines.append(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.2f} | "
                     f"{base / seconds:.2f}x |")
        print(lines[-1], flush=True)

    one = best_of(args.repeats, lambda: [generate_batch(model, [j]) for j in jobs(n)])
    row("eager, one job at a time (MAX_BATCH=1)", one, one)
    batched = best_of(args.repeats, lambda: generate_batch(model, jobs(n)))
    row(f"eager, one batch of {n} jobs (MAX_BATCH={n})", batched, one)
    if args.compile:
        static = StaticDecoder(model, mode=None)
        row("static step, eager (batch padded to bucket)",
            best_of(args.repeats, lambda: generate_batch(model, jobs(n), decoder=static)), one)
        compiled = StaticDecoder(model, mode="default")
        t0 = time.perf_counter()
        generate_batch(model, jobs(n), decoder=compiled)
        print(f"compile + first batch: {time.perf_counter() - t0:.1f} s", flush=True)
        row("static step, torch.compile default",
            best_of(args.repeats, lambda: generate_batch(model, jobs(n), decoder=compiled)), one)
    if args.write:
        cmd = "python bench/batching.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.write, "a") as f:
            f.write(f"\n## Batching across jobs (`{cmd.strip()}`), {time.strftime('%Y-%m-%d')}"
                    "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
