"""`promptpix eval`: validation bits/dim, and whether generated images follow their prompt.

- every dataset: bits/dim of the checkpoint on (the first `--val_samples` of) the val split;
- `shapes`: fresh prompts drawn from the grammar (large shapes by default), generated, read
  back by `training.datasets.shapes.analyse`; colour / shape / position match rates;
  `--prompts paraphrase` restates the same facts in words no training caption contains
  (`training.paraphrase`), `--prompts both` measures the two sets pair by pair;
- labelled datasets (`digits`, `cifar100`, ...): the classification accuracy score, a small
  classifier trained on real training images applied to generated images of each class.
Prints a table per guidance scale and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .progress import track

log = logging.getLogger(__name__)

ALIGN_KEYS = ("colour", "shape", "position", "size", "background")


def _float_ge1(text: str) -> float:
    v = float(text)
    if not (v >= 1 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be >= 1 (1: no guidance), got {text}")
    return v


def _int_ge(lo: int):
    def parse(text: str) -> int:
        v = int(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptpix eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pth)")
    p.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--data_root", default="./data", help="dataset folder")
    p.add_argument("--val_samples", type=_int_ge(0), default=1000,
                   help="validation images for bits/dim (0: skip)")
    p.add_argument("--num_samples", type=_int_ge(0), default=200,
                   help="generated images per guidance scale (0: skip alignment)")
    p.add_argument("--guidance_scale", type=_float_ge1, nargs="+", default=None,
                   help="one or more guidance scales (default: the checkpoint's)")
    p.add_argument("--sizes", choices=("large", "small", "any"), default="large",
                   help="shapes: size of the shapes in the prompts")
    p.add_argument("--prompts", choices=("grammar", "paraphrase", "both"), default="grammar",
                   help="shapes: prompts from the grammar, paraphrases in unseen words "
                        "(same facts, same seeds), or both")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=_int_ge(0), default=0, help="top-k filter (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1: off)")
    p.add_argument("--batch_size", type=_int_ge(1), default=32, help="images per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--set_default_guidance", action="store_true",
                   help="shapes: write the guidance scale with the best colour+shape+position "
                        "match into the checkpoint as its default")
    p.add_argument("--output", default=None,
                   help="JSON path (default: eval_<dataset>.json beside the checkpoint)")
    return p


@torch.no_grad()
def validation_bpd(model: Any, ds: Any, n: int, batch_size: int) -> float:
    """Mean bits/dim over the first `n` validation images (their captions / labels)."""
    from model import bits_per_dim

    from .data import collate

    n = min(n, len(ds))
    total, count = 0.0, 0
    starts = range(0, n, batch_size)
    for start in track(starts, len(starts), "val bits/dim", "batch"):
        stop = min(n, start + batch_size)
        images, captions, labels = collate([ds[i] for i in range(start, stop)])
        ids, mask = model.tokenize(captions)
        cls = labels.to(model.device) if model.config.num_classes else None
        logits = model(images.to(model.device), ids, mask, cls)
        total += float(bits_per_dim(logits, images).sum())
        count += len(images)
    return total / max(count, 1)


def _generate(model: Any, prompts: list[str], labels: list[int] | None, scale: float,
              args: argparse.Namespace) -> torch.Tensor:
    """One image per prompt, image i seeded with seed + i: uint8 [N, C, H, W]."""
    out = []
    starts = range(0, len(prompts), args.batch_size)
    for s in track(starts, len(starts), f"sampling g={scale:g}", "batch"):
        e = min(len(prompts), s + args.batch_size)
        out.append(model.generate(prompts[s:e], num_images=1,
                                  class_labels=None if labels is None else labels[s:e],
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, guidance_scale=scale,
                                  seed=[args.seed + i for i in range(s, e)]))
    return torch.cat(out)


def shapes_prompts(n: int, sizes: str, seed: int) -> list[str]:
    """Fresh prompts from the grammar, caption forms in the training proportions."""
    from training.datasets import shapes as S

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        size = rng.choice(S.SIZES) if sizes == "any" else sizes
        form = 0 if rng.random() >= S.PARAPHRASE_PROB else rng.choice((1, 2))
        prompts.append(S.make_prompt(rng.choice(S.COLOURS), rng.choice(S.SHAPES),
                                     rng.choice(S.POSITIONS), size, rng.choice(S.BACKGROUNDS),
                                     form=form))
    return prompts


def shapes_alignment(model: Any, scale: float, args: argparse.Namespace,
                     prompt_set: str = "grammar") -> dict[str, Any]:
    """Share of generated images whose analysed facts match their prompt's, per fact.

    `paraphrase` words the same facts anew; image i keeps seed + i in both sets.
    """
    from training.datasets.shapes import analyse, parse_caption

    grammar = shapes_prompts(args.num_samples, args.sizes, args.seed)
    prompts = grammar
    if prompt_set == "paraphrase":
        from .paraphrase import paraphrase_prompts

        prompts = paraphrase_prompts(grammar, args.seed)
    images = _generate(model, prompts, None, scale, args)
    hits = dict.fromkeys(ALIGN_KEYS, 0)
    all3 = 0
    for prompt, img in zip(grammar, images, strict=True):
        want, got = parse_caption(prompt), analyse(img.cpu())
        ok = {k: want[k] == got[k] for k in ALIGN_KEYS}
        for k in ALIGN_KEYS:
            hits[k] += ok[k]
        all3 += ok["colour"] and ok["shape"] and ok["position"]
    n = len(prompts)
    return {**{k: hits[k] / n for k in ALIGN_KEYS}, "colour+shape+position": all3 / n, "n": n,
            "example_prompts": prompts[:3]}


def pixel_features(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] -> float [N, C*H*W] in [0, 1], the classifier's input."""
    return images.reshape(len(images), -1).float().numpy() / 255.0


def fit_classifier(images: torch.Tensor, labels: np.ndarray | torch.Tensor) -> Any:
    """scikit-learn logistic regression on raw pixels (the CAS classifier)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(pixel_features(images), np.asarray(labels))


def train_classifier(train_ds: Any, val_ds: Any, limit: int = 5000) -> tuple[Any, float]:
    """Logistic regression on real training pixels; returns it and its real val accuracy."""
    from .data import collate

    def load(ds: Any, n: int) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.random.default_rng(0).permutation(len(ds))[: min(n, len(ds))]
        images, _, labels = collate([ds[int(i)] for i in idx])
        return images, labels.numpy()

    clf = fit_classifier(*load(train_ds, limit))
    xv, yv = load(val_ds, limit)
    return clf, float((clf.predict(pixel_features(xv)) == yv).mean())


def class_prompts(ds: Any, n: int) -> tuple[list[str], list[int]]:
    """`n` (caption, label) pairs cycling over the classes; a real caption of each class."""
    caption_of: dict[int, str] = {}
    for i in range(len(ds)):
        _, cap, lab = ds[i]
        caption_of.setdefault(int(lab), cap)
        if len(caption_of) == ds.num_classes:
            break
    classes = sorted(caption_of)
    labels = [classes[i % len(classes)] for i in range(n)]
    return [caption_of[c] for c in labels], labels


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from model import PromptPixError, load_checkpoint
    from model.checkpoint import update_checkpoint_meta

    from .distributed import resolve_device

    t0 = time.time()
    try:
        model, meta = load_checkpoint(args.checkpoint, map_location="cpu")
        model.to(resolve_device(args.device)).eval()
        dataset = args.dataset or meta.get("dataset") or "shapes"
        size = model.config.image_size
        from training.datasets import build_dataset

        train_args = meta.get("train_args") or {}
        # The run's holdout, so a one-split dataset is evaluated on the images it held out.
        opts = {"shapes_train_size": int(train_args.get("shapes_train_size", 50000)),
                "val_fraction": float(train_args.get("val_fraction", 0.05))}
        val_ds = build_dataset(dataset, args.data_root, size, split="val", **opts)
        scales = args.guidance_scale or [float(meta.get("default_guidance_scale") or 1.0)]
        result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "dataset": dataset,
                                  "model_id": meta.get("model_id"), "steps": meta.get("steps"),
                                  "image_size": size, "seed": args.seed,
                                  "num_samples": args.num_samples}
        if args.val_samples:
            result["val_bpd"] = validation_bpd(model, val_ds, args.val_samples, args.batch_size)
            result["val_images"] = min(args.val_samples, len(val_ds))
        rows: dict[str, dict[str, Any]] = {}
        if args.num_samples and dataset == "shapes":
            result["sizes"] = args.sizes
            sets = ["grammar", "paraphrase"] if args.prompts == "both" else [args.prompts]
            result["prompts"] = args.prompts
            result["by_prompt_set"] = {
                name: {f"{g:g}": shapes_alignment(model, g, args, name) for g in scales}
                for name in sets}
            rows = result["by_prompt_set"][sets[0]]
        elif args.num_samples and getattr(val_ds, "num_classes", 0):
            train_ds = build_dataset(dataset, args.data_root, size, split="train", **opts)
            clf, real_acc = train_classifier(train_ds, val_ds)
            result["classifier_real_val_accuracy"] = real_acc
            prompts, labels = class_prompts(train_ds, args.num_samples)
            cls = labels if model.config.num_classes else None
            for g in scales:
                images = _generate(model, prompts, cls, g, args)
                acc = float((clf.predict(pixel_features(images)) == np.array(labels)).mean())
                rows[f"{g:g}"] = {"classification_accuracy_score": acc, "n": len(labels)}
        result["by_guidance_scale"] = rows
        if args.set_default_guidance:
            if not rows or "colour+shape+position" not in next(iter(rows.values())):
                raise ValueError("--set_default_guidance needs a shapes alignment evaluation")
            best = max(rows, key=lambda g: rows[g]["colour+shape+position"])
            update_checkpoint_meta(args.checkpoint, {"default_guidance_scale": float(best)})
            result["default_guidance_scale_set"] = float(best)
            print(f"default guidance scale of {args.checkpoint} set to {best}")
    except (PromptPixError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["seconds"] = round(time.time() - t0, 1)
    _print_table(result)
    out = Path(args.output) if args.output else (
        Path(args.checkpoint).parent / f"eval_{dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"checkpoint {result['checkpoint']}  dataset {result['dataset']}  "
          f"steps {result.get('steps')}")
    if "val_bpd" in result:
        print(f"validation bits/dim: {result['val_bpd']:.4f} ({result['val_images']} images)")
    if "classifier_real_val_accuracy" in result:
        print(f"classifier accuracy on real val images: "
              f"{result['classifier_real_val_accuracy']:.3f}")
    sets = result.get("by_prompt_set") or {"": result["by_guidance_scale"]}
    for name, rows in sets.items():
        if not rows:
            continue
        if name:
            print(f"prompts: {name} (e.g. {next(iter(rows.values()))['example_prompts'][0]!r})")
        cols = [k for k, v in next(iter(rows.values())).items()
                if k != "n" and isinstance(v, float)]
        print("guidance | " + " | ".join(f"{c:>12}" for c in cols) + " |     n")
        for g, row in rows.items():
            print(f"{g:>8} | " + " | ".join(f"{row[c]:>12.3f}" for c in cols)
                  + f" | {row['n']:>5}")
