"""The frequency prior: smoothed log-frequency of each value, per channel and position.

It is a logit bias indexed only by the *target* position, so it is exactly causal (the
prototype's version convolved the whole image and let a pixel see its own future).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def image_tokens(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> long [B, H*W*C] in raster order (row, column, channel)."""
    B = images.shape[0]
    return images.permute(0, 2, 3, 1).reshape(B, -1).long()


def tokens_to_images(tokens: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """long/uint8 [B, H*W*C] -> uint8 [B, C, H, W]; the inverse of `image_tokens`."""
    B = tokens.shape[0]
    return tokens.view(B, size, size, channels).permute(0, 3, 1, 2).to(torch.uint8).contiguous()


def count_frequency_prior(
    batches: Iterable[torch.Tensor], image_size: int, channels: int, smoothing: float = 1.0
) -> torch.Tensor:
    """Log-probabilities [H*W*C, 256] from one pass over uint8 images ([B,C,H,W] or [C,H,W]).

    Per position, counts are smoothed toward the channel's overall distribution (itself
    add-`smoothing` smoothed), with a pseudo-count of 256 * smoothing: positions seen
    rarely fall back to the channel's histogram instead of to uniform.
    """
    T = image_size * image_size * channels
    counts = torch.zeros(T, 256, dtype=torch.float64)
    rows = torch.arange(T)
    for batch in batches:
        if batch.dim() == 3:
            batch = batch.unsqueeze(0)
        if tuple(batch.shape[1:]) != (channels, image_size, image_size):
            raise ValueError(
                f"frequency prior expects images of shape {(channels, image_size, image_size)}, "
                f"got {tuple(batch.shape[1:])}"
            )
        tok = image_tokens(batch)  # (B, T)
        flat = (rows[None, :] * 256 + tok).reshape(-1)  # index into counts.view(-1)
        counts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=counts.dtype))
    n = counts.sum(-1, keepdim=True)  # (T, 1)
    per_channel = counts.view(image_size * image_size, channels, 256).sum(0)  # (C, 256)
    per_channel = (per_channel + smoothing) / (per_channel.sum(-1, keepdim=True) + 256 * smoothing)
    base = per_channel.repeat(image_size * image_size, 1)  # (T, 256), channel of each position
    k = 256.0 * smoothing
    probs = (counts + k * base) / (n + k)
    return probs.log().float()
