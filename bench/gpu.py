"""The one benchmark for a CUDA machine: correctness, sampling speed, training MFU, memory.

    python bench/gpu.py [--budget 420] [--write docs/benchmarks.md]   # on a GPU, < 8 min
    python bench/gpu.py --dry-run [--write FILE]    # any machine: tiny sizes, every code path

Sections run in priority order, each only while the time budget allows (a skipped one
says so in the table): bf16 correctness (cached vs full-forward logits, seeds reproduce),
sampling a batch of 64 32x32 RGB images with the default ModelConfig (eager and compiled
decode: `torch.compile(mode="reduce-overhead")`), training MFU at hidden 1024 x 16 layers
at 32x32 and 64x64 (bf16 autocast, fused AdamW, compiled blocks, SDPA), then sub-pixels/s
against batch size. MFU = model FLOPs / (time x peak bf16 FLOPs), model FLOPs per token =
6 x (decoder parameters + channels x channel-head parameters) + 12 x layers x width x
(pixels + text tokens) (attention, counted un-halved for the causal mask as in PaLM's
appendix B). One decoder position per pixel (model v2): the sampler takes H*W steps.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from model import (
    ModelConfig,
    PromptPix,
    SampleRequest,
    StaticDecoder,
    bits_per_dim,
    generate_batch,
)
from model.sampling import _layout, decode_step, prepare_state, row_params
from model.tokenizers import build_tokenizer

PROMPTS = ["a large red circle in the top left on a white background",
           "a small blue square in the center on a black background"]
# Dense bf16 peak (no sparsity) by device-name fragment; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


class Report:
    """Rows of the markdown table and the time budget they share."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget = time.perf_counter(), budget_s
        self.rows: list[tuple[str, str]] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        print(f"| {what} | {value} |", flush=True)

    def run(self, name: str, estimate_s: float, fn: Callable[[], None]) -> None:
        """Run a section if its estimate fits in what is left; record skips and failures."""
        if self.left() < estimate_s:
            self.add(name, f"skipped: {self.left():.0f} s of the budget left, "
                     f"needs ~{estimate_s:.0f} s")
            return
        try:
            fn()
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            self.add(name, f"out of memory: {str(e)[:120]}")
        except Exception as e:  # one broken section must not lose the other figures
            traceback.print_exc()
            self.add(name, f"FAILED: {type(e).__name__}: {str(e)[:200]}")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(cfg: ModelConfig, dev: torch.device) -> PromptPix:
    tok = build_tokenizer("word", PROMPTS, vocab_size=1000)
    torch.manual_seed(0)
    return PromptPix(cfg, tok).to(dev).eval()


def correctness(rep: Report, model: PromptPix, bf16: bool) -> None:
    """Cached (a prefill, then one pixel a step) vs full-forward logits under the sampler's
    precision, and `generate(return_bits=True)` against `nll`."""
    dev, c, B = model.device, model.config, 4
    C, P = c.channels, model.num_pixels
    k = max(1, P - 256)  # prefill most, decode the last 256 pixels one at a time
    images = torch.randint(0, 256, (B, C, c.image_size, c.image_size),
                           dtype=torch.uint8, device=dev)
    prompts = [PROMPTS[i % 2] for i in range(B)]
    kv = torch.bfloat16 if bf16 else torch.float32
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        full = model.forward_logits(images, prompts).float().view(B, P, C, 256)
        ids, mask = model.tokenize(prompts)
        cond, text = model.condition(ids, mask, None)
        values = images.permute(0, 2, 3, 1).reshape(B, P, C).long()
        prev = torch.cat([values[:, :1], values[:, :-1]], 1)
        caches = model.new_caches(B, kv)
        diff = 0.0
        chunks = [torch.arange(k, device=dev)] + [torch.tensor([p], device=dev)
                                                  for p in range(k, P)]
        for pos in chunks:
            h = model.decode(model.embed(prev[:, pos], pos, cond), text, caches, pos)
            earlier = values[:, pos].unbind(-1)
            got = torch.stack([model.channel_logits(h, earlier, pos, ch) for ch in range(C)], 2)
            diff = max(diff, (got.float() - full[:, pos]).abs().max().item())
    scale = full.abs().max().item()
    tol = (3e-2 if bf16 else 1e-4) * max(1.0, scale)
    rep.add(f"cached vs full-forward logits ({'bf16' if bf16 else 'fp32'}, prefill {k} pixels "
            f"+ {P - k} steps)", f"max abs diff {diff:.2e} (logits up to {scale:.2f}; "
            f"tolerance {tol:.1e}): {'PASS' if diff <= tol else 'FAIL'}")
    a = model.generate(PROMPTS, 2, seed=[1, 2, 3, 4])
    b, bits = model.generate(PROMPTS, 2, seed=[1, 2, 3, 4], return_bits=True)
    one = model.generate(PROMPTS[1:], 1, seed=[4])
    rep.add("seeds reproduce (same call twice)", "PASS" if torch.equal(a, b) else "FAIL")
    rep.add("image independent of its batch (seed list)",
            "yes" if torch.equal(a[3:], one) else "differs in last bits (allowed, API.md)")
    with torch.inference_mode():
        nll = model.nll(b, [p for p in PROMPTS for _ in range(2)]).float().cpu()
    bd = (bits - nll).abs().max().item()
    rep.add("generate(return_bits=True) vs nll (bits/dim)",
            f"max abs diff {bd:.2e}: {'PASS' if bd <= (2e-2 if bf16 else 1e-3) else 'FAIL'}")


def time_generate(model: PromptPix, n: int, decoder: StaticDecoder | None) -> float:
    reqs = [SampleRequest([PROMPTS[0]], n, seed=list(range(n)))]
    sync(model.device)
    t0 = time.perf_counter()
    generate_batch(model, reqs, decoder=decoder)
    sync(model.device)
    return time.perf_counter() - t0


def sampling(rep: Report, model: PromptPix, decoder: StaticDecoder | None, n: int,
             dry: bool) -> None:
    dev = model.device
    c = model.config
    name = f"sample {n} x {c.image_size}x{c.image_size}x{c.channels}"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if decoder is not None:
        first = time_generate(model, n, decoder)
        t = time_generate(model, n, decoder)
        rep.add(f"{name}, {_kind(decoder)}",
                f"{t:.2f} s ({n * c.seq_len / t:,.0f} sub-px/s, {n * model.num_pixels / t:,.0f} "
                f"decoder steps x rows/s); compile + first run {first:.0f} s")
    if not dry or decoder is None:
        t = time_generate(model, n, None)
        rep.add(f"{name}, {_kind(None)}", f"{t:.2f} s ({n * c.seq_len / t:,.0f} sub-px/s)")
    if dev.type == "cuda":
        rep.add(f"{name}: peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def sweep(rep: Report, model: PromptPix, decoder: StaticDecoder | None, sizes: list[int],
          steps: int, per_size_s: float) -> None:
    """Pixels/s (one decoder step each) against batch size over the first `steps` pixels."""
    dev, use_bf16 = model.device, model.device.type == "cuda"
    for n in sizes:
        if rep.left() < per_size_s:
            rep.add(f"px/s at batch {n}", "skipped: out of budget")
            continue
        rows = _layout(model, [SampleRequest([PROMPTS[0]], n, seed=list(range(n)))])
        steps = min(steps, model.num_pixels - 3)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            if decoder is None:
                kv = torch.bfloat16 if use_bf16 else torch.float32
                state = prepare_state(model, rows, row_params(rows, dev), True, kv)

                def step(state=state) -> None:
                    decode_step(model, state)
            else:
                step, _ = decoder.begin(rows, use_bf16)
            for _ in range(3):  # compiles / captures this bucket
                step()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(dev)
        rate = n * steps / (time.perf_counter() - t0)
        rep.add(f"px/s at batch {n}, {_kind(decoder)}",
                f"{rate:,.0f} ({rate * model.config.channels:,.0f} sub-px/s)")


def _kind(decoder: StaticDecoder | None) -> str:
    if decoder is None:
        return "eager decode"
    if decoder.mode is None:
        return "static decode step, not compiled"
    return f"compiled decode ({decoder.mode})"


def decoder_flops_per_token(model: PromptPix, text_len: int) -> float:
    c = model.config
    # Per pixel (one decoder position): the decoder blocks (but the cross-attention's
    # key/value projection, which runs on text tokens), and C times the channel head.
    n = sum(p.numel() for name, p in model.blocks.named_parameters() if ".cross.kv." not in name)
    n += c.channels * sum(p.numel() for m in (model.head_fc, model.head) for p in m.parameters())
    attn = 12 * c.num_layers * c.hidden_dim * (model.num_pixels + text_len)
    return 6.0 * n + attn


def training(rep: Report, size: int, batch: int, cfg_kw: dict[str, int], steps: int,
             dev: torch.device, peak_flops: float | None, compile_blocks: bool) -> None:
    hidden, layers = cfg_kw["hidden_dim"], cfg_kw["num_layers"]
    # Head size 128 (8 heads at width 1024): what the flash kernels are fastest at.
    cfg = ModelConfig(image_size=size, num_heads=max(1, hidden // 128), max_text_length=32,
                      **cfg_kw)
    model = build(cfg, dev).train()
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-4, fused=cuda)
    if compile_blocks:
        # Regional compilation: the 16 identical blocks share one compiled graph, so compile
        # time does not grow with depth (a whole-model compile costs minutes here).
        for blk in model.blocks:
            blk.compile()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    ids, mask = model.tokenize([PROMPTS[i % 2] for i in range(batch)])
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = bits_per_dim(model(images, ids, mask), images).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * model.num_pixels  # decoder positions
    flops = decoder_flops_per_token(model, ids.shape[1]) * tokens / dt
    mfu = f"{100 * flops / peak_flops:.1f}%" if peak_flops else "n/a (unknown peak)"
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    rep.add(f"train {size}x{size}, hidden {hidden} x {layers} layers, batch {batch} "
            f"({model.num_parameters() / 1e6:.0f}M params)",
            f"{batch / dt:,.1f} images/s, {tokens / dt:,.0f} pixels/s, "
            f"{flops / 1e12:.1f} TFLOP/s, MFU {mfu}{mem} (warm-up/compile {warm:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on any device")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    p.add_argument("--write", type=Path, default=None,
                   help="append the table here (default on CUDA: docs/benchmarks.md)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench/gpu.py: no CUDA device here; nothing measured. Run it on a GPU machine, "
              "or pass --dry-run to exercise every code path at tiny sizes.")
        return 0
    dev = torch.device("cuda" if cuda else "cpu")
    dry = args.dry_run
    if cuda:
        name = torch.cuda.get_device_name(dev)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        name, peak = f"CPU ({platform.machine()}), dry run", args.peak_tflops
    rep = Report(args.budget)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    # The default ModelConfig (hidden 256 x 8, 32x32x3); tiny in a dry run.
    tiny = dict(hidden_dim=32, num_layers=2, text_embed_dim=32, num_text_layers=1, text_nhead=2,
                vocab_size=1000)
    cfg = ModelConfig(image_size=4, **tiny) if dry else ModelConfig(max_text_length=64)
    model = build(cfg, dev)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    rep.run("correctness", 5 if dry else 40, lambda: correctness(rep, model, bf16))
    if cuda:
        decoder: StaticDecoder | None = StaticDecoder(model, "reduce-overhead")
    else:  # CUDA graphs need CUDA; the static step runs eagerly to exercise its code
        decoder = StaticDecoder(model, None)
    n = 4 if dry else 64
    rep.run(f"sample {n}", 5 if dry else 150, lambda: sampling(rep, model, decoder, n, dry))
    train_kw = tiny if dry else dict(hidden_dim=1024, num_layers=16)
    for size, batch, est in ((32, 16, 90), (64, 4, 90)):
        if dry:
            size, batch, est = size // 8, 2, 5
        rep.run(f"train {size}x{size}", est, lambda s=size, b=batch: training(
            rep, s, b, train_kw, 3 if dry else 10, dev, peak, compile_blocks=cuda))
    sizes = [1, 2] if dry else [1, 4, 16]
    rep.run("sweep compiled", 5 if dry else 60,
            lambda: sweep(rep, model, decoder, sizes, 8 if dry else 512, 5 if dry else 50))
    rep.run("sweep eager", 5 if dry else 30, lambda: sweep(
        rep, model, None, [1, 2] if dry else [1, 2, 4, 8, 16, 32, 64], 8 if dry else 256,
        2 if dry else 5))
    total = time.perf_counter() - rep.t0
    rep.add("total time of this script", f"{total:.0f} s (budget {args.budget:.0f} s)")
    write = args.write or (None if dry else Path("docs/benchmarks.md"))
    if write is not None:
        with open(write, "a") as f:
            f.write(f"\n## GPU (`python bench/gpu.py{' --dry-run' if dry else ''}`), {name}, "
                    f"{time.strftime('%Y-%m-%d')}\n\ntorch {torch.__version__}, CUDA "
                    f"{torch.version.cuda}, peak bf16 {peak or 'unknown'} TFLOP/s\n\n"
                    "| figure | result |\n|---|---|\n"
                    + "".join(f"| {w} | {v} |\n" for w, v in rep.rows))
        print(f"appended to {write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
