"""Autoregressive sampling with a static KV cache, classifier-free guidance and seeds.

Randomness: every output image gets its own stream of uniforms, drawn up front on the CPU
from a `torch.Generator`, and each token is sampled by inverting the CDF at that image's
uniform for that position. So a seed reproduces an image on any device, and with a list
of seeds an image does not depend on what else is in the batch.

Batching: `generate_batch` samples several requests (a worker's queued jobs) in one batch.
Temperature, top-k, top-p and guidance scale are per-row tensors inside, so each request
keeps its own parameters; every filtering step is row-wise (nothing mixes rows), so a
row's tokens depend only on its own logits and uniforms. `generate` is one request.

Completion: a request's `prefix` image and `keep_rows` force the first `keep_rows` image
rows: each of their sub-pixels is fed through the cache as given (teacher forcing, the
same step that samples, so the cache holds exactly what a full forward of that prefix
would compute) and the rest is sampled under the prompt. Negative prompts: a guided row's
twin is conditioned on the request's `negative_prompt` instead of the empty prompt, so
guidance steers from it towards the prompt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import GenerationStopped, PromptPixError
from .layers import KVCache
from .network import PromptPix
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
    # Guidance's other branch: its conditional replaces the unconditional (empty) prompt's.
    # None or "" is plain classifier-free guidance; without guidance it changes nothing.
    negative_prompt: str | None = None
    # Completion: uint8 [C, H, W] (the model's size: `prepare_image`) whose top `keep_rows`
    # rows (1..H-1) every image of the request keeps exactly; the rest is sampled.
    prefix: torch.Tensor | None = None
    keep_rows: int = 0

    @property
    def n(self) -> int:
        return len(self.prompts) * self.num_images


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch of N output rows (all on the model's device).

    `gidx` (G,) lists the guided rows; rows [N, N+G) of the network's batch are their
    unconditional twins. `any_top_k`/`any_top_p` let the eager path skip unused sorts,
    `any_temperature` a division by 1 (exact either way).
    """

    temperature: torch.Tensor  # (N,) float
    top_k: torch.Tensor  # (N,) long; 0 = off
    top_p: torch.Tensor  # (N,) float; 1 = off
    gidx: torch.Tensor  # (G,) long
    gscale: torch.Tensor  # (G,) float: guidance scale of each guided row
    any_top_k: bool = True
    any_top_p: bool = True
    any_temperature: bool = True


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
    any_temperature: bool = True,
) -> torch.Tensor:
    """`filter_logits` with per-row parameters (B,), no host synchronisation.

    A row whose top_k is 0 (or >= 256) or whose top_p is 1 is left exactly as it is, so a
    row filters the same whatever the other rows of the batch ask for; `any_temperature`
    False (every temperature is 1) skips the division, which would change nothing.
    """
    V = logits.shape[-1]
    if any_temperature:
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
    out = logits
    if rp.gidx.numel():
        out = logits[:N]
        cond, uncond = out.index_select(0, rp.gidx), logits[N:]  # (G, 256) each
        s = rp.gscale[:, None]
        mixed = uncond + s * (cond - uncond)
        # A padded/unguided row that rides in a guided batch keeps its conditional logits
        # exactly (1 * (c - u) + u need not round back to c).
        mixed = torch.where(s == 1.0, cond, mixed)
        out = out.index_copy(0, rp.gidx, mixed)
    return sample_from(filter_rows(out, rp.temperature, rp.top_k, rp.top_p,
                                   rp.any_top_k, rp.any_top_p, rp.any_temperature), u)


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
    negs: list[str] = field(default_factory=list)  # text of each row's guidance twin
    prefix: torch.Tensor = field(  # (N, T) long on the CPU: the forced sub-pixels
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    forced: list[int] = field(default_factory=list)  # pixels forced from `prefix` per row


def _check_prefix(model: PromptPix, r: SampleRequest) -> torch.Tensor | None:
    """The request's forced tokens (T,) long in raster order, or None; checks the shapes."""
    c = model.config
    if r.prefix is None:
        if r.keep_rows:
            raise PromptPixError("keep_rows needs a prefix image")
        return None
    want = (c.channels, c.image_size, c.image_size)
    if tuple(r.prefix.shape) != want or r.prefix.dtype != torch.uint8:
        raise PromptPixError(f"prefix must be uint8 {want} (prepare_image), got "
                             f"{r.prefix.dtype} {tuple(r.prefix.shape)}")
    if not 1 <= r.keep_rows <= c.image_size - 1:
        raise PromptPixError(f"keep_rows must be 1..{c.image_size - 1}, got {r.keep_rows}")
    return r.prefix.permute(1, 2, 0).reshape(-1).long()


def _layout(model: PromptPix, requests: Sequence[SampleRequest]) -> _Rows:
    c = model.config
    rows = _Rows([], [], torch.empty(0, c.seq_len), [], [], [], [], [])
    any_labels = any(r.class_labels is not None for r in requests)
    us, prefixes = [], []
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
        rows.negs += [r.negative_prompt or ""] * n
        prefix = _check_prefix(model, r)
        prefixes.append((torch.zeros(c.seq_len, dtype=torch.long) if prefix is None
                         else prefix).expand(n, c.seq_len))
        rows.forced += [r.keep_rows * c.image_size if prefix is not None else 0] * n
    rows.u = torch.cat(us)
    rows.prefix = torch.cat(prefixes)
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
        any_temperature=not eager_flags or any(t != 1.0 for t in rows.temperature),
    )


@dataclass
class DecodeState:
    """Everything one decode step reads and writes, as device tensors (static shapes).

    The network batch is the N output rows, then the unconditional twin of each row in
    `rp.gidx`. `pos` is the pixel the next step samples; `tokens` (N, H*W*C) the sampled
    sub-pixels; `bits` (N,) the summed -log2 p of each sampled sub-pixel under its row's
    conditional logits (before guidance and filtering). `caches` None: every step
    recomputes the full forward (the uncached reference). Pixels below `forced` (N,) of a
    row take their sub-pixels from `prefix` (N, H*W*C) instead of sampling them.
    `host_pos` mirrors `pos` on the host for the eager step, which then attends over the
    filled part of the caches only; None (static shapes, compiled) attends over all of it.
    `host_forced` mirrors max(`forced`) for it: from that pixel on it skips the prefix
    (None: not known, every step takes it).
    """

    cond: torch.Tensor  # (B, D)
    text: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None
    caches: list[KVCache] | None
    rp: RowParams
    u: torch.Tensor  # (N, H*W*C)
    tokens: torch.Tensor  # (N, H*W*C) long
    bits: torch.Tensor  # (N,) float64
    prefix: torch.Tensor  # (N, H*W*C) long
    forced: torch.Tensor  # (N,) long: pixels taken from `prefix`
    pos: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    host_pos: int | None = None
    host_forced: int | None = None

    def buffers(self) -> list[torch.Tensor]:
        rp = self.rp
        out = [self.cond, self.u, self.tokens, self.bits, self.prefix, self.forced, self.pos,
               rp.temperature, rp.top_k, rp.top_p, rp.gidx, rp.gscale]
        for k, v, m in self.text or []:
            out += [k, v, m]
        for cache in self.caches or []:
            out += cache.buffers()
        return out


def _with_twins(x: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.index_select(0, gidx)]) if gidx.numel() else x


def decode_step(model: PromptPix, s: DecodeState) -> None:
    """Sample pixel `s.pos` of every row (its C sub-pixels in turn) and advance `s.pos`.

    The one sampling step: the eager sampler, the static-shape decoder and its compiled
    form all run it. No host synchronisation on the cached path. At batch 1 the work
    outside the decoder is a few dozen small calls a step, so they are kept few: the
    pixel's uniforms, prefix and tokens are read and written as (N, 1, C) slices at `pos`,
    the channel head runs on (B, D) states with its parameters read once, and the bits of
    the C sub-pixels come from one log-softmax after the loop.
    """
    C, P = model.config.channels, model.num_pixels
    N, rp, pos = s.tokens.shape[0], s.rp, s.pos
    pixels = s.tokens.view(N, P, C)
    if s.caches is not None:
        prev = pixels.index_select(1, (pos - 1).clamp(min=0))  # (N, 1, C)
        x = model.embed(_with_twins(prev, rp.gidx), pos, s.cond)
        length = None if s.host_pos is None else s.host_pos + 1
        h = model.decode(x, s.text, s.caches, pos, length)[:, 0]  # (B, D)
    else:  # the reference: a full causal forward over pixels 0..pos
        t = int(pos.item())
        seq = torch.cat([pixels[:, :1], pixels[:, :t]], 1)  # (N, t+1, C); pixel 0's ignored
        pos_all = torch.arange(t + 1, device=pos.device)
        h = model.decode(model.embed(_with_twins(seq, rp.gidx), pos_all, s.cond), s.text)
        h = h[:, -1]
    u = s.u.view(N, P, C).index_select(1, pos)[:, 0]  # (N, C)
    # The eager step knows on the host when no row forces this pixel any more.
    forcing = s.host_pos is None or s.host_forced is None or s.host_pos < s.host_forced
    if forcing:
        given = s.prefix.view(N, P, C).index_select(1, pos)[:, 0]  # (N, C)
        forced = pos < s.forced  # (N,)
    earlier: list[torch.Tensor] = []
    conditional: list[torch.Tensor] = []
    head = model.head_weights(pos)
    for c in range(C):
        logits = model.channel_logits(h, earlier, pos, c, head)  # (B, 256)
        nxt = next_tokens(logits, rp, u[:, c])  # (N,)
        if forcing:
            nxt = torch.where(forced, given[:, c], nxt)
        conditional.append(logits[:N])  # bits are under the conditional logits
        earlier.append(_with_twins(nxt, rp.gidx))  # (B,)
    values = torch.stack(earlier, 1)[:N]  # (N, C)
    pixels.index_copy_(1, pos, values[:, None])
    logp = torch.log_softmax(torch.stack(conditional, 1), dim=-1).gather(2, values[..., None])
    log2p = logp[..., 0].double() / math.log(2.0)  # (N, C): log2 p of each sub-pixel
    for c in range(C):  # one channel after another, as the bits add up in order
        s.bits.sub_(log2p[:, c])
    s.pos.add_(1)
    if s.host_pos is not None:
        s.host_pos += 1


def prepare_state(model: PromptPix, rows: _Rows, rp: RowParams, use_cache: bool,
                  kv_dtype: torch.dtype) -> DecodeState:
    """The network's condition for `rows` (+ twins of `rp.gidx`) and fresh buffers."""
    device = model.device
    N, G = len(rows.texts), rp.gidx.numel()
    texts = rows.texts + twin_texts(rows, rp)
    labels = None if rows.labels is None else rows.labels + [-1] * G
    ids, mask = model.tokenize(texts)
    cond, text = model.condition(ids, mask, model.labels(labels, N + G))
    T = model.config.seq_len
    return DecodeState(
        cond=cond, text=text, caches=model.new_caches(N + G, kv_dtype) if use_cache else None,
        rp=rp, u=rows.u.to(device), tokens=torch.zeros(N, T, dtype=torch.long, device=device),
        bits=torch.zeros(N, dtype=torch.float64, device=device),
        prefix=rows.prefix.to(device), forced=torch.tensor(rows.forced, device=device),
        pos=torch.zeros(1, dtype=torch.long, device=device), host_pos=0,
        host_forced=max(rows.forced))


def twin_texts(rows: _Rows, rp: RowParams) -> list[str]:
    """The prompts of the guidance twins of `rp.gidx`: each row's negative prompt ("" =
    the unconditional branch)."""
    return [rows.negs[i] for i in rp.gidx.tolist()]


class Sampled(list):
    """`generate_batch`'s result: per request its images (or None if stopped), and as
    `.bits` per request each image's bits/dim under its prompt (or None)."""

    bits: list[torch.Tensor | None]


@torch.inference_mode()
def generate_batch(
    model: PromptPix,
    requests: Sequence[SampleRequest],
    use_cache: bool = True,
    decoder: StaticDecoder | None = None,
) -> Sampled:
    """Sample several requests in one batch; per request uint8 images, or None if stopped.

    Each request's `progress` gets only its own rows; its `should_stop` stops only it (its
    rows are still computed to the end of the batch, just never reported). `decoder`
    (`model.StaticDecoder`, `model.compiled_decoder`) runs the steps over bucketed static
    shapes, compiled; None runs eager. The result's `.bits[j]` (N_j,) holds each image's
    exact bits/dim under its own prompt and class (conditional logits, before guidance,
    temperature and filtering).
    """
    c = model.config
    out = Sampled()
    out.bits = []
    if not requests:
        return out
    rows = _layout(model, requests)
    device = model.device
    N, P, W = len(rows.texts), model.num_pixels, c.image_size
    active = [True] * len(requests)
    # bf16 on CUDA (logits and sampling stay fp32); fp32 elsewhere for exactness.
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            if decoder is not None:
                step, state = decoder.begin(rows, use_bf16)
            else:
                kv = torch.bfloat16 if use_bf16 else torch.float32
                state = prepare_state(model, rows, row_params(rows, device), use_cache, kv)

                def step() -> None:
                    decode_step(model, state)
            for p in range(P):
                step()
                if (p + 1) % W:
                    continue
                rows_done = (p + 1) // W
                for j, r in enumerate(requests):
                    if not active[j]:
                        continue
                    a, b = rows.spans[j]
                    if r.progress is not None:
                        r.progress(rows_done, c.image_size,
                                   tokens_to_images(state.tokens[a:b], c.channels, c.image_size))
                    if r.should_stop is not None and rows_done < c.image_size and r.should_stop():
                        active[j] = False
                if not any(active):
                    break
            tokens, bits = state.tokens[:N], state.bits[:N] / c.seq_len
    finally:
        model.train(was_training)
    images = tokens_to_images(tokens, c.channels, c.image_size)
    for j, (a, b) in enumerate(rows.spans):
        out.append(images[a:b] if active[j] else None)
        out.bits.append(bits[a:b].float().cpu() if active[j] else None)
    return out


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
    return_bits: bool = False,
    negative_prompt: str | None = None,
    prefix: torch.Tensor | None = None,
    keep_rows: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample uint8 images (len(prompts) * num_images, C, H, W), prompt-major.

    `guidance_scale=None` uses `model.default_guidance_scale` (the checkpoint's, set by
    `load_checkpoint`); 1.0 is no guidance. `progress(rows_done, rows_total, partial)` runs
    after each image row; `should_stop()` is checked then too and raises GenerationStopped.
    `return_bits=True` returns (images, bits) where bits (N,) float is each image's exact
    bits/dim under its prompt (what `model.nll` gives for it, to float rounding).
    `negative_prompt`, `prefix` and `keep_rows`: see `SampleRequest`.
    """
    done = {"rows": 0}

    def counting(rows_done: int, rows_total: int, partial: torch.Tensor) -> None:
        done["rows"] = rows_done
        if progress is not None:
            progress(rows_done, rows_total, partial)

    req = SampleRequest(list(prompts), num_images, class_labels, temperature, top_k, top_p,
                        guidance_scale, seed, counting, should_stop, negative_prompt, prefix,
                        keep_rows)
    result = generate_batch(model, [req], use_cache=use_cache)
    out = result[0]
    if out is None:
        raise GenerationStopped(f"stopped after {done['rows']}/{model.config.image_size} rows")
    if return_bits:
        bits = result.bits[0]
        assert bits is not None
        return out, bits
    return out
