"""`ModelConfig`: every shape the network needs, named like the training flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import CheckpointError, PromptPixError

TEXT_ENCODERS = ("scratch", "minilm")
# all-MiniLM-L6-v2's width and position table: a minilm model's text_embed_dim and the
# most tokens a prompt may keep (model/pretrained.py loads the weights).
MINILM_WIDTH = 384
MINILM_MAX_LENGTH = 512


@dataclass
class ModelConfig:
    # Image side: image_size * image_size pixels of `channels` sub-pixels, raster order;
    # the decoder takes one step per pixel, the likelihood is over every sub-pixel.
    image_size: int = 32
    channels: int = 3
    # Decoder (flags: --hidden_dim, --num_layers); num_heads has no flag.
    hidden_dim: int = 256
    num_layers: int = 8
    num_heads: int = 8
    # Multi-query attention by default: one key/value head shared by all query heads keeps
    # the KV cache (and the memory read per sampled token) num_heads times smaller.
    num_kv_heads: int = 1
    mlp_ratio: int = 4
    # Text encoder (flags named as in the original guide).
    use_text: bool = True
    text_encoder: str = "scratch"
    # minilm only: train the pretrained encoder too (its weights then go in the checkpoint).
    finetune_text_encoder: bool = False
    vocab_size: int = 50257
    text_embed_dim: int = 512
    num_text_layers: int = 6
    text_nhead: int = 8
    max_text_length: int = 512
    # Optional class conditioning: 0 = none; else labels 0..num_classes-1 (+1 null slot).
    num_classes: int = 0
    use_frequency_prior: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PromptPixError(f"invalid ModelConfig: {msg}")

        need(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        need(self.image_size >= 2, f"image_size must be >= 2, got {self.image_size}")
        need(self.hidden_dim > 0 and self.num_heads > 0, "hidden_dim and num_heads must be > 0")
        need(
            self.hidden_dim % self.num_heads == 0,
            f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}",
        )
        need(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
        )
        need(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        need(
            self.text_encoder in TEXT_ENCODERS,
            f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}",
        )
        if self.use_text and self.text_encoder == "scratch":
            need(
                self.text_embed_dim % self.text_nhead == 0,
                f"text_embed_dim {self.text_embed_dim} is not divisible by "
                f"text_nhead {self.text_nhead}",
            )
            need(self.max_text_length >= 2, "max_text_length must be >= 2")
            need(self.vocab_size >= 4, "vocab_size must be >= 4")
        if self.use_text and self.text_encoder == "minilm":
            need(
                self.text_embed_dim == MINILM_WIDTH,
                f"text_embed_dim must be {MINILM_WIDTH} (MiniLM's width) for text_encoder "
                f"'minilm', got {self.text_embed_dim}",
            )
            need(
                2 <= self.max_text_length <= MINILM_MAX_LENGTH,
                f"max_text_length must be in 2..{MINILM_MAX_LENGTH} for text_encoder 'minilm', "
                f"got {self.max_text_length}",
            )
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def seq_len(self) -> int:
        """Sub-pixel tokens per image: H * W * C."""
        return self.image_size * self.image_size * self.channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"checkpoint config has unknown fields {unknown}")
        try:
            return cls(**d)
        except (TypeError, PromptPixError) as e:
            raise CheckpointError(f"checkpoint config is invalid: {e}") from e
