"""Training speed with each text encoder, measured side by side in one process.

    python bench/text_encoders.py [--steps 40] [--image_size 16] [--batch_size 16]

Runs the real Trainer on `shapes` for `--steps` steps with the scratch word encoder
(the seed's default shape, 6 layers x 512), frozen MiniLM with its caption cache, and
frozen MiniLM without it; prints the median steps/s of each (from the training log, so
validation and checkpoint writes are not counted) and their ratios to scratch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from training.config import parse_train_args
from training.distributed import DistInfo
from training.metrics_log import read_log
from training.trainer import Trainer

RUNS = {
    "scratch (word, 6x512)": [],
    "minilm frozen, cached": ["--text_encoder", "minilm"],
    "minilm frozen, no cache": ["--text_encoder", "minilm", "--text_cache_size", "0"],
}


def run(flags: list[str], args: argparse.Namespace, ck: Path) -> dict[str, float]:
    cfg = parse_train_args([
        "--dataset", "shapes", "--image_size", str(args.image_size), "--shapes_train_size",
        "5000", "--batch_size", str(args.batch_size), "--hidden_dim", str(args.hidden_dim),
        "--num_layers", str(args.num_layers), "--num_workers", "0", "--max_steps",
        str(args.steps), "--eval_every", str(args.steps), "--val_samples", "32",
        "--prior_samples", "256", "--num_sample_images", "1", "--tensorboard", "false",
        "--max_text_length", "64", "--checkpoint_dir", str(ck), *flags])
    t = Trainer(cfg, DistInfo())
    t.fit()
    tps = [r["tokens_per_s"] for r in read_log(ck / "train_log.jsonl") if r["kind"] == "train"]
    tps = tps[3:]  # the first steps warm up allocators and the cache
    tokens_per_step = args.batch_size * t.mcfg.seq_len
    out = {"steps_per_s": statistics.median(tps) / tokens_per_step,
           "trained_params_M": sum(p.numel() for p in t.model.parameters()
                                   if p.requires_grad) / 1e6}
    if t.text_cache is not None:
        out["cache_hit_rate"] = t.text_cache.cache_hits / max(
            1, t.text_cache.cache_hits + t.text_cache.cache_misses)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"shapes {args.image_size}x{args.image_size}, batch {args.batch_size}, decoder "
          f"{args.num_layers}x{args.hidden_dim}, {args.steps} steps each")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(RUNS.items()):
            results[name] = run(flags, args, Path(tmp) / str(i))
    base = results["scratch (word, 6x512)"]["steps_per_s"]
    for name, r in results.items():
        extra = f", cache hits {r['cache_hit_rate']:.0%}" if "cache_hit_rate" in r else ""
        print(f"{name:26s} {r['steps_per_s']:7.2f} steps/s  ({r['steps_per_s'] / base:.2f}x "
              f"scratch), {r['trained_params_M']:.2f}M trained{extra}")


if __name__ == "__main__":
    main()
