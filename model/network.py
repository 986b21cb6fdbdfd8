"""The network: a text encoder, an exactly causal decoder over pixels, and a channel head.

The decoder's sequence is the H*W pixels in raster order. Its input at pixel p is the sum
of embeddings of pixel p-1's C values (a start embedding at p = 0), p's row and column
embeddings and the condition vector; causal self-attention means its state at p sees only
pixels < p. The channel head turns that state into p's C sub-pixels one after another:
channel c's logits come from the state, an embedding of c and embeddings of the values of
p's channels < c (teacher-forced in training, the sampled ones when sampling). So the
likelihood is the exact discrete one over every sub-pixel in (row, column, channel)
order, with one decoder step per pixel. Everything on the image side is per position
(LayerNorm, gates, MLP): no future sub-pixel can reach a past logit. Only the text is
seen whole, through cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import PromptPixError
from .layers import DecoderBlock, KVCache, TextEncoder
from .prior import image_tokens
from .tokenizers import Tokenizer

GATE_INIT_BIAS = -2.0  # sigmoid(-2) ~ 0.12: the text gate starts nearly closed


class _Head(NamedTuple):
    """The channel head's tensors as `channel_logits` reads them for pixels `pos`
    (`PromptPix.head_weights(pos)`): read through `nn.Module` once a pixel instead of once
    a channel (~1 µs a read, a dozen a pixel). The parameters themselves, and the prior's
    rows of those pixels."""
    chan: torch.Tensor  # (C, D)
    sub: torch.Tensor | None  # ((C-1)*256, D)
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    prior: torch.Tensor | None  # (S, C, 256): the frequency prior at pixels `pos`


class PromptPix(nn.Module):
    """Text-conditioned autoregressive pixel transformer.

    `forward` is the training forward (token ids in, logits out, DDP-friendly);
    `forward_logits`, `nll` and `generate` are the public API taking prompt strings.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        c = self.config = config
        pretrained = c.use_text and c.text_encoder == "minilm"
        if pretrained:
            # Imported here: a scratch model never touches the package or transformers.
            from .pretrained import MiniLMTokenizer, PretrainedTextEncoder

            if tokenizer is None:
                tokenizer = MiniLMTokenizer.from_package()
            if not isinstance(tokenizer, MiniLMTokenizer):
                raise PromptPixError(
                    f"text_encoder 'minilm' brings its own WordPiece tokenizer; got a "
                    f"{tokenizer.kind!r} tokenizer")
        if c.use_text and tokenizer is None:
            raise PromptPixError("a text-conditioned model needs a tokenizer")
        if not pretrained and tokenizer is not None and len(tokenizer) > c.vocab_size:
            raise PromptPixError(
                f"tokenizer has {len(tokenizer)} entries but vocab_size is {c.vocab_size}"
            )
        self.tokenizer = tokenizer if c.use_text else None
        self.default_guidance_scale = 1.0  # set from the checkpoint's meta by load_checkpoint
        D, C = c.hidden_dim, c.channels
        self.num_pixels = c.image_size * c.image_size
        # Pixel p-1's values: row c*256 + v per channel, summed; row C*256 is the start.
        self.value_emb = nn.Embedding(C * 256 + 1, D)
        self.row_emb = nn.Embedding(c.image_size, D)
        self.col_emb = nn.Embedding(c.image_size, D)
        # Class slot num_classes is the "no class" (unconditional) embedding.
        self.class_emb = nn.Embedding(c.num_classes + 1, D) if c.num_classes > 0 else None
        if c.use_text and not pretrained:
            self.text: nn.Module = TextEncoder(c)
        if c.use_text:
            # Project the text states (text_embed_dim: 384 for MiniLM) into the decoder.
            self.text_to_cond = nn.Linear(c.text_embed_dim, D)
            self.text_to_ctx = nn.Linear(c.text_embed_dim, D)
        self.blocks = nn.ModuleList(DecoderBlock(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(D)
        # The channel head: which channel (C, D), the values of the pixel's earlier channels
        # (row c*256 + v), a residual GELU layer, then the 256-way readout.
        self.chan_emb = nn.Embedding(C, D)
        self.sub_emb = nn.Embedding((C - 1) * 256, D) if C > 1 else None
        self.head_fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 256)
        self.freq_prior = (
            nn.Parameter(torch.zeros(c.seq_len, 256)) if c.use_frequency_prior else None
        )
        p = torch.arange(self.num_pixels)
        self.register_buffer("pos_row", p // c.image_size, persistent=False)
        self.register_buffer("pos_col", p % c.image_size, persistent=False)
        self.register_buffer("value_offset", torch.arange(C) * 256, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: scale residual projections by depth so the stream's variance stays put.
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "cross.proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.num_layers))
        for block in self.blocks:
            if block.cross is not None:
                nn.init.zeros_(block.gate.weight)
                nn.init.constant_(block.gate.bias, GATE_INIT_BIAS)
        if pretrained:
            # Attached after the init above, which would overwrite the pretrained weights.
            self.text = PretrainedTextEncoder(finetune=c.finetune_text_encoder)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    # ----------------------------------------------------------------- helpers

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def unfreeze_text_encoder(self) -> None:
        """Fine-tune a frozen pretrained encoder from now on (train frozen with the caption
        cache, then unfreeze): its weights become trainable and, like any fine-tuned
        encoder's, are stored in checkpoints from here on."""
        c = self.config
        if not (c.use_text and c.text_encoder == "minilm"):
            raise PromptPixError("only a pretrained (minilm) text encoder can be unfrozen")
        self.text.unfreeze()
        c.finetune_text_encoder = True

    def package_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint leaves out: the frozen encoder's, read from its
        package at load time (90 MB that never change would otherwise fill every file)."""
        c = self.config
        if not (c.use_text and c.text_encoder == "minilm") or c.finetune_text_encoder:
            return set()
        return {k for k in self.state_dict() if k.startswith("text.bert.")}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt strings -> ids (B, L) and mask (B, L) on the model's device."""
        if self.tokenizer is None:
            B = len(prompts)
            return torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool)
        ids, mask = self.tokenizer.encode_batch(list(prompts), self.config.max_text_length)
        return ids.to(self.device), mask.to(self.device)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on >= 2-D weights only (not biases, norms or the prior).

        A fine-tuned pretrained text encoder's weights get groups of their own, named
        "pretrained", so a trainer can give them a smaller learning rate.
        """
        # Fixed order (model decay, model no-decay, then the encoder's): a resumed
        # optimizer state is matched to these groups by position.
        order = [("model", True), ("model", False), ("pretrained", True), ("pretrained", False)]
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {k: [] for k in order}
        for name, p in self.named_parameters():
            if p.requires_grad:
                kind = "pretrained" if name.startswith("text.bert.") else "model"
                groups[(kind, p.dim() >= 2 and name != "freq_prior")].append(p)
        return [{"params": groups[(kind, decays)], "name": kind,
                 "weight_decay": weight_decay if decays else 0.0}
                for kind, decays in order if groups[(kind, decays)]]

    def set_frequency_prior(self, log_probs: torch.Tensor) -> None:
        """Start the learnable prior from counted log-frequencies (T, 256)."""
        if self.freq_prior is None:
            raise PromptPixError("this model was built with use_frequency_prior=False")
        if tuple(log_probs.shape) != tuple(self.freq_prior.shape):
            raise PromptPixError(
                f"frequency prior shape {tuple(log_probs.shape)} != {tuple(self.freq_prior.shape)}"
            )
        with torch.no_grad():
            self.freq_prior.copy_(log_probs)

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        want = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise PromptPixError(f"expected images (B, {want}), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise PromptPixError(f"expected uint8 images, got {images.dtype}")

    def labels(self, class_labels: torch.Tensor | Sequence[int] | None, B: int
               ) -> torch.Tensor | None:
        """Class ids (B,) on the device, -1 / None mapped to the null class; None for a
        model without classes (which refuses any label >= 0)."""
        if self.class_emb is None:
            if class_labels is not None and bool((torch.as_tensor(class_labels) >= 0).any()):
                raise PromptPixError("this model has no classes; class_labels must be None or -1")
            return None
        null = self.config.num_classes
        if class_labels is None:
            return torch.full((B,), null, dtype=torch.long, device=self.device)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).clone()
        if labels.shape != (B,):
            raise PromptPixError(f"expected {B} class labels, got shape {tuple(labels.shape)}")
        bad = (labels < -1) | (labels >= null)
        if bad.any():
            raise PromptPixError(
                f"class label {int(labels[bad][0])} out of range; expected -1..{null - 1}"
            )
        labels[labels < 0] = null
        return labels

    def condition(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None]:
        """Condition vector (B, D) and per-block text keys/values (once per request)."""
        B = ids.shape[0]
        cond = torch.zeros(B, self.config.hidden_dim, device=self.device)
        if labels is not None:
            cond = cond + self.class_emb(labels)
        if not self.config.use_text:
            return cond, None
        states, pooled = self.text(ids, mask)  # (B, L, E), (B, E)
        cond = cond + self.text_to_cond(pooled)
        ctx = self.text_to_ctx(states)  # (B, L, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L)
        return cond, [(*b.cross.text_kv(ctx), attn_mask) for b in self.blocks]

    def embed(self, prev: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Decoder input (B, S, D) at pixels `pos` (S,) from the previous pixels' values
        `prev` (B, S, C) long (ignored where pos is 0: the start embedding), plus row and
        column embeddings and the condition (B, D)."""
        # Functional lookups: the sampler calls this once a pixel (see `channel_logits`).
        table = self.value_emb.weight
        x = F.embedding(prev + self.value_offset, table).sum(-2)  # (B, S, D)
        x = torch.where((pos == 0)[:, None], table[-1], x)
        where = (F.embedding(self.pos_row.index_select(0, pos), self.row_emb.weight)
                 + F.embedding(self.pos_col.index_select(0, pos), self.col_emb.weight))  # (S, D)
        return x + where + cond[:, None]

    def new_caches(self, batch_size: int, dtype: torch.dtype = torch.float32) -> list[KVCache]:
        """One static KV cache per block for `batch_size` sequences of every pixel, with the
        block's `weights()` as they are now (make new caches for new weights)."""
        c = self.config
        hs = c.hidden_dim // c.num_heads
        with torch.no_grad():
            return [KVCache(batch_size, c.num_kv_heads, self.num_pixels, hs, self.device, dtype,
                            b.weights())
                    for b in self.blocks]

    def decode(
        self,
        x: torch.Tensor,
        text: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
        caches: list[KVCache] | None = None,
        input_pos: torch.Tensor | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """The decoder over inputs x (B, S, D) -> normalised states (B, S, D).

        Without caches, x is pixels 0..S-1 (training, the uncached reference). With them
        (`new_caches`), x is pixels `input_pos` (S,) — a prefill or one decode step — and
        each block writes its keys/values there and attends to every earlier pixel:
        over the whole static cache under a mask when `length` is None (static shapes, the
        compiled step), else over a view of its first `length` = max(input_pos) + 1
        positions (the eager step, which knows it on the host)."""
        mask = None
        if caches is not None:
            assert input_pos is not None, "a cached decode needs input_pos"
            if length is None or x.shape[1] > 1:  # one query at length - 1 sees all of them
                T = self.num_pixels if length is None else length
                mask = input_pos[:, None] >= torch.arange(T, device=x.device)
        B, S, D = x.shape
        x = x.reshape(B * S, D)  # the blocks work on rows
        for i, block in enumerate(self.blocks):
            x = block(x, B, text[i] if text is not None else None,
                      None if caches is None else caches[i], mask, input_pos, length)
        return self.ln_f(x).view(B, S, D)

    def head_weights(self, pos: torch.Tensor) -> _Head:
        """The channel head's tensors at pixels `pos` (S,), for the C calls of
        `channel_logits` there."""
        prior = self.freq_prior
        if prior is not None:
            prior = prior.view(self.num_pixels, self.config.channels, 256).index_select(0, pos)
        return _Head(self.chan_emb.weight, None if self.sub_emb is None else self.sub_emb.weight,
                     self.head_fc.weight, self.head_fc.bias, self.head.weight, self.head.bias,
                     prior)

    def channel_logits(self, h: torch.Tensor, earlier: Sequence[torch.Tensor],
                       pos: torch.Tensor, c: int, w: _Head | None = None) -> torch.Tensor:
        """fp32 logits (B, S, 256) of channel c at pixels `pos` (S,) from the decoder states h
        (B, S, D) and the values `earlier[j]` (B, S) of the pixel's channels j < c; for one
        pixel (S = 1) also h (B, D) and `earlier[j]` (B,) -> (B, 256) (the sampler's step).
        `w`: `head_weights(pos)`, read once for the C calls of a pixel (None: read here).

        The sampler calls this C times a pixel: functional calls on the parameters, a view
        of `sub_emb` per earlier channel j and the pixel's prior rows looked up once (in
        `w`) instead of module calls and index arithmetic; the same values either way."""
        if w is None:
            w = self.head_weights(pos)
        z = h + w.chan[c]
        if c:
            assert w.sub is not None
            for j in range(c):
                z = z + F.embedding(earlier[j], w.sub[256 * j:256 * (j + 1)])
        z = z + F.gelu(F.linear(z, w.fc_w, w.fc_b), approximate="tanh")
        logits = F.linear(z, w.out_w, w.out_b).float()  # fp32 whatever the autocast
        if w.prior is not None:
            logits = logits + w.prior[:, c]
        return logits

    # ----------------------------------------------------------------- training forward

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, H*W*C, 256) for uint8 images (B, C, H, W)."""
        self._check_images(images)
        B, C, P = images.shape[0], self.config.channels, self.num_pixels
        values = images.permute(0, 2, 3, 1).reshape(B, P, C).long()  # raster order
        prev = torch.cat([values[:, :1], values[:, :-1]], dim=1)  # pixel 0's is ignored
        pos = torch.arange(P, device=images.device)
        cond, text = self.condition(text_ids, text_mask, self.labels(class_labels, B))
        h = self.decode(self.embed(prev, pos, cond), text)
        earlier, w = values.unbind(-1), self.head_weights(pos)
        logits = [self.channel_logits(h, earlier, pos, c, w) for c in range(C)]
        return torch.stack(logits, dim=2).view(B, P * C, 256)

    # ----------------------------------------------------------------- public API

    def forward_logits(
        self,
        images: torch.Tensor,
        prompts: list[str],
        class_labels: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Float logits (B, H*W*C, 256) in raster order, for prompt strings."""
        if len(prompts) != images.shape[0]:
            raise PromptPixError(f"{len(prompts)} prompts for {images.shape[0]} images")
        ids, mask = self.tokenize(prompts)
        labels = None if class_labels is None else torch.as_tensor(class_labels)
        return self(images.to(self.device), ids, mask, labels)

    def nll(
        self,
        images: torch.Tensor,
        prompts: list[str],
        class_labels: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Bits per dimension of each image (B,): the exact discrete likelihood."""
        return bits_per_dim(self.forward_logits(images, prompts, class_labels), images)

    def generate(self, prompts: list[str], num_images: int = 1, **kwargs: object) -> torch.Tensor:
        """Sample images; see `model.sampling.generate` for the parameters."""
        from .sampling import generate

        return generate(self, prompts, num_images=num_images, **kwargs)  # type: ignore[arg-type]


def bits_per_dim(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean negative log2-likelihood per sub-pixel of each image: (B,)."""
    targets = image_tokens(images).to(logits.device)  # (B, T)
    nats = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, T)
    return nats.mean(dim=1) / math.log(2.0)
