"""Autoregressive sampling with a static KV cache, classifier-free guidance and seeds.

Randomness: every output image gets its own stream of uniforms, drawn up front on the CPU
from a `torch.Generator`, and each token is sampled by inverting the CDF at that image's
uniform for that position. So a seed reproduces an image on any device, and with a list
of seeds an image does not depend on what else is in the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from .errors import GenerationStopped, PromptPixError
from .network import START, PromptPix
from .prior import tokens_to_images

ProgressFn = Callable[[int, int, torch.Tensor], None]
MAX_SEED = 2**63 - 1


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (B, 256) fp32 logits."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Invert the CDF of softmax(logits) (B, 256) at uniforms u (B,) in [0, 1): tokens (B,)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, 256)
    # right=True: the first value whose CDF exceeds u, so zero-probability values are never hit.
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
    return idx.squeeze(-1).clamp_(max=255)


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
    c = model.config
    if not prompts or num_images < 1:
        raise PromptPixError("generate needs at least one prompt and num_images >= 1")
    if class_labels is not None and len(class_labels) != len(prompts):
        raise PromptPixError(f"{len(class_labels)} class labels for {len(prompts)} prompts")
    scale = float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
    _check_params(temperature, top_k, top_p, scale)
    guided = scale != 1.0
    N, T = len(prompts) * num_images, c.seq_len
    rows_total, row_len = c.image_size, c.image_size * c.channels
    device = model.device

    texts = [p for p in prompts for _ in range(num_images)]
    labels = (
        None if class_labels is None else [int(x) for x in class_labels for _ in range(num_images)]
    )
    if guided:  # one doubled batch: conditional rows, then unconditional rows
        texts = texts + [""] * N
        labels = None if labels is None else labels + [-1] * N
    B = len(texts)
    u = _uniforms(seed, N, T).to(device)  # (N, T)

    # bf16 on CUDA (logits and sampling stay fp32); fp32 elsewhere for exactness.
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    was_training = model.training
    model.eval()
    tokens = torch.zeros(N, T, dtype=torch.long, device=device)
    try:
        with autocast:
            ids, mask = model.tokenize(texts)
            cond, text = model._condition(ids, mask, model._labels(labels, B))
            if use_cache:
                model.setup_caches(B, torch.bfloat16 if use_bf16 else torch.float32)
            prev = torch.full((B,), START, dtype=torch.long, device=device)
            for t in range(T):
                if use_cache:
                    if t == 0:
                        logits = model.prefill(prev[:, None], cond, text)
                    else:
                        logits = model.decode_one(prev, t, cond, text)
                else:
                    logits = _recompute(model, tokens, t, cond, text, guided)
                if guided:
                    cond_l, uncond_l = logits[:N], logits[N:]
                    logits = uncond_l + scale * (cond_l - uncond_l)
                nxt = sample_from(filter_logits(logits, temperature, top_k, top_p), u[:, t])
                tokens[:, t] = nxt
                prev = torch.cat([nxt, nxt]) if guided else nxt
                if (t + 1) % row_len == 0:
                    rows_done = (t + 1) // row_len
                    if progress is not None:
                        progress(
                            rows_done,
                            rows_total,
                            tokens_to_images(tokens, c.channels, c.image_size),
                        )
                    if should_stop is not None and rows_done < rows_total and should_stop():
                        raise GenerationStopped(f"stopped after {rows_done}/{rows_total} rows")
    finally:
        model.free_caches()
        model.train(was_training)
    return tokens_to_images(tokens, c.channels, c.image_size)


def _recompute(
    model: PromptPix, tokens: torch.Tensor, t: int, cond, text, guided: bool
) -> torch.Tensor:
    """The uncached reference: a full causal forward over positions 0..t; logits of t."""
    seq = torch.cat([tokens, tokens]) if guided else tokens
    inputs = torch.cat(
        [torch.full((seq.shape[0], 1), START, dtype=torch.long, device=seq.device), seq[:, :t]], 1
    )
    x = model.value_emb(inputs) + model._pos(0, t + 1) + cond[:, None, :]
    for i, block in enumerate(model.blocks):
        x = block(x, text[i] if text is not None else None)
    return model._head(x[:, -1:], t)[:, 0]
