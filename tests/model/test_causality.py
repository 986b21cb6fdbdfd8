"""Exact causality: no sub-pixel at or after t can move the logits of position t."""

from __future__ import annotations

import pytest
import torch

from .conftest import CAPTIONS, scrambled

VARIANTS = {
    "rgb_text_prior": dict(),
    "grey_text": dict(channels=1, use_frequency_prior=False),
    "rgb_classes_text": dict(num_classes=5),
    "no_text_classes": dict(use_text=False, num_classes=5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_subpixels_never_change_past_logits(make_model, variant):
    model = scrambled(make_model(**VARIANTS[variant]))
    c = model.config
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(
        0, 256, (2, c.channels, c.image_size, c.image_size), generator=gen, dtype=torch.uint8
    )
    prompts = CAPTIONS[:2]
    labels = [1, 3] if c.num_classes else None
    with torch.no_grad():
        base = model.forward_logits(images, prompts, labels)  # (B, T, 256)
        T = c.seq_len
        flat = images.permute(0, 2, 3, 1).reshape(2, T)  # raster order (row, col, channel)
        for t in range(T):
            changed = flat.clone()
            # Replace the target itself and everything after it (later channels of the
            # same pixel, later pixels) with different values.
            changed[:, t:] = (
                changed[:, t:].int()
                + 1
                + torch.randint(0, 254, changed[:, t:].shape, generator=gen)
            ) % 256
            imgs = changed.view(2, c.image_size, c.image_size, c.channels).permute(0, 3, 1, 2)
            out = model.forward_logits(imgs.contiguous(), prompts, labels)
            diff = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            assert diff <= 1e-6, f"position <= {t} moved by {diff} when tokens >= {t} changed"
            if t + 1 < T:
                # ...while the very next position does see token t.
                assert (out[:, t + 1] - base[:, t + 1]).abs().max().item() > 1e-4


def test_earlier_subpixel_changes_later_logits(make_model):
    model = scrambled(make_model())
    c = model.config
    images = torch.randint(0, 256, (1, 3, c.image_size, c.image_size), dtype=torch.uint8)
    with torch.no_grad():
        base = model.forward_logits(images, CAPTIONS[:1])
        changed = images.clone()
        changed[0, 0, 0, 0] = (int(changed[0, 0, 0, 0]) + 128) % 256  # token 0
        out = model.forward_logits(changed, CAPTIONS[:1])
    assert (out[:, 0] - base[:, 0]).abs().max() == 0  # position 0 predicts token 0: blind to it
    assert (out[:, 1:] - base[:, 1:]).abs().amax(-1).min() > 1e-5  # every later position sees it


def test_channel_head_is_causal_within_a_pixel(make_model):
    """Inside pixel p: R sees neither G nor B of p; G moves with R of p, not with B of p;
    B moves with R and G of p; every channel moves with the pixel before."""
    model = scrambled(make_model())
    c = model.config
    C, P = c.channels, c.image_size * c.image_size
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (1, C, c.image_size, c.image_size), generator=gen,
                           dtype=torch.uint8)
    p = 5  # pixel (1, 1)
    y, x = divmod(p, c.image_size)
    with torch.no_grad():
        base = model.forward_logits(images, CAPTIONS[:1]).view(P, C, 256)

        def moved(ch: int) -> torch.Tensor:
            changed = images.clone()
            changed[0, ch, y, x] = (int(changed[0, ch, y, x]) + 97) % 256
            out = model.forward_logits(changed, CAPTIONS[:1]).view(P, C, 256)
            return (out[p] - base[p]).abs().amax(-1)  # (C,): how far each channel's moved

        r, g, b = moved(0), moved(1), moved(2)
    assert r[0] == 0 and g[0] == 0 and b[0] == 0  # R of p is blind to p's own values
    assert r[1] > 1e-4 and g[1] == 0 and b[1] == 0  # G of p: R of p only
    assert r[2] > 1e-4 and g[2] > 1e-4 and b[2] == 0  # B of p: R and G of p
