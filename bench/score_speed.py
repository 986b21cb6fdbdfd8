"""Scoring vs generating, side by side in one run (issue 16, "Speed").

Times what a score job computes for 1 image x 8 captions (the 8 captions and the empty
prompt in one batch: `worker.scoring.log_probs`) against generating one image of the same
size (`model.generate`, KV cache, batch 1), for a model of the demo's shape (hidden 128,
4 layers, word tokenizer) at 16x16 and 32x32. Speed does not depend on the weights, so the
model is untrained. Median of --repeats runs each; the 64 MB copy bandwidth is printed
beside the ratios, as absolute times on a shared machine are unstable.

    python -m bench.score_speed [--sizes 16 32] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.sampling import copy_bandwidth
from model import ModelConfig, PromptPix
from model.tokenizers import build_tokenizer
from worker.scoring import log_probs

CAPTIONS = [f"a large {c} circle in the top left on a white background"
            for c in ("red", "blue", "green", "yellow", "purple", "orange", "black", "grey")]


def build(size: int, device: str) -> PromptPix:
    """An untrained model of the demo's shape at `size` x `size`."""
    tok = build_tokenizer("word", CAPTIONS, vocab_size=1000)
    cfg = ModelConfig(image_size=size, channels=3, hidden_dim=128, num_layers=4, num_heads=4,
                      text_embed_dim=128, num_text_layers=2, text_nhead=4,
                      max_text_length=32, vocab_size=len(tok))
    return PromptPix(cfg, tokenizer=tok).to(device).eval()


def median_s(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size: int, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of (scoring 1 image x 8 captions, generating 1 image)."""
    m = build(size, device)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    captions = [*CAPTIONS, ""]
    with torch.inference_mode():
        log_probs(m, image, captions, None)  # warm-up
        m.generate([CAPTIONS[0]], seed=0, guidance_scale=1.0)
        score = median_s(lambda: log_probs(m, image, captions, None), repeats)
        gen = median_s(lambda: m.generate([CAPTIONS[0]], seed=0, guidance_scale=1.0), repeats)
    return score, gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"64 MB copy {copy_bandwidth():.1f} GB/s (before); torch threads "
          f"{torch.get_num_threads()}")
    for size in args.sizes:
        score, gen = measure(size, args.device, args.repeats)
        print(f"{size}x{size}: score 1 image x 8 captions (+ empty prompt) {score * 1e3:.0f} ms; "
              f"generate 1 image {gen * 1e3:.0f} ms; generate/score = {gen / score:.1f}x")
    print(f"64 MB copy {copy_bandwidth():.1f} GB/s (after)")


if __name__ == "__main__":
    main()
