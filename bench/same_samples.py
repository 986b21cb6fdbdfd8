"""Seeded samples of this tree against a git ref's, bit for bit (a check for sampler speed work).

    OMP_NUM_THREADS=1 python bench/same_samples.py [--base-ref main]

Both `model` packages (the ref's read with `git archive`, as in `bench/sampling.py`) build
the same small model (8x8 RGB, frequency prior on, with and without classes) with the same
scrambled weights, then sample the same requests: default sampling, guidance with
temperature and top-p, top-k with per-image seeds, a negative prompt, completion under
guidance, the uncached reference, a mixed three-request `generate_batch`, and the
static-shape step (`StaticDecoder(mode=None)`) with a completion request in its batch.
Every image and every bits figure must be equal (`torch.equal`); exit status 1 if not.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as this_model
from bench.sampling import PROMPT, load_ref
from model.tokenizers import build_tokenizer

CAPTIONS = [PROMPT, "a small blue square", "a green triangle in the middle"]
TOKENIZER = build_tokenizer("word", CAPTIONS, vocab_size=100)


def small_model(pkg: ModuleType, classes: int) -> Any:
    cfg = pkg.ModelConfig(image_size=8, channels=3, vocab_size=len(TOKENIZER),
                          max_text_length=16, hidden_dim=64, num_heads=4, num_layers=2,
                          text_embed_dim=64, num_text_layers=1, text_nhead=4,
                          num_classes=classes)
    m = pkg.PromptPix(cfg, TOKENIZER).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m


def prefix() -> torch.Tensor:
    return torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(9))


CASES: list[dict[str, Any]] = [
    {},
    {"guidance_scale": 2.5, "temperature": 0.9, "top_p": 0.95, "num_images": 2},
    {"top_k": 5, "temperature": 1.3, "seed": [5, 6]},
    {"guidance_scale": 1.7, "negative_prompt": CAPTIONS[1], "top_k": 20},
    {"prefix": True, "keep_rows": 3, "guidance_scale": 2.0},
    {"use_cache": False, "guidance_scale": 2.0, "top_p": 0.8},
]


def samples(pkg: ModuleType, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, bits) of every case, then of every request of the two batched runs."""
    m = small_model(pkg, classes)
    labels = {"class_labels": [1, 2]} if classes else {}
    out = []
    for case in CASES:
        kw = {"seed": 3, **case}
        if kw.get("prefix"):
            kw["prefix"] = prefix()
        out.append(m.generate(CAPTIONS[:2], return_bits=True, **labels, **kw))
    sampling = importlib.import_module(pkg.__name__ + ".sampling")
    compile_ = importlib.import_module(pkg.__name__ + ".compile")
    Req = pkg.SampleRequest
    mixed = [Req(CAPTIONS[:1], 2, seed=[1, 2], guidance_scale=2.0, top_k=7),
             Req(CAPTIONS[1:3], 1, seed=4, temperature=0.7,
                 class_labels=[0, 2] if classes else None),
             Req(CAPTIONS[2:3], 1, seed=8, top_p=0.9, guidance_scale=1.5)]
    static = [Req(CAPTIONS[:1], 2, seed=[1, 2], guidance_scale=2.0, top_k=7),
              Req(CAPTIONS[1:3], 1, seed=4, temperature=0.7, prefix=prefix(), keep_rows=2)]
    for reqs, decoder in ((mixed, None), (static, compile_.StaticDecoder(m, None))):
        got = sampling.generate_batch(m, reqs, decoder=decoder)
        out += list(zip(got, got.bits, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-ref", default="main")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    base = load_ref(args.base_ref, Path(tmp.name), "model_base")
    names = [f"case {i}: {c}" for i, c in enumerate(CASES)] + \
        [f"generate_batch request {j}" for j in range(3)] + \
        [f"static step request {j}" for j in range(2)]
    differ = 0
    for classes in (0, 3):
        mine, theirs = samples(this_model, classes), samples(base, classes)
        for name, (ia, ba), (ib, bb) in zip(names, mine, theirs, strict=True):
            same = torch.equal(ia, ib) and torch.equal(ba, bb)
            differ += not same
            print(f"{'same' if same else 'DIFFERENT'}  classes={classes}  {name}")
    print(f"{differ} of {2 * len(names)} differ from {args.base_ref}" if differ else
          f"all {2 * len(names)} identical to {args.base_ref} (images and bits)")
    tmp.cleanup()
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
