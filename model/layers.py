"""Building blocks of the network: attention with a static KV cache, gated cross-attention
decoder blocks, and the scratch text encoder. Everything on the image side is per token."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import PromptPixError


class KVCache:
    """Preallocated keys/values of one layer, written by position.

    Keys are stored transposed, `kt` (B, nkv, hs, T_max), values as `v` (B, nkv, T_max, hs):
    a decode step's scores are then one batched product `q @ kt[..., :t+1]` straight from
    the cache (no copy), which on CPU beat `scaled_dot_product_attention` by 15-35% over
    long caches (docs/benchmarks.md).
    """

    def __init__(self, B: int, nh: int, T: int, hs: int, device: torch.device, dtype: torch.dtype):
        self.kt = torch.zeros(B, nh, hs, T, device=device, dtype=dtype)
        self.v = torch.zeros(B, nh, T, hs, device=device, dtype=dtype)

    def update(
        self, t0: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, S, hs) at positions t0..t0+S-1; return the cache up to there
        as (B, nh, t0+S, hs) views."""
        t1 = t0 + k.shape[2]
        self.kt[..., t0:t1] = k.transpose(-1, -2)
        self.v[:, :, t0:t1] = v
        return self.kt[..., :t1].transpose(-1, -2), self.v[:, :, :t1]


class SelfAttention(nn.Module):
    """Causal self-attention with `nkv` key/value heads shared by groups of query heads."""

    def __init__(self, dim: int, nh: int, nkv: int, dropout: float) -> None:
        super().__init__()
        self.nh, self.nkv, self.hs = nh, nkv, dim // nh
        self.qkv = nn.Linear(dim, dim + 2 * nkv * self.hs)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, t0: int = 0) -> torch.Tensor:
        B, S, D = x.shape
        nh, nkv, hs = self.nh, self.nkv, self.hs
        q, k, v = self.qkv(x).split([D, nkv * hs, nkv * hs], dim=-1)
        k = k.view(B, S, nkv, hs).transpose(1, 2)  # (B, nkv, S, hs)
        v = v.view(B, S, nkv, hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(t0, k, v)  # (B, nkv, t0+S, hs)
        if S == 1:
            # One new token: it may see the whole cache, and the nh/nkv query heads of a group
            # are independent queries over the same keys, so they ride in the query-length
            # dimension — no mask, no copy of the keys.
            y = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hs), k, v)
            return self.proj(y.reshape(B, 1, D))
        if t0 != 0:
            raise PromptPixError("multi-token steps are only supported from position 0")
        q = q.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
        if nkv != nh:  # query head h reads key/value head h // (nh / nkv)
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


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
        k, v = self.kv(ctx).view(B, L, 2, self.nh, self.hs).permute(2, 0, 3, 1, 4)
        return k, v  # each (B, nh, L, hs)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.nh, self.hs).transpose(1, 2)  # (B, nh, S, hs)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.proj = nn.Linear(ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention with gated fusion, MLP."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        D = c.hidden_dim
        self.ln1 = nn.LayerNorm(D)
        self.attn = SelfAttention(D, c.num_heads, c.num_kv_heads, c.dropout)
        self.cross: CrossAttention | None = None
        if c.use_text:
            self.ln2 = nn.LayerNorm(D)
            self.cross = CrossAttention(D, c.num_heads, c.dropout)
            # Gate per position from [h; ctx]: a per-token sigmoid, never pooled over positions.
            self.gate = nn.Linear(2 * D, D)
        self.ln3 = nn.LayerNorm(D)
        self.mlp = MLP(D, c.mlp_ratio, c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        t0: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, t0)
        if self.cross is not None:
            assert text is not None, "a text-conditioned block needs the text keys/values"
            h = self.ln2(x)
            ctx = self.cross(h, *text)
            x = x + torch.sigmoid(self.gate(torch.cat([h, ctx], dim=-1))) * ctx
        return x + self.mlp(self.ln3(x))


class TextEncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer; padded keys are masked out of attention."""

    def __init__(self, dim: int, nh: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, nh, dropout)  # self-attention = cross onto itself
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.text_kv(h), mask)
        return x + self.mlp(self.ln2(x))


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


def _t(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight -> contiguous (in, out): a row vector times it is one fast GEMV."""
    return w.detach().t().to(dtype).contiguous()


class DecodeStep:
    """One decoder block's single-token step over the KV cache, from plain tensors.

    Built once per request (`PromptPix.setup_caches`) from the block's current weights:
    every matrix transposed to (in, out) and contiguous — a (B, in) × (in, out) product
    runs ~1.5× faster on CPU than `F.linear`'s (B, in) × (out, in)ᵀ at batch 1 — and the
    gate folded into the cross-attention's two projections, since
    `gate([h; ctx]) = W_h h + (W_c W_o) y + (W_c b_o + b)` for `ctx = W_o y + b_o`:
    one product gives [q | W_h h], one gives [ctx | gate's ctx half], and the concat and the
    gate's own product are gone. Self-attention reads the transposed key cache with two
    batched products and a softmax (see `KVCache`). No module calls either. The same
    function of the inputs as `DecoderBlock.forward` on one token (to float rounding;
    tested against it).
    """

    def __init__(self, block: DecoderBlock, dtype: torch.dtype) -> None:
        a = block.attn
        self.nh, self.nkv, self.hs = a.nh, a.nkv, a.hs
        D = self.D = a.nh * a.hs

        def ln(m: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            return m.weight.detach(), m.bias.detach(), m.eps  # norms stay fp32

        def lin(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            return m.bias.detach().to(dtype), _t(m.weight, dtype)

        self.ln1, self.qkv, self.proj = ln(block.ln1), lin(a.qkv), lin(a.proj)
        # Fold attention's 1/sqrt(hs) into the query rows of the qkv product.
        scale = torch.ones(self.qkv[0].shape[0], dtype=dtype, device=a.qkv.bias.device)
        scale[:D] = a.hs**-0.5
        self.qkv = (self.qkv[0] * scale, self.qkv[1] * scale)
        self.ln3, self.fc, self.fc_proj = ln(block.ln3), lin(block.mlp.fc), lin(block.mlp.proj)
        self.cross = block.cross is not None
        if block.cross is not None:
            cr, g = block.cross, block.gate
            with torch.no_grad():
                w_h, w_c = g.weight[:, :D], g.weight[:, D:]  # gate halves on h and on ctx
                qg_w = torch.cat([cr.q.weight, w_h])  # (2D, D): [q | gate_h]
                qg_b = torch.cat([cr.q.bias, torch.zeros_like(g.bias)])
                og_w = torch.cat([cr.proj.weight, w_c @ cr.proj.weight])  # [ctx | gate_c]
                og_b = torch.cat([cr.proj.bias, w_c @ cr.proj.bias + g.bias])
            self.ln2 = ln(block.ln2)
            self.qg = (qg_b.to(dtype), _t(qg_w, dtype))
            self.og = (og_b.to(dtype), _t(og_w, dtype))

    def __call__(
        self,
        x: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        cache: KVCache,
        t: int,
    ) -> torch.Tensor:
        """x (B, D) is the residual stream at position t; returns it after the block."""
        B, D, nh, nkv, hs = x.shape[0], self.D, self.nh, self.nkv, self.hs
        h = F.layer_norm(x, (D,), *self.ln1)
        q, k, v = torch.addmm(self.qkv[0], h, self.qkv[1]).split([D, nkv * hs, nkv * hs], 1)
        cache.kt[..., t] = k.view(B, nkv, hs)
        cache.v[:, :, t] = v.view(B, nkv, hs)
        # The nh/nkv query heads of a group are rows of one product over their shared keys;
        # q arrives pre-scaled by 1/sqrt(hs) (folded into the weights above).
        scores = torch.matmul(q.view(B, nkv, nh // nkv, hs), cache.kt[..., : t + 1])
        y = torch.matmul(torch.softmax(scores, dim=-1), cache.v[:, :, : t + 1])
        x = x + torch.addmm(self.proj[0], y.reshape(B, D), self.proj[1])
        if self.cross:
            assert text is not None, "a text-conditioned block needs the text keys/values"
            tk, tv, mask = text
            h = F.layer_norm(x, (D,), *self.ln2)
            q, gh = torch.addmm(self.qg[0], h, self.qg[1]).split([D, D], 1)
            y = F.scaled_dot_product_attention(q.view(B, nh, 1, hs), tk, tv, attn_mask=mask)
            ctx, gc = torch.addmm(self.og[0], y.reshape(B, D), self.og[1]).split([D, D], 1)
            x = torch.addcmul(x, torch.sigmoid(gh + gc), ctx)
        h = F.layer_norm(x, (D,), *self.ln3)
        h = F.gelu(torch.addmm(self.fc[0], h, self.fc[1]), approximate="tanh")
        return x + torch.addmm(self.fc_proj[0], h, self.fc_proj[1])
