"""Autoregressive sampling with a static KV cache, classifier-free guidance and seeds.

Randomness: every output image gets its own stream of uniforms, drawn up front on the CPU
from a `torch.Generator`, and each token is sampled by inverting the CDF at that image's
uniform for that position. So a seed reproduces an image on any device, and with a list
of seeds an image does not depend on what else is in the batch.

Batching: `generate_batch` samples several requests (a worker's queued jobs) in one batch.
Temperature, top-k, top-p and guidance scale are per-row tensors inside, so each request
keeps its own parameters; every filtering step is row-wise (nothing mixes rows), so a
row's tokens depend only on its own logits and uniforms. `generate` is one request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import GenerationStopped, PromptPixError
from .network import START, PromptPix
from .prior import tokens_to_images

if TYPE_CHECKING:
    from .compile import StaticDecoder

ProgressFn = Callable[[int, int, torch.Tensor], None]
MAX_SEED = 2**63 - 1


@dataclass
class SampleRequest:
    """One caller's share of a batch: `generate`'s arguments, callbacks included."""

    prompts: list[str]
    num_images: int = 1
    class_labels: Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float | None = None
    seed: int | Sequence[int] | None = None
    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None

    @property
    def n(self) -> int:
        return len(self.prompts) * self.num_images


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch of N output rows (all on the model's device).

    `gidx` (G,) lists the guided rows; rows [N, N+G) of the network's batch are their
    unconditional twins. `any_top_k`/`any_top_p` let the eager path skip unused sorts.
    """

    temperature: torch.Tensor  # (N,) float
    top_k: torch.Tensor  # (N,) long; 0 = off
    top_p: torch.Tensor  # (N,) float; 1 = off
    gidx: torch.Tensor  # (G,) long
    gscale: torch.Tensor  # (G,) float: guidance scale of each guided row
    any_top_k: bool = True
    any_top_p: bool = True


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (B, 256) fp32 logits."""
    B, dev = logits.shape[0], logits.device
    return filter_rows(
        logits,
        torch.full((B,), float(temperature), device=dev),
        torch.full((B,), int(top_k), dtype=torch.long, device=dev),
        torch.full((B,), float(top_p), device=dev),
    )


def filter_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    any_top_k: bool = True,
    any_top_p: bool = True,
) -> torch.Tensor:
    """`filter_logits` with per-row parameters (B,), no host synchronisation.

    A row whose top_k is 0 (or >= 256) or whose top_p is 1 is left exactly as it is, so a
    row filters the same whatever the other rows of the batch ask for.
    """
    V = logits.shape[-1]
    logits = logits / temperature[:, None]
    if any_top_k:
        # kth largest per row = the (k-1)th of the descending sort; same values as topk.
        desc = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
        kth = desc.gather(-1, (top_k.clamp(1, V) - 1)[:, None])  # (B, 1)
        on = ((top_k > 0) & (top_k < V))[:, None]
        logits = logits.masked_fill(on & (logits < kth), float("-inf"))
    if any_top_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Invert the CDF of softmax(logits) (B, 256) at uniforms u (B,) in [0, 1): tokens (B,)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, 256)
    # right=True: the first value whose CDF exceeds u, so zero-probability values are never hit.
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
    return idx.squeeze(-1).clamp_(max=255)


def next_tokens(logits: torch.Tensor, rp: RowParams, u: torch.Tensor) -> torch.Tensor:
    """Guidance mix, filtering and sampling of one step: logits (N+G, 256) -> tokens (N,)."""
    N = u.shape[0]
    out = logits[:N]
    if rp.gidx.numel():
        cond, uncond = out.index_select(0, rp.gidx), logits[N:]  # (G, 256) each
        s = rp.gscale[:, None]
        mixed = uncond + s * (cond - uncond)
        # A padded/unguided row that rides in a guided batch keeps its conditional logits
        # exactly (1 * (c - u) + u need not round back to c).
        mixed = torch.where(s == 1.0, cond, mixed)
        out = out.index_copy(0, rp.gidx, mixed)
    return sample_from(filter_rows(out, rp.temperature, rp.top_k, rp.top_p,
                                   rp.any_top_k, rp.any_top_p), u)


def _uniforms(seed: int | Sequence[int] | None, n: int, T: int) -> torch.Tensor:
    """(n, T) uniforms: one generator for an int seed, one per image for a list."""
    if seed is None:
        seed = random.SystemRandom().randrange(MAX_SEED)
    if isinstance(seed, int):
        return torch.rand(n, T, generator=torch.Generator().manual_seed(seed))
    seeds = list(seed)
    if len(seeds) != n:
        raise PromptPixError(f"seed list has {len(seeds)} entries for {n} images")
    return torch.stack(
        [torch.rand(T, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def _check_params(temperature: float, top_k: int, top_p: float, guidance: float) -> None:
    if not temperature > 0:
        raise PromptPixError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise PromptPixError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise PromptPixError(f"top_p must be in (0, 1], got {top_p}")
    if not guidance >= 1:
        raise PromptPixError(f"guidance_scale must be >= 1, got {guidance}")


@dataclass
class _Rows:
    """The batch laid out row by row: texts, labels, uniforms and parameters per row."""

    texts: list[str]
    labels: list[int] | None
    u: torch.Tensor  # (N, T) on the CPU
    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    scale: list[float]
    spans: list[tuple[int, int]]  # rows of each request


def _layout(model: PromptPix, requests: Sequence[SampleRequest]) -> _Rows:
    c = model.config
    rows = _Rows([], [], torch.empty(0, c.seq_len), [], [], [], [], [])
    any_labels = any(r.class_labels is not None for r in requests)
    us = []
    for r in requests:
        if not r.prompts or r.num_images < 1:
            raise PromptPixError("generate needs at least one prompt and num_images >= 1")
        if r.class_labels is not None and len(r.class_labels) != len(r.prompts):
            raise PromptPixError(f"{len(r.class_labels)} class labels for {len(r.prompts)} "
                                 "prompts")
        gs = model.default_guidance_scale if r.guidance_scale is None else r.guidance_scale
        scale = float(gs)
        _check_params(r.temperature, r.top_k, r.top_p, scale)
        start, n = len(rows.texts), r.n
        rows.texts += [p for p in r.prompts for _ in range(r.num_images)]
        labels = r.class_labels if r.class_labels is not None else [-1] * len(r.prompts)
        rows.labels += [int(x) for x in labels for _ in range(r.num_images)]  # type: ignore[operator]
        us.append(_uniforms(r.seed, n, c.seq_len))
        rows.temperature += [float(r.temperature)] * n
        rows.top_k += [int(r.top_k)] * n
        rows.top_p += [float(r.top_p)] * n
        rows.scale += [scale] * n
        rows.spans.append((start, start + n))
    rows.u = torch.cat(us)
    if not any_labels:
        rows.labels = None
    return rows


def row_params(rows: _Rows, device: torch.device, double_all: bool = False,
               eager_flags: bool = True) -> RowParams:
    """Per-row tensors. `double_all` (static shapes) doubles every row once any is guided."""
    guided = [i for i, s in enumerate(rows.scale) if s != 1.0]
    if double_all and guided:
        guided = list(range(len(rows.scale)))
    gidx = torch.tensor(guided, dtype=torch.long)
    return RowParams(
        temperature=torch.tensor(rows.temperature, device=device),
        top_k=torch.tensor(rows.top_k, dtype=torch.long, device=device),
        top_p=torch.tensor(rows.top_p, device=device),
        gidx=gidx.to(device),
        gscale=torch.tensor(rows.scale)[gidx].to(device),
        any_top_k=not eager_flags or any(0 < k < 256 for k in rows.top_k),
        any_top_p=not eager_flags or any(p < 1.0 for p in rows.top_p),
    )


@torch.inference_mode()
def generate_batch(
    model: PromptPix,
    requests: Sequence[SampleRequest],
    use_cache: bool = True,
    decoder: StaticDecoder | None = None,
) -> list[torch.Tensor | None]:
    """Sample several requests in one batch; per request uint8 images, or None if stopped.

    Each request's `progress` gets only its own rows; its `should_stop` stops only it (its
    rows are still computed to the end of the batch, just never reported). `decoder` (see
    `model.compile`) runs the steps over static shapes, compiled; None runs eager.
    """
    c = model.config
    if not requests:
        return []
    rows = _layout(model, requests)
    device = model.device
    N, T = len(rows.texts), c.seq_len
    rows_total, row_len = c.image_size, c.image_size * c.channels
    active = [True] * len(requests)
    # bf16 on CUDA (logits and sampling stay fp32); fp32 elsewhere for exactness.
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            if decoder is not None:
                step, read_tokens = decoder.begin(rows, use_bf16)
            else:
                step, read_tokens = _eager_steps(model, rows, use_cache, use_bf16)
            for t in range(T):
                step(t)
                if (t + 1) % row_len:
                    continue
                rows_done = (t + 1) // row_len
                for j, r in enumerate(requests):
                    if not active[j]:
                        continue
                    a, b = rows.spans[j]
                    if r.progress is not None:
                        r.progress(rows_done, rows_total,
                                   tokens_to_images(read_tokens()[a:b], c.channels, c.image_size))
                    if r.should_stop is not None and rows_done < rows_total and r.should_stop():
                        active[j] = False
                if not any(active):
                    break
            tokens = read_tokens()[:N]
    finally:
        model.free_caches()
        model.train(was_training)
    images = tokens_to_images(tokens, c.channels, c.image_size)
    return [images[a:b] if active[j] else None for j, (a, b) in enumerate(rows.spans)]


def _eager_steps(
    model: PromptPix, rows: _Rows, use_cache: bool, use_bf16: bool
) -> tuple[Callable[[int], None], Callable[[], torch.Tensor]]:
    """The plain per-token loop body (prefill at 0, then decode_one), and the token reader."""
    device = model.device
    rp = row_params(rows, device)
    N, G = len(rows.texts), rp.gidx.numel()
    # Network batch: every output row, then the unconditional twin of each guided row.
    texts = rows.texts + [""] * G
    labels = None if rows.labels is None else rows.labels + [-1] * G
    B = N + G
    ids, mask = model.tokenize(texts)
    cond, text = model._condition(ids, mask, model._labels(labels, B))
    u = rows.u.to(device)
    tokens = torch.zeros(N, model.config.seq_len, dtype=torch.long, device=device)
    if use_cache:
        model.setup_caches(B, torch.bfloat16 if use_bf16 else torch.float32)
    state = {"prev": torch.full((B,), START, dtype=torch.long, device=device)}

    def step(t: int) -> None:
        prev = state["prev"]
        if not use_cache:
            logits = _recompute(model, tokens, t, cond, text, G > 0, rp.gidx)
        elif t == 0:
            logits = model.prefill(prev[:, None], cond, text)
        else:
            logits = model.decode_one(prev, t, cond, text)
        nxt = next_tokens(logits, rp, u[:, t])
        tokens[:, t] = nxt
        state["prev"] = torch.cat([nxt, nxt.index_select(0, rp.gidx)]) if G else nxt

    return step, lambda: tokens


@torch.inference_mode()
def generate(
    model: PromptPix,
    prompts: list[str],
    num_images: int = 1,
    class_labels: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float | None = None,
    seed: int | Sequence[int] | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Sample uint8 images (len(prompts) * num_images, C, H, W), prompt-major.

    `guidance_scale=None` uses `model.default_guidance_scale` (the checkpoint's, set by
    `load_checkpoint`); 1.0 is no guidance. `progress(rows_done, rows_total, partial)` runs
    after each image row; `should_stop()` is checked then too and raises GenerationStopped.
    """
    done = {"rows": 0}

    def counting(rows_done: int, rows_total: int, partial: torch.Tensor) -> None:
        done["rows"] = rows_done
        if progress is not None:
            progress(rows_done, rows_total, partial)

    req = SampleRequest(list(prompts), num_images, class_labels, temperature, top_k, top_p,
                        guidance_scale, seed, counting, should_stop)
    out = generate_batch(model, [req], use_cache=use_cache)[0]
    if out is None:
        raise GenerationStopped(f"stopped after {done['rows']}/{model.config.image_size} rows")
    return out


def _recompute(
    model: PromptPix, tokens: torch.Tensor, t: int, cond, text, guided: bool,
    gidx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The uncached reference: a full causal forward over positions 0..t; logits of t.

    Guided: the unconditional rows repeat `tokens[gidx]` (all rows when gidx is None)."""
    if guided:
        twins = tokens if gidx is None else tokens.index_select(0, gidx)
        seq = torch.cat([tokens, twins])
    else:
        seq = tokens
    inputs = torch.cat(
        [torch.full((seq.shape[0], 1), START, dtype=torch.long, device=seq.device), seq[:, :t]], 1
    )
    x = model.value_emb(inputs) + model._pos(0, t + 1) + cond[:, None, :]
    for i, block in enumerate(model.blocks):
        x = block(x, text[i] if text is not None else None)
    return model._head(x[:, -1:], t)[:, 0]
