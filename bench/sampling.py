"""Sampling and training speed at the default width: per-pixel vs sub-pixel layout.

    python bench/sampling.py [--sizes 32] [--big 64] [--old-ref 5e05fe0] [--base-ref main] \
        [--repeats 3] [--repeats-b8 1] [--recompute-steps 64] [--train-batch 2] \
        [--write docs/benchmarks.md]

Both layouts run side by side in one process: this tree's `model` (one decoder step per
pixel) and, from `--old-ref` (a commit before model v2), the sub-pixel model package, read
with `git archive` into a temporary folder and imported under another name — the old
layout's code lives nowhere in the tree. `--base-ref` adds, the same way, the per-pixel
model of another commit (e.g. `main`) sampled beside this tree's: a before/after of a
change to the sampler, in one run. Default `ModelConfig` (decoder 256 x 8, text
encoder 512 x 6), untrained weights (speed does not depend on them).

Per size: seconds per image at batch 1 and 8 with the KV cache (both layouts), the
per-pixel model's uncached reference (a full forward per pixel, measured over the first
`--recompute-steps` pixels and extrapolated with a linear per-step cost fit: a lower bound)
and training images/s (forward + backward + AdamW at `--train-batch`). `--big` sizes are
sampled at batch 1 with the per-pixel model only (and `--base-ref`'s). Each package first
samples one 8x8 image untimed (allocator and kernel warm-up). Sampling runs `--repeats`
rounds at batch 1 (`--repeats-b8` at batch 8) interleaved across the layouts, the best of
each reported, so a change in the machine's load hits every layout alike. The memory copy
bandwidth of a 64 MB copy is printed beside: absolute CPU figures move with it, ratios hold
better.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import model as new_model
from model.tokenizers import build_tokenizer

PROMPT = "a large red circle in the top left on a white background"


def load_ref(ref: str, into: Path, name: str) -> ModuleType:
    """The model package of commit `ref`, importable as `name`."""
    blob = subprocess.run(["git", "archive", ref, "model"], check=True, capture_output=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout
    folder = into / name
    folder.mkdir()
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "model").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def copy_bandwidth() -> float:
    """GB/s of a 64 MB tensor copy (read + write counted), best of 5."""
    a = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def build(pkg: ModuleType, size: int, **config: Any):
    """The default model at `size` (untrained, seeded); `config`: other `ModelConfig` fields."""
    tok = build_tokenizer("word", [PROMPT], vocab_size=1000)
    cfg = pkg.ModelConfig(image_size=size, channels=3, vocab_size=len(tok), max_text_length=64,
                          **config)
    torch.manual_seed(0)
    return pkg.PromptPix(cfg, tok).eval()


def warm_up(pkg: ModuleType) -> None:
    build(pkg, 8).generate([PROMPT], seed=0)


def time_sampling(m, batch: int) -> float:
    t0 = time.perf_counter()
    m.generate([PROMPT], num_images=batch, seed=0)
    return (time.perf_counter() - t0) / batch


@torch.inference_mode()
def time_recompute(m, steps: int) -> float:
    """Extrapolated seconds per image of the per-pixel model's uncached reference."""
    from model.sampling import _layout, decode_step, prepare_state, row_params

    rows = _layout(m, [new_model.SampleRequest([PROMPT], seed=0)])
    s = prepare_state(m, rows, row_params(rows, m.device), False, torch.float32)
    P = m.num_pixels
    steps = min(steps, P)
    costs = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decode_step(m, s)
        costs.append(time.perf_counter() - t0)
    half = steps // 2
    early = sum(costs[:half]) / half  # mean cost around steps/4
    late = sum(costs[half:]) / (steps - half)  # around 3 steps/4
    b = (late - early) / (steps / 2)
    a = early - b * steps / 4
    return max(a * P + b * P * P / 2, sum(costs))


def time_training(m, batch: int, steps: int) -> float:
    """Training images/s: forward, bits/dim loss, backward, AdamW step."""
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    c = m.config
    images = torch.randint(0, 256, (batch, 3, c.image_size, c.image_size), dtype=torch.uint8)
    ids, mask = m.tokenize([PROMPT] * batch)
    bpd = sys.modules[type(m).__module__.rsplit(".", 1)[0]].bits_per_dim
    for i in range(steps + 1):
        if i == 1:  # the first step warms up allocators and kernels
            t0 = time.perf_counter()
        loss = bpd(m(images, ids, mask), images).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32])
    p.add_argument("--big", type=int, nargs="*", default=[64])
    p.add_argument("--old-ref", default="5e05fe0", help="a commit with the sub-pixel layout")
    p.add_argument("--base-ref", default=None,
                   help="a commit with the per-pixel layout to sample beside this tree's")
    p.add_argument("--recompute-steps", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of batch-1 sampling, interleaved across layouts; best kept")
    p.add_argument("--repeats-b8", type=int, default=1, help="the same for batch 8")
    p.add_argument("--write", type=Path, default=None, help="append the table to this file")
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory()
    old = load_ref(args.old_ref, Path(tmp.name), "model_subpixel")
    layouts = [("per-pixel", new_model), ("sub-pixel", old)]
    base = None
    if args.base_ref:
        base = load_ref(args.base_ref, Path(tmp.name), "model_base")
        layouts.insert(1, (f"per-pixel {args.base_ref}", base))
    for _, pkg in layouts:
        warm_up(pkg)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {threads}, load average {load:.1f}, "
        f"64 MB copy {copy_bandwidth():.1f} GB/s (before)",
        "",
        "| size | layout | decoder steps | params | b=1 s/img | b=8 s/img | train img/s "
        "| recompute s/img (extrap.) | cached/recompute |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    ratios = []
    for size in args.sizes:
        models = {name: build(pkg, size) for name, pkg in layouts}
        # Sampling interleaved across the layouts, `--repeats` rounds, best of each: the
        # machine's load moves between rounds, not within one.
        best: dict[tuple[str, int], float] = {}
        for batch, rounds in ((1, args.repeats), (8, args.repeats_b8)):
            for _ in range(rounds):
                for name, m in models.items():
                    t = time_sampling(m, batch)
                    best[name, batch] = min(best.get((name, batch), t), t)
        got = {}
        for name, pkg in layouts:
            m = models[name]
            steps = size * size * (3 if pkg is old else 1)
            b1, b8 = best[name, 1], best[name, 8]
            # Training runs the same code in both per-pixel trees: timed for this one only.
            train = float("nan") if pkg is base else \
                time_training(m, args.train_batch, args.train_steps)
            rec = ratio = "-"
            if pkg is new_model:
                r = time_recompute(m, args.recompute_steps)
                rec, ratio = f"{r:,.1f}", f"{r / b1:,.0f}x"
            got[name] = (b1, b8, train)
            row = (f"| {size}x{size}x3 | {name} | {steps:,} | {m.num_parameters() / 1e6:.2f}M "
                   f"| {b1:.2f} | {b8:.2f} | {'-' if pkg is base else f'{train:.2f}'} | {rec} "
                   f"| {ratio} |")
            print(row, flush=True)
            lines.append(row)
        n, o = got["per-pixel"], got["sub-pixel"]
        ratios.append(f"{size}x{size}: per-pixel / sub-pixel speed-up: batch 1 "
                      f"{o[0] / n[0]:.2f}x, batch 8 {o[1] / n[1]:.2f}x, training "
                      f"{n[2] / o[2]:.2f}x")
        if args.base_ref:
            b = got[f"per-pixel {args.base_ref}"]
            ratios.append(f"{size}x{size}: this tree / {args.base_ref}: batch 1 "
                          f"{b[0] / n[0]:.2f}x, batch 8 {b[1] / n[1]:.2f}x")
    for size in args.big:
        models = {name: build(pkg, size) for name, pkg in layouts if pkg is not old}
        best = {}
        for _ in range(args.repeats):
            for name, m in models.items():
                t = time_sampling(m, 1)
                best[name, 1] = min(best.get((name, 1), t), t)
        for name, m in models.items():
            row = (f"| {size}x{size}x3 | {name} | {size * size:,} | "
                   f"{m.num_parameters() / 1e6:.2f}M | {best[name, 1]:.2f} | - | - | - | - |")
            print(row, flush=True)
            lines.append(row)
    lines += ["", *ratios, f"64 MB copy {copy_bandwidth():.1f} GB/s (after)"]
    print("\n".join(lines[-len(ratios) - 1:]), flush=True)
    if args.write:
        cmd = "python bench/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.write, "a") as f:
            f.write(f"\n### Per-pixel vs sub-pixel (`{cmd.strip()}`), "
                    f"{time.strftime('%Y-%m-%d %H:%M')}\n\n")
            f.write("\n".join(lines) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
