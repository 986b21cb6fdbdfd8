"""Building blocks of the network: attention with a static KV cache, gated cross-attention
decoder blocks, and the scratch text encoder. Everything on the image side is per position
(one position per pixel): nothing pools or normalises across positions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# The layers' weight products and norms are called functionally on (weight, bias) pairs: a
# module call costs ~1 µs of dispatch and a parameter read through nn.Module ~0.5 µs, which
# a batch-1 decode step pays dozens of times a block (see `_Weights`).
_Pair = tuple[torch.Tensor, torch.Tensor]


def _pair(m: nn.Linear | nn.LayerNorm) -> _Pair:
    return m.weight, m.bias


def _tpair(w: torch.Tensor, b: torch.Tensor) -> _Pair:
    """A product's (weightᵀ, bias) for `_linear`: the transpose is a view of the weight."""
    return w.t(), b


def _product(m: nn.Linear) -> _Pair:
    """`m`'s (weightᵀ, bias) for `_linear` (`_tpair` of its parameters)."""
    return _tpair(m.weight, m.bias)


def _linear(x: torch.Tensor, p: _Pair) -> torch.Tensor:
    """Rows x (N, in) times the (weightᵀ, bias) pair `p` (`_tpair`) -> (N, out): the one
    `addmm` that `F.linear` ends in (so the same numbers), without its wrapper, its
    transpose and the views around it for (B, S, in) inputs (~2 µs of dispatch a product)."""
    return torch.addmm(p[1], x, p[0])


def _norm(x: torch.Tensor, p: _Pair) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[0], p[1])  # nn.LayerNorm's default eps


def _mlp(x: torch.Tensor, fc: _Pair, out: _Pair, drop: float) -> torch.Tensor:
    """Rows x (N, D) -> (N, D); fc, out: `_tpair`s."""
    y = _linear(F.gelu(_linear(x, fc), approximate="tanh"), out)
    # Functional, and only when it drops: an identity nn.Dropout costs a module call.
    return F.dropout(y, drop) if drop else y


class _Weights(NamedTuple):
    """One decoder block's tensors as its forward reads them (`DecoderBlock.weights`): its
    parameters themselves (no copies; the products' weights as transposed views, `_tpair`)
    and the cross-attention's two products with the gate folded in. A KV cache holds them
    made once; without a cache they are made each call."""
    ln1: _Pair
    qkv: _Pair
    proj: _Pair
    ln3: _Pair
    fc: _Pair
    out: _Pair
    ln2: _Pair | None
    qh: _Pair | None  # [W_q; W_h], [b_q; b_gate]
    oc: _Pair | None  # [W_o; W_c W_o], [b_o; W_c b_o]


class KVCache:
    """Preallocated keys and values of one layer, (B, nkv, T_max, hs) each, written by
    position (gpt-fast's static cache): training runs without one, prefill and every decode
    step (eager or compiled) write theirs at `input_pos`, so one code path serves them all.
    The compiled step attends over the whole cache under a mask (static shapes); the eager
    one over a view of its filled part. `weights`: its block's `DecoderBlock.weights()`,
    made once for the weights the cache is made for (a new cache for new weights)."""

    def __init__(self, B: int, nkv: int, T: int, hs: int, device: torch.device,
                 dtype: torch.dtype, weights: _Weights) -> None:
        self.k = torch.zeros(B, nkv, T, hs, device=device, dtype=dtype)
        self.v = torch.zeros(B, nkv, T, hs, device=device, dtype=dtype)
        self.weights = weights

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a step reads by address (static for CUDA graphs)."""
        return [self.k, self.v, *(t for pair in self.weights if pair is not None for t in pair)]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, S, hs) at positions `input_pos` (S,); return the whole cache."""
        if k.dtype != self.k.dtype:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def _self_attention(x: torch.Tensor, B: int, heads: tuple[int, int, int], qkv: _Pair,
                    proj: _Pair, drop: float, cache: KVCache | None, mask: torch.Tensor | None,
                    input_pos: torch.Tensor | None, length: int | None) -> torch.Tensor:
    """Causal self-attention of the rows x (B·S, D) of B sequences -> (B·S, D), with
    `heads` = (nh, nkv, hs): `nkv` key/value heads shared by groups of query heads; the
    weights `qkv`, `proj` (`_Weights`). Without a cache: causal over the S positions
    (training, the uncached reference). With one: k, v are written at `input_pos` (S,) and
    the queries attend to the cache's first `length` positions (a view; None: the whole
    static cache) under `mask` (S, length or T_max), True where visible; None when all of
    them are."""
    N, D = x.shape
    S = N // B
    nh, nkv, hs = heads
    g = nh // nkv
    # Heads first, then split: q (B, nh, S, hs), k and v (B, nkv, S, hs), all views.
    q, k, v = _linear(x, qkv).view(B, S, nh + 2 * nkv, hs).transpose(1, 2).split(
        [nh, nkv, nkv], dim=1)
    if cache is None:
        if nkv != nh:  # query head h reads key/value head h // g
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return _linear(y.transpose(1, 2).reshape(N, D), proj)
    assert input_pos is not None, "a cached step needs input_pos"
    k, v = cache.update(input_pos, k, v)  # (B, nkv, T_max, hs)
    if length is not None:
        k, v = k.narrow(2, 0, length), v.narrow(2, 0, length)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    # The g query heads of a group are independent queries over the same keys: they ride
    # in the query-length dimension ordered (position, head), no copy of the keys, the
    # mask tiled to match; at one position (a step) a view.
    m = mask.repeat_interleave(g, dim=0) if g > 1 and mask is not None else mask
    if S == 1:
        y = F.scaled_dot_product_attention(q.reshape(B, nkv, g, hs), k, v, attn_mask=m)
    else:
        q = q.view(B, nkv, g, S, hs).transpose(2, 3).reshape(B, nkv, S * g, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        y = y.view(B, nkv, S, g, hs).transpose(1, 2)
    return _linear(y.reshape(N, D), proj)


def _attend(q: torch.Tensor, B: int, nh: int, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor, drop: float) -> torch.Tensor:
    """Projected queries, the rows q (B·S, D) of B sequences, in `nh` heads over keys and
    values k, v (B, nh, L, hs) where `mask` (B, 1, 1, L) is True -> (B·S, D), before the
    output product."""
    N, D = q.shape
    q = q.view(B, N // B, nh, D // nh).transpose(1, 2)  # (B, nh, S, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
    return y.transpose(1, 2).reshape(N, D)


class SelfAttention(nn.Module):
    """The parameters of causal self-attention with `nkv` key/value heads shared by groups
    of query heads (`_self_attention`)."""

    def __init__(self, dim: int, nh: int, nkv: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim + 2 * nkv * (dim // nh))
        self.proj = nn.Linear(dim, dim)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to every text token state (keys/values), pads masked."""

    def __init__(self, dim: int, nh: int, dropout: float) -> None:
        super().__init__()
        self.nh, self.hs = nh, dim // nh
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def text_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text states (B, L, D), computed once per request."""
        B, L, D = ctx.shape
        kv = _linear(ctx.reshape(B * L, D), _product(self.kv))
        k, v = kv.view(B, L, 2, self.nh, self.hs).permute(2, 0, 3, 1, 4)
        return k, v  # each (B, nh, L, hs)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """Rows x (B·L, D) of the B sequences of k, v -> (B·L, D)."""
        q = _linear(x, _product(self.q))
        y = _attend(q, k.shape[0], self.nh, k, v, mask, self.dropout if self.training else 0.0)
        return _linear(y, _product(self.proj))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.proj = nn.Linear(ratio * dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x (N, D) -> (N, D)."""
        return _mlp(x, _product(self.fc), _product(self.proj),
                    self.dropout if self.training else 0.0)


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention with gated fusion, MLP."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        D = c.hidden_dim
        # Plain attributes, read each call (a sub-module read through nn.Module costs ~0.5 µs).
        self.heads = c.num_heads, c.num_kv_heads, D // c.num_heads
        self.ln1 = nn.LayerNorm(D)
        self.attn = SelfAttention(D, c.num_heads, c.num_kv_heads)
        self.cross: CrossAttention | None = None
        if c.use_text:
            self.ln2 = nn.LayerNorm(D)
            self.cross = CrossAttention(D, c.num_heads, c.dropout)
            # Gate per position from [h; ctx]: a per-token sigmoid, never pooled over positions.
            self.gate = nn.Linear(2 * D, D)
        self.ln3 = nn.LayerNorm(D)
        self.mlp = MLP(D, c.mlp_ratio, c.dropout)
        self.dropout = c.dropout

    def forward(
        self,
        x: torch.Tensor,
        B: int,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """The one block code, on the rows x (B·S, D) of B sequences -> (B·S, D), so that
        every product is one addmm (`_linear`): training and the uncached reference (no
        cache), prefill and every decode step, eager or compiled (a cache written at
        `input_pos`, holding the block's `weights()`)."""
        w = self.weights() if cache is None else cache.weights
        drop = self.dropout if self.training else 0.0
        x = x + _self_attention(_norm(x, w.ln1), B, self.heads, w.qkv, w.proj, drop, cache,
                                mask, input_pos, length)
        if w.qh is not None and w.oc is not None and w.ln2 is not None:
            assert text is not None, "a text-conditioned block needs the text keys/values"
            q, gate_h = _linear(_norm(x, w.ln2), w.qh).chunk(2, dim=-1)
            y = _attend(q, B, self.heads[0], *text, drop)
            ctx, gate_c = _linear(y, w.oc).chunk(2, dim=-1)
            x = torch.addcmul(x, torch.sigmoid(gate_h + gate_c), ctx)
        return x + _mlp(_norm(x, w.ln3), w.fc, w.out, drop)

    def weights(self) -> _Weights:
        """The tensors the forward reads: the parameters, and the cross-attention's products
        with the gate folded in (the retired sub-pixel `DecodeStep`'s fold): with gate =
        W_h h + W_c ctx + b and ctx = W_o y + b_o, `[q | W_h h + b]` is one product of h,
        `[ctx | W_c ctx]` one of the attention output y — weights [W_q; W_h] and
        [W_o; W_c W_o], biases [b_q; b] and [b_o; W_c b_o]. Exact up to rounding, and every
        path uses it."""
        ln2 = qh = oc = None
        if self.cross is not None:
            D = self.ln1.normalized_shape[0]
            cr, g = self.cross, self.gate
            w_h, w_c = g.weight[:, :D], g.weight[:, D:]
            ln2 = _pair(self.ln2)
            qh = _tpair(torch.cat([cr.q.weight, w_h]), torch.cat([cr.q.bias, g.bias]))
            oc = _tpair(torch.cat([cr.proj.weight, w_c @ cr.proj.weight]),
                        torch.cat([cr.proj.bias, w_c @ cr.proj.bias]))
        return _Weights(_pair(self.ln1), _product(self.attn.qkv),
                        _product(self.attn.proj), _pair(self.ln3),
                        _product(self.mlp.fc), _product(self.mlp.proj), ln2, qh, oc)


class TextEncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer; padded keys are masked out of attention."""

    def __init__(self, dim: int, nh: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, nh, dropout)  # self-attention = cross onto itself
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        h = _norm(x, _pair(self.ln1))
        x = x + self.attn(h.view(B * L, E), *self.attn.text_kv(h), mask).view(B, L, E)
        return x + self.mlp(_norm(x, _pair(self.ln2)).view(B * L, E)).view(B, L, E)


class TextEncoder(nn.Module):
    """Token embeddings + positions -> N encoder layers -> states and masked mean pool."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        E = c.text_embed_dim
        self.tok_emb = nn.Embedding(c.vocab_size, E)
        self.pos_emb = nn.Embedding(c.max_text_length, E)
        self.layers = nn.ModuleList(
            TextEncoderLayer(E, c.text_nhead, c.dropout) for _ in range(c.num_text_layers)
        )
        self.ln = nn.LayerNorm(E)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = ids.shape
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(L, device=ids.device))  # (B, L, E)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees the real tokens
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.ln(x)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, E): pads never count
        return x, pooled
