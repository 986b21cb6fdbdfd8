from __future__ import annotations

import pytest
import torch

from model import ModelConfig, PromptPix
from model.tokenizers import build_tokenizer

CAPTIONS = [
    "a large red circle in the top left on a white background",
    "a small blue square in the center on a black background",
    "green triangle, large, bottom right, gray background",
    "a yellow circle on white, small, top right",
]


def tiny_config(**overrides: object) -> ModelConfig:
    base = dict(
        image_size=4,
        channels=3,
        hidden_dim=32,
        num_layers=2,
        num_heads=4,
        text_embed_dim=24,
        num_text_layers=2,
        text_nhead=2,
        max_text_length=24,
        vocab_size=64,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def scrambled(model: PromptPix, std: float = 0.3) -> PromptPix:
    """Random weights everywhere (gates open, prior non-zero) so every path carries signal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


@pytest.fixture
def tokenizer():
    return build_tokenizer("word", CAPTIONS, vocab_size=64)


@pytest.fixture
def make_model(tokenizer):
    def make(**overrides: object) -> PromptPix:
        torch.manual_seed(0)
        cfg = tiny_config(**overrides)
        return PromptPix(cfg, tokenizer if cfg.use_text else None)

    return make
