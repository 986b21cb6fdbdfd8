"""The one-step decode over static shapes, compiled (gpt-fast's `decode_one_token`).

Only the decode step is compiled: prefill is the same step at position 0, the text
encoder runs once per batch eagerly. Shapes are made static so CUDA graphs
(`mode="reduce-overhead"`) can replay one capture for every step of every batch:

- the batch is padded to a bucket (1, 2, 4, ..., 64, then multiples of 64) with dummy
  rows (empty prompt, parameters that filter nothing), and once any row is guided every
  row gets an unconditional twin, so the network batch is `Nb` or `2 * Nb`;
- the text keys/values are padded to a power-of-two length (masked);
- self-attention always reads the whole preallocated cache, masked beyond the position;
- the position, the sampled tokens and the uniforms live in device buffers the step
  reads and advances itself, so a step takes no per-step input and nothing goes back to
  the host; the caller reads the tokens only when it reports a finished row.

Every buffer of a bucket is allocated once and reused by later batches of that bucket
(`torch._dynamo.mark_static_address`), so a bucket compiles and captures once.
Results equal the eager sampler's up to floating-point rounding (the masked full-length
attention sums in another order), not bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .layers import DecoderBlock
from .network import START, PromptPix
from .sampling import RowParams, _Rows, next_tokens, row_params

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_TEXT_BUCKET = 16
RECOMPILE_LIMIT = 64  # one graph per (batch bucket, guided, text bucket): more than dynamo's 8


def batch_bucket(n: int) -> int:
    """The padded batch size for n output rows: the next bucket, then multiples of 64."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    return -(-n // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1]


def text_bucket(length: int) -> int:
    b = MIN_TEXT_BUCKET
    while b < length:
        b *= 2
    return b


class _Slot:
    """Static device buffers of one bucket; `fill` copies a batch in, the step advances it."""

    def __init__(self, model: PromptPix, Nb: int, guided: bool, Lb: int,
                 kv_dtype: torch.dtype, cond_dtype: torch.dtype, text_dtype: torch.dtype) -> None:
        c, dev = model.config, model.device
        B, T, D = (2 * Nb if guided else Nb), c.seq_len, c.hidden_dim
        hs = D // c.num_heads
        self.N, self.B, self.guided = Nb, B, guided
        z = torch.zeros
        self.k = [z(B, c.num_kv_heads, T, hs, device=dev, dtype=kv_dtype) for _ in model.blocks]
        self.v = [z(B, c.num_kv_heads, T, hs, device=dev, dtype=kv_dtype) for _ in model.blocks]
        n_text = len(model.blocks) if c.use_text else 0
        self.tk = [z(B, c.num_heads, Lb, hs, device=dev, dtype=text_dtype) for _ in range(n_text)]
        self.tv = [z(B, c.num_heads, Lb, hs, device=dev, dtype=text_dtype) for _ in range(n_text)]
        self.tmask = z(B, 1, 1, Lb, device=dev, dtype=torch.bool)
        self.cond = z(B, D, device=dev, dtype=cond_dtype)
        self.pos_table = z(T, D, device=dev)
        self.arange_T = torch.arange(T, device=dev)
        self.pos = z(1, device=dev, dtype=torch.long)  # the position the next step samples
        self.tokens = z(Nb, T, device=dev, dtype=torch.long)
        self.u = z(Nb, T, device=dev)
        self.rp = RowParams(
            temperature=torch.ones(Nb, device=dev), top_k=z(Nb, device=dev, dtype=torch.long),
            top_p=torch.ones(Nb, device=dev),
            gidx=torch.arange(Nb if guided else 0, device=dev),
            gscale=torch.ones(Nb if guided else 0, device=dev),
        )
        for t in self._buffers():
            torch._dynamo.mark_static_address(t)

    def _buffers(self) -> list[torch.Tensor]:
        rp = self.rp
        return [*self.k, *self.v, *self.tk, *self.tv, self.tmask, self.cond, self.pos_table,
                self.arange_T, self.pos, self.tokens, self.u, rp.temperature, rp.top_k,
                rp.top_p, rp.gidx, rp.gscale]

    def fill(self, model: PromptPix, rows: _Rows, rp: RowParams, cond: torch.Tensor,
             text: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None) -> None:
        # No need to clear the KV caches: position t is written before any step reads it,
        # and positions beyond are masked out.
        self.cond.copy_(cond)
        if text is not None:
            L = text[0][0].shape[2]
            self.tmask.zero_()
            self.tmask[..., :L].copy_(text[0][2])
            for i, (k, v, _) in enumerate(text):
                self.tk[i].zero_()  # padded keys must be finite: masked weights are 0 * value
                self.tv[i].zero_()
                self.tk[i][:, :, :L].copy_(k)
                self.tv[i][:, :, :L].copy_(v)
        self.pos_table.copy_(model._pos(0, model.config.seq_len))
        self.pos.zero_()
        self.tokens.zero_()
        self.u.copy_(rows.u)
        for mine, theirs in ((self.rp.temperature, rp.temperature), (self.rp.top_k, rp.top_k),
                             (self.rp.top_p, rp.top_p), (self.rp.gscale, rp.gscale)):
            mine.copy_(theirs)


def _block(blk: DecoderBlock, x: torch.Tensor, s: _Slot, i: int,
           visible: torch.Tensor) -> torch.Tensor:
    """DecoderBlock.forward for one token at position s.pos, over the whole static cache."""
    B, _, D = x.shape
    a = blk.attn
    nh, nkv, hs = a.nh, a.nkv, a.hs
    q, k, v = a.qkv(blk.ln1(x)).split([D, nkv * hs, nkv * hs], dim=-1)
    s.k[i].index_copy_(2, s.pos, k.view(B, 1, nkv, hs).transpose(1, 2).to(s.k[i].dtype))
    s.v[i].index_copy_(2, s.pos, v.view(B, 1, nkv, hs).transpose(1, 2).to(s.v[i].dtype))
    # Query heads of a group ride in the query-length dimension, as in SelfAttention.
    y = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hs), s.k[i], s.v[i],
                                       attn_mask=visible)
    x = x + a.proj(y.reshape(B, 1, D))
    if blk.cross is not None:
        h = blk.ln2(x)
        ctx = blk.cross(h, s.tk[i], s.tv[i], s.tmask)
        x = x + torch.sigmoid(blk.gate(torch.cat([h, ctx], dim=-1))) * ctx
    return x + blk.mlp(blk.ln3(x))


def decode_step(model: PromptPix, s: _Slot) -> None:
    """Sample position s.pos of every row into s.tokens and advance s.pos (no host sync)."""
    pos = s.pos
    prev = s.tokens.index_select(1, (pos - 1).clamp(min=0)).squeeze(1)  # (Nb,)
    prev = torch.where(pos == 0, torch.full_like(prev, START), prev)
    if s.guided:
        prev = torch.cat([prev, prev])  # (B,)
    x = (model.value_emb(prev) + s.pos_table.index_select(0, pos) + s.cond)[:, None, :]
    visible = (s.arange_T <= pos)[None, None, None, :]  # (1, 1, 1, T)
    for i, blk in enumerate(model.blocks):
        x = _block(blk, x, s, i, visible)
    logits = model.head(model.ln_f(x)).float()[:, 0]  # (B, 256) fp32 whatever the autocast
    if model.freq_prior is not None:
        logits = logits + model.freq_prior.index_select(0, pos)
    nxt = next_tokens(logits, s.rp, s.u.index_select(1, pos).squeeze(1))  # (Nb,)
    s.tokens.index_copy_(1, pos, nxt[:, None])
    s.pos.add_(1)


class StaticDecoder:
    """Runs `generate_batch`'s steps over bucketed static buffers, compiled or not.

    `mode`: a `torch.compile` mode ("reduce-overhead" = CUDA graphs, "default"), or None
    for the same static step run eagerly (the reference the compiled one is checked
    against). Built for a model whose weights no longer change (a serving worker).
    """

    def __init__(self, model: PromptPix, mode: str | None = "reduce-overhead") -> None:
        self.model, self.mode = model, mode
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._fn: Callable[[PromptPix, _Slot], None] = decode_step
        if mode is not None:
            for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6+
                if hasattr(torch._dynamo.config, name):
                    limit = max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT)
                    setattr(torch._dynamo.config, name, limit)
                    break
            self._fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    def begin(self, rows: _Rows, use_bf16: bool
              ) -> tuple[Callable[[int], None], Callable[[], torch.Tensor]]:
        """Pad `rows` to a bucket, fill that bucket's buffers; (step(t), read tokens)."""
        model, dev = self.model, self.model.device
        N = len(rows.texts)
        pad = batch_bucket(N) - N
        # Dummy rows: empty prompt, no class, parameters that leave their logits untouched.
        padded = _Rows(rows.texts + [""] * pad,
                       None if rows.labels is None else rows.labels + [-1] * pad,
                       torch.cat([rows.u, torch.full((pad, rows.u.shape[1]), 0.5)]),
                       rows.temperature + [1.0] * pad, rows.top_k + [0] * pad,
                       rows.top_p + [1.0] * pad, rows.scale + [1.0] * pad, rows.spans)
        rp = row_params(padded, dev, double_all=True, eager_flags=False)
        guided = rp.gidx.numel() > 0
        Nb = N + pad
        texts = padded.texts + ([""] * Nb if guided else [])
        labels = None if padded.labels is None else padded.labels + ([-1] * Nb if guided else [])
        ids, mask = model.tokenize(texts)
        cond, text = model._condition(ids, mask, model._labels(labels, len(texts)))
        kv_dtype = torch.bfloat16 if use_bf16 else torch.float32
        text_dtype = text[0][0].dtype if text is not None else kv_dtype
        key = (Nb, guided, text_bucket(ids.shape[1]), kv_dtype, cond.dtype, text_dtype)
        slot = self._slots.get(key)
        if slot is None:
            logger.info("static decode: new bucket %s (compile mode %s)", key[:3], self.mode)
            slot = self._slots[key] = _Slot(model, *key)
        slot.fill(model, padded, rp, cond, text)
        cudagraphs = self.mode == "reduce-overhead"
        fn = self._fn

        def step(t: int) -> None:
            if cudagraphs:  # each call is a new iteration: earlier outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            fn(model, slot)

        return step, lambda: slot.tokens

    def free(self) -> None:
        """Drop every bucket's buffers (their graphs stay cached by torch.compile)."""
        self._slots.clear()


def compiled_decoder(model: PromptPix, enabled: bool, allow_cpu: bool = False
                     ) -> tuple[StaticDecoder | None, str]:
    """The worker's choice: (decoder or None, why). CUDA gets CUDA graphs; CPU runs eager.

    On CPU `torch.compile` was measured not to pay for itself here (docs/benchmarks.md):
    the decode is a few small matmuls per token, and the static full-length attention
    that compilation needs costs more than the Python overhead it removes. `allow_cpu`
    forces the default-mode compile anyway (tests, measurements).
    """
    if not enabled:
        return None, "compile off"
    if model.device.type == "cuda":
        return StaticDecoder(model, "reduce-overhead"), "torch.compile reduce-overhead (CUDA graph)"
    if allow_cpu:
        return StaticDecoder(model, "default"), "torch.compile default mode on CPU (forced)"
    return None, (f"compile requested but the device is {model.device.type}: CUDA graphs need "
                  "CUDA, and a compiled CPU decode measured slower; running eager")
