"""Classifier-free condition dropout (`--cond_drop_prob`) and label-only dropout
(`--label_drop_prob`)."""

from __future__ import annotations

import torch

from training.trainer import drop_conditions

CAPTIONS = [f"a handwritten digit {n % 10}" for n in range(2000)]
LABELS = torch.arange(2000) % 10


def run(p: float, q: float) -> tuple[list[str], torch.Tensor]:
    return drop_conditions(CAPTIONS, LABELS.clone(), p, q, torch.Generator().manual_seed(0))


def test_condition_dropout_drops_caption_and_label_together() -> None:
    captions, labels = run(0.1, 0.0)
    dropped = torch.tensor([c == "" for c in captions])
    assert ((labels == -1) == dropped).all()
    assert 150 < int(dropped.sum()) < 250  # ~10 % of 2,000
    captions, labels = run(0.0, 0.0)
    assert captions == CAPTIONS and (labels == LABELS).all()


def test_label_dropout_keeps_the_caption() -> None:
    captions, labels = run(0.1, 0.5)
    dropped = torch.tensor([c == "" for c in captions])
    caption_only = (labels == -1) & ~dropped
    assert (labels[dropped] == -1).all()  # the unconditional input is untouched
    assert 800 < int(caption_only.sum()) < 1000  # ~0.9 * 0.5 of 2,000
    kept = ~(labels == -1)
    assert (labels[kept] == LABELS[kept]).all()
    # q = 0 draws nothing more: the same generator gives the same caption drops as before.
    assert run(0.1, 0.0)[0] == captions
