"""The one-step decode over static shapes, compiled (gpt-fast's `decode_one_token`).

Only the decode step is compiled: prefill is the same step at pixel 0, the text
encoder runs once per batch eagerly. Shapes are made static so CUDA graphs
(`mode="reduce-overhead"`) can replay one capture for every step of every batch:

- the batch is padded to a bucket (1, 2, 4, ..., 64, then multiples of 64) with dummy
  rows (empty prompt, parameters that filter nothing), and once any row is guided every
  row gets an unconditional twin, so the network batch is `Nb` or `2 * Nb`;
- the text keys/values are padded to a power-of-two length (masked);
- self-attention reads the whole preallocated cache, masked beyond the pixel
  (`model.sampling.decode_step` is the one step, eager or compiled; the eager sampler
  gives it the filled length on the host and it attends over that view of the cache, a
  shape that changes every step, which static shapes cannot);
- the position, the sampled tokens and the uniforms live in device buffers the step
  reads and advances itself, so a step takes no per-step input and nothing goes back to
  the host; the caller reads the tokens only when it reports a finished row.

Every buffer of a bucket is allocated once and reused by later batches of that bucket
(`torch._dynamo.mark_static_address`), so a bucket compiles and captures once.
Run eagerly (mode None) it is the eager sampler's step on padded buffers; compiled,
results equal the eager sampler's up to floating-point rounding, not bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .network import PromptPix
from .sampling import DecodeState, RowParams, _Rows, decode_step, row_params, twin_texts

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
    """Static device buffers of one bucket (a `DecodeState`); `fill` copies a batch in."""

    def __init__(self, model: PromptPix, Nb: int, guided: bool, Lb: int,
                 kv_dtype: torch.dtype, cond_dtype: torch.dtype, text_dtype: torch.dtype) -> None:
        c, dev = model.config, model.device
        B, T, D = (2 * Nb if guided else Nb), c.seq_len, c.hidden_dim
        hs = D // c.num_heads
        z = torch.zeros
        text = None
        if c.use_text:
            mask = z(B, 1, 1, Lb, device=dev, dtype=torch.bool)
            text = [(z(B, c.num_heads, Lb, hs, device=dev, dtype=text_dtype),
                     z(B, c.num_heads, Lb, hs, device=dev, dtype=text_dtype), mask)
                    for _ in model.blocks]
        rp = RowParams(
            temperature=torch.ones(Nb, device=dev), top_k=z(Nb, device=dev, dtype=torch.long),
            top_p=torch.ones(Nb, device=dev),
            gidx=torch.arange(Nb if guided else 0, device=dev),
            gscale=torch.ones(Nb if guided else 0, device=dev),
            any_top_k=True, any_top_p=True)
        self.state = DecodeState(
            cond=z(B, D, device=dev, dtype=cond_dtype), text=text,
            caches=model.new_caches(B, kv_dtype), rp=rp, u=z(Nb, T, device=dev),
            tokens=z(Nb, T, device=dev, dtype=torch.long),
            bits=z(Nb, device=dev, dtype=torch.float64),
            prefix=z(Nb, T, device=dev, dtype=torch.long),
            forced=z(Nb, device=dev, dtype=torch.long), pos=z(1, device=dev, dtype=torch.long))
        for t in self.state.buffers():
            torch._dynamo.mark_static_address(t)

    def fill(self, rows: _Rows, rp: RowParams, cond: torch.Tensor,
             text: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None) -> None:
        # No need to clear the KV caches: pixel p is written before any step reads it, and
        # pixels beyond are masked out.
        s = self.state
        s.cond.copy_(cond)
        if text is not None and s.text is not None:
            L = text[0][0].shape[2]
            for (k, v, m), (sk, sv, sm) in zip(text, s.text, strict=True):
                sm.zero_()
                sm[..., :L].copy_(m)
                sk.zero_()  # padded keys must be finite: masked weights are 0 * value
                sv.zero_()
                sk[:, :, :L].copy_(k)
                sv[:, :, :L].copy_(v)
        s.pos.zero_()
        s.tokens.zero_()
        s.bits.zero_()
        s.u.copy_(rows.u)
        s.prefix.copy_(rows.prefix)
        s.forced.copy_(torch.tensor(rows.forced))
        for mine, theirs in ((s.rp.temperature, rp.temperature), (s.rp.top_k, rp.top_k),
                             (s.rp.top_p, rp.top_p), (s.rp.gscale, rp.gscale)):
            mine.copy_(theirs)


class StaticDecoder:
    """Runs `generate_batch`'s steps over bucketed static buffers, compiled or not.

    `mode`: a `torch.compile` mode ("reduce-overhead" = CUDA graphs, "default"), or None
    for the same static step run eagerly (the reference the compiled one is checked
    against). Built for a model whose weights no longer change (a serving worker).
    """

    def __init__(self, model: PromptPix, mode: str | None = "reduce-overhead") -> None:
        self.model, self.mode = model, mode
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._fn: Callable[[PromptPix, DecodeState], None] = decode_step
        if mode is not None:
            for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6+
                if hasattr(torch._dynamo.config, name):
                    limit = max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT)
                    setattr(torch._dynamo.config, name, limit)
                    break
            self._fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    def begin(self, rows: _Rows, use_bf16: bool) -> tuple[Callable[[], None], DecodeState]:
        """Pad `rows` to a bucket, fill that bucket's buffers; (step(), its state)."""
        model, dev = self.model, self.model.device
        N = len(rows.texts)
        pad = batch_bucket(N) - N
        # Dummy rows: empty prompt, no class, parameters that leave their logits untouched.
        padded = _Rows(rows.texts + [""] * pad,
                       None if rows.labels is None else rows.labels + [-1] * pad,
                       torch.cat([rows.u, torch.full((pad, rows.u.shape[1]), 0.5)]),
                       rows.temperature + [1.0] * pad, rows.top_k + [0] * pad,
                       rows.top_p + [1.0] * pad, rows.scale + [1.0] * pad, rows.spans,
                       rows.negs + [""] * pad,
                       torch.cat([rows.prefix, rows.prefix.new_zeros(pad, rows.u.shape[1])]),
                       rows.forced + [0] * pad)
        rp = row_params(padded, dev, double_all=True, eager_flags=False)
        guided = rp.gidx.numel() > 0
        Nb = N + pad
        texts = padded.texts + twin_texts(padded, rp)
        labels = None if padded.labels is None else padded.labels + ([-1] * Nb if guided else [])
        ids, mask = model.tokenize(texts)
        cond, text = model.condition(ids, mask, model.labels(labels, len(texts)))
        kv_dtype = torch.bfloat16 if use_bf16 else torch.float32
        text_dtype = text[0][0].dtype if text is not None else kv_dtype
        key = (Nb, guided, text_bucket(ids.shape[1]), kv_dtype, cond.dtype, text_dtype)
        slot = self._slots.get(key)
        if slot is None:
            logger.info("static decode: new bucket %s (compile mode %s)", key[:3], self.mode)
            slot = self._slots[key] = _Slot(model, *key)
        slot.fill(padded, rp, cond, text)
        cudagraphs = self.mode == "reduce-overhead"
        fn, state = self._fn, slot.state

        def step() -> None:
            if cudagraphs:  # each call is a new iteration: earlier outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            fn(model, state)

        return step, state

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
