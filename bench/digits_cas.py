"""The digits demo measured on the 297 held-out real digits (issues 15 and 16).

- test bits/dim of the checkpoint (caption + class label, and unconditional), beside the
  frequency prior alone (an independent per-pixel model, counted on the training split
  exactly as training starts it) and PNG's lossless size of the same 297 images tiled
  into one 27 x 11 grid (bits per sub-pixel);
- the classification accuracy score (CAS): scikit-learn logistic regression on raw pixels
  trained on `--per_class` generated digits of each class (caption "a handwritten digit
  n" + class label n, image k seeded k) and tested on the held-out digits, beside the same
  classifier trained on the 1,500 real training digits (train + val splits);
- zero-shot classification by captions: each held-out digit scored under the 10 captions
  with the exact likelihood (worker.scoring.log_probs, as bench/zero_shot.py does), the
  caption with the fewest bits wins; with each caption's class label, and by the caption
  alone.

    python -m bench.digits_cas checkpoints/demo/digits8.pth [--guidance_scale 1 1.5]
"""

from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
import torch
from PIL import Image

from model import bits_per_dim, load_checkpoint
from model.prior import count_frequency_prior, image_tokens
from training.datasets.digits import DigitsDataset
from training.evaluate import fit_classifier, pixel_features
from training.images import make_grid, to_pil
from worker.scoring import log_probs

CAPTIONS = [f"a handwritten digit {n}" for n in range(10)]
GRID_COLUMNS = 27  # 297 digits = 11 rows of 27


def split(name: str) -> tuple[torch.Tensor, np.ndarray]:
    """The digits of one split as uint8 [N, 1, 8, 8] and their labels."""
    ds = DigitsDataset(8, name)
    return torch.from_numpy(ds.images[:, None].copy()), ds.labels.copy()


def png_bits_per_dim(images: torch.Tensor) -> float:
    """Bits per sub-pixel of the images tiled into one grey grid (no padding), PNG at its
    best setting."""
    buf = io.BytesIO()
    to_pil(make_grid(images, nrow=GRID_COLUMNS, pad=0)).save(buf, format="PNG", optimize=True)
    return 8 * len(buf.getvalue()) / images.numel()


def prior_bits_per_dim(train: torch.Tensor, test: torch.Tensor, smoothing: float = 1.0
                       ) -> float:
    """Test bits/dim under the counted frequency prior of the training images alone
    (smoothing 1: as training starts the model's prior)."""
    lp = count_frequency_prior([train], image_size=8, channels=1,
                               smoothing=smoothing).double()  # (64, 256)
    tok = image_tokens(test)  # (N, 64)
    return float(-lp.gather(1, tok.T).T.mean() / math.log(2))


@torch.no_grad()
def model_bits_per_dim(model: torch.nn.Module, test: torch.Tensor, labels: np.ndarray,
                       conditional: bool) -> float:
    prompts = [CAPTIONS[int(n)] if conditional else "" for n in labels]
    cls = [int(n) if conditional else -1 for n in labels]
    bpd = [bits_per_dim(model.forward_logits(test[a:a + 100], prompts[a:a + 100],
                                             cls[a:a + 100]), test[a:a + 100])
           for a in range(0, len(test), 100)]
    return float(torch.cat(bpd).mean())


def generated(model: torch.nn.Module, labels: np.ndarray, scale: float,
              with_labels: bool) -> torch.Tensor:
    """One digit per label from its caption (and the label itself when `with_labels`),
    image k seeded k."""
    images = []
    for a in range(0, len(labels), 100):
        part = [int(n) for n in labels[a:a + 100]]
        images.append(model.generate([CAPTIONS[n] for n in part],
                                     class_labels=part if with_labels else None,
                                     guidance_scale=scale, seed=list(range(a, a + len(part)))))
    return torch.cat(images)


def zero_shot(model: torch.nn.Module, test: torch.Tensor, labels: np.ndarray,
              with_labels: bool) -> float:
    """Share of test digits whose lowest-bits caption (of the 10) names their class."""
    right = 0
    for x, y in zip(test, labels, strict=True):
        lp = log_probs(model, x, CAPTIONS, list(range(10)) if with_labels else None)
        right += int(lp.double().sum(1).argmax()) == int(y)
    return right / len(test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--per_class", type=int, default=100, help="generated digits per class")
    p.add_argument("--guidance_scale", type=float, nargs="+", default=[1.0])
    p.add_argument("--samples_png", default=None,
                   help="also write a grid of samples here (10 rows, 8 seeds, 8x nearest)")
    args = p.parse_args()
    t0 = time.time()
    model, meta = load_checkpoint(args.checkpoint, map_location="cpu")
    model.eval()
    test, test_y = split("test")
    train, train_y = split("train")
    val, val_y = split("val")
    real = torch.cat([train, val]), np.concatenate([train_y, val_y])  # the first 1,500

    def accuracy(images: torch.Tensor, y: np.ndarray) -> float:
        clf = fit_classifier(images, y)
        return float((clf.predict(pixel_features(test)) == test_y).mean())

    print(f"{args.checkpoint} (step {meta.get('steps')}): {len(test)} held-out test digits")
    print("bits/dim on the test digits:")
    print(f"  model, caption + class label   {model_bits_per_dim(model, test, test_y, True):.4f}")
    print(f"  model, unconditional           {model_bits_per_dim(model, test, test_y, False):.4f}")
    print(f"  frequency prior alone          {prior_bits_per_dim(train, test):.4f}")
    print(f"    ... smoothing 0.01           {prior_bits_per_dim(train, test, 0.01):.4f}")
    print(f"  PNG, one {GRID_COLUMNS}-column grid       {png_bits_per_dim(test):.4f}")
    real_acc = accuracy(*real)
    print(f"logistic regression, {len(real[1])} real training digits: test accuracy "
          f"{100 * real_acc:.1f} %")
    labels = np.repeat(np.arange(10), args.per_class)
    for with_labels in (True, False):
        how = "caption + class label" if with_labels else "caption alone"
        for g in args.guidance_scale:
            cas = accuracy(generated(model, labels, g, with_labels), labels)
            print(f"CAS, {len(labels)} generated digits ({how}), guidance {g:g}: "
                  f"{100 * cas:.1f} % ({100 * cas / real_acc:.1f} % of real)")
    for with_labels in (True, False):
        how = "caption + its class label" if with_labels else "caption alone"
        acc = zero_shot(model, test, test_y, with_labels)
        print(f"zero-shot by captions ({how}): {100 * acc:.1f} %")
    if args.samples_png:
        seeds = np.repeat(np.arange(10), 8)  # 8 seeds a row, one row per digit
        grid = make_grid(generated(model, seeds, args.guidance_scale[0], with_labels=False),
                         nrow=8, pad=1, pad_value=128)
        image = to_pil(grid)
        image.resize((image.width * 8, image.height * 8), Image.NEAREST).save(args.samples_png)
        print(f"wrote {args.samples_png}: rows 0-9, seeds 0-79, captions alone, guidance "
              f"{args.guidance_scale[0]:g}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
