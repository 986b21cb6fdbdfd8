"""The shipped `checkpoints/demo/digits8.pth` (docs/models.md, "digits8")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import FORMAT_VERSION, load_checkpoint
from training.datasets import build_dataset
from training.evaluate import fit_classifier, pixel_features

DIGITS8 = Path(__file__).resolve().parents[2] / "checkpoints" / "demo" / "digits8.pth"
# docs/models.md: samples from captions alone train a classifier to 97.4 % of the real-data
# accuracy (CAS), and the real-data classifier reads 20 of these 20 right; asserted with a
# margin (the first, label-only run drew the named digit for 4 of 40).
MIN_RIGHT = 15  # of 20


def test_shipped_digits8_draws_the_digit_its_prompt_names(one_thread: None) -> None:
    """From captions alone (no class label: what the web page and the CLI send)."""
    model, meta = load_checkpoint(DIGITS8)
    assert meta["format_version"] == FORMAT_VERSION and meta["dataset"] == "digits"
    assert (model.config.image_size, model.config.channels) == (8, 1)
    labels = [n % 10 for n in range(20)]
    images = model.generate([f"a handwritten digit {n}" for n in labels], seed=list(range(20)))
    assert images.shape == (20, 1, 8, 8) and images.dtype == torch.uint8
    train = build_dataset("digits", None, 8)
    clf = fit_classifier(torch.from_numpy(train.images[:, None].copy()), train.labels)
    read = clf.predict(pixel_features(images))
    assert int((read == np.array(labels)).sum()) >= MIN_RIGHT, read
