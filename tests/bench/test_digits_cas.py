"""bench/digits_cas.py's reference figures: PNG size, the frequency prior alone, zero-shot."""

from __future__ import annotations

import torch

from bench.digits_cas import png_bits_per_dim, prior_bits_per_dim, split, zero_shot
from model import load_checkpoint
from tests.training.test_digits_demo import DIGITS8


def test_png_and_prior_figures_are_bits_per_sub_pixel() -> None:
    test, _ = split("test")
    train, _ = split("train")
    assert test.shape == (297, 1, 8, 8)
    assert png_bits_per_dim(torch.zeros_like(test)) < 0.1  # one flat grid costs nothing
    real = png_bits_per_dim(test)
    assert 1.0 < real < 8.0
    prior = prior_bits_per_dim(train, test)
    assert 1.0 < prior < real  # the per-pixel model beats PNG on these digits
    # Counted on the very digits it scores, a lightly smoothed prior fits them best.
    assert prior_bits_per_dim(test, test, 0.01) < prior_bits_per_dim(train, test, 0.01)


def test_zero_shot_by_captions_reads_held_out_digits() -> None:
    model, _ = load_checkpoint(DIGITS8)
    test, labels = split("test")
    assert zero_shot(model, test[:30], labels[:30], with_labels=False) >= 0.8  # 93.6 % on 297
