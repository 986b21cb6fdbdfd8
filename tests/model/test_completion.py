"""Completion (a prefix image's top rows kept) and negative prompts in the sampler."""

from __future__ import annotations

import pytest
import torch

from model import PromptPixError, SampleRequest, StaticDecoder, generate_batch
from model.sampling import filter_logits, sample_from

from .conftest import CAPTIONS, scrambled


def _prefix(model, seed: int = 1) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c.channels, c.image_size, c.image_size), generator=g,
                         dtype=torch.uint8)


def _uniforms(seed: int, T: int) -> torch.Tensor:
    return torch.rand(T, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [
    dict(top_k=1),  # greedy
    dict(temperature=0.9, top_p=0.95),
    dict(guidance_scale=2.5, temperature=0.8),
])
@pytest.mark.parametrize("keep", [1, 3])
def test_kept_rows_are_exact_and_cache_equals_recompute(make_model, kw, keep):
    model = scrambled(make_model(), std=0.1)
    prefix = _prefix(model)
    args = dict(num_images=3, seed=[5, 6, 7], prefix=prefix, keep_rows=keep, **kw)
    cached = model.generate(CAPTIONS[:1], use_cache=True, **args)
    assert torch.equal(cached[:, :, :keep], prefix[:, :keep].expand(3, -1, -1, -1))
    # The rest is sampled, not copied (random weights: some pixel differs).
    assert not torch.equal(cached[:, :, keep:], prefix[:, keep:].expand(3, -1, -1, -1))
    assert torch.equal(cached, model.generate(CAPTIONS[:1], use_cache=False, **args))


def test_first_sampled_pixel_follows_the_full_forward_of_the_prefix(make_model):
    """The first sampled pixel's sub-pixels are what inverting the full forward's logits of
    the given prefix at their uniforms gives, and each image's bits/dim (forced rows
    included) is `model.nll` of the returned image."""
    model = scrambled(make_model(), std=0.3)
    c = model.config
    C, W, keep = c.channels, c.image_size, 2
    prefix = _prefix(model, seed=3)
    seeds = list(range(20, 28))
    images, bits = model.generate([CAPTIONS[2]], num_images=len(seeds), seed=seeds,
                                  prefix=prefix, keep_rows=keep, return_bits=True)
    with torch.no_grad():
        logits = model.forward_logits(images, [CAPTIONS[2]] * len(seeds))  # (N, T, 256)
        want_bits = model.nll(images, [CAPTIONS[2]] * len(seeds))
    assert (bits - want_bits).abs().max().item() <= 1e-4
    tokens = images.permute(0, 2, 3, 1).reshape(len(seeds), -1)
    t0 = keep * W * C  # the first sampled sub-pixel
    # Pixel keep*W's logits depend on the prefix alone; its channel c on channels < c.
    ref = model.forward_logits(prefix[None].expand(len(seeds), -1, -1, -1).contiguous(),
                               [CAPTIONS[2]] * len(seeds))
    assert (logits[:, t0] - ref[:, t0]).abs().max().item() <= 1e-4
    for n, s in enumerate(seeds):
        u = _uniforms(s, c.seq_len)
        for t in range(t0, t0 + C):
            got = sample_from(filter_logits(logits[n, t][None], 1.0, 0, 1.0), u[t:t + 1])
            assert int(got) == int(tokens[n, t]), (n, t)


def test_completion_batched_with_plain_requests_changes_neither(make_model):
    """A completion request and plain ones in one batch (with guidance, eager and on the
    static decoder) give what each gives alone."""
    model = scrambled(make_model(), std=0.1)
    prefix = _prefix(model)
    plain = dict(prompts=[CAPTIONS[0]], num_images=2, seed=[1, 2], guidance_scale=2.0)
    comp = dict(prompts=[CAPTIONS[1]], num_images=2, seed=[3, 4], prefix=prefix, keep_rows=2,
                temperature=0.7)
    alone = [generate_batch(model, [SampleRequest(**kw)])[0] for kw in (plain, comp)]
    for decoder in (None, StaticDecoder(model, mode=None)):
        both = generate_batch(model, [SampleRequest(**plain), SampleRequest(**comp)],
                              decoder=decoder)
        assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[1])
        assert torch.equal(both[1][:, :, :2], prefix[:, :2].expand(2, -1, -1, -1))


def test_stopping_a_completion_stops_it_alone(make_model):
    model = scrambled(make_model(), std=0.1)
    comp = SampleRequest([CAPTIONS[0]], 1, seed=1, prefix=_prefix(model), keep_rows=1,
                         should_stop=lambda: True)
    other = SampleRequest([CAPTIONS[1]], 1, seed=2)
    out = generate_batch(model, [comp, other])
    assert out[0] is None and out[1] is not None


@pytest.mark.parametrize("kw,match", [
    (dict(keep_rows=2), "keep_rows needs a prefix"),
    (dict(prefix="ok", keep_rows=0), "keep_rows must be 1..3"),
    (dict(prefix="ok", keep_rows=4), "keep_rows must be 1..3"),
    (dict(prefix=torch.zeros(3, 8, 8, dtype=torch.uint8), keep_rows=1), "prefix must be"),
    (dict(prefix=torch.zeros(3, 4, 4), keep_rows=1), "prefix must be"),
])
def test_bad_completion_arguments_are_named(make_model, kw, match):
    model = make_model()
    if isinstance(kw.get("prefix"), str):
        kw = {**kw, "prefix": _prefix(model)}
    with pytest.raises(PromptPixError, match=match):
        model.generate(["x"], **kw)


def test_negative_prompt_takes_the_unconditional_branchs_place(make_model):
    """Guided logits = neg + s * (cond - neg), by hand from forward_logits; every sampled
    sub-pixel is the inverse CDF of those at its uniform."""
    model = scrambled(make_model(), std=0.3)
    s, seeds = 3.0, [9, 10, 11]
    prompt, neg = CAPTIONS[0], CAPTIONS[1]
    images = model.generate([prompt], num_images=3, seed=seeds, guidance_scale=s,
                            negative_prompt=neg)
    with torch.no_grad():
        cond = model.forward_logits(images, [prompt] * 3)
        negc = model.forward_logits(images, [neg] * 3)
        plain = model.forward_logits(images, [""] * 3)
    tokens = images.permute(0, 2, 3, 1).reshape(3, -1)
    for n, seed in enumerate(seeds):
        u = _uniforms(seed, model.config.seq_len)
        mixed = negc[n] + s * (cond[n] - negc[n])  # (T, 256)
        assert torch.equal(sample_from(mixed, u), tokens[n])
        # ... and not what the unconditional branch would have given everywhere.
        assert not torch.equal(sample_from(plain[n] + s * (cond[n] - plain[n]), u), tokens[n])
    other = model.generate([prompt], num_images=3, seed=seeds, guidance_scale=s)
    assert not torch.equal(images, other)


def test_empty_negative_prompt_is_plain_guidance_bit_for_bit(make_model):
    model = scrambled(make_model(), std=0.1)
    kw = dict(num_images=2, seed=[1, 2], guidance_scale=2.0, temperature=0.9)
    want = model.generate([CAPTIONS[0]], **kw)
    assert torch.equal(model.generate([CAPTIONS[0]], negative_prompt="", **kw), want)
    assert torch.equal(model.generate([CAPTIONS[0]], negative_prompt=None, **kw), want)
    # No guidance: a negative prompt changes nothing.
    kw1 = {**kw, "guidance_scale": 1.0}
    assert torch.equal(model.generate([CAPTIONS[0]], negative_prompt=CAPTIONS[1], **kw1),
                       model.generate([CAPTIONS[0]], **kw1))


def test_negative_prompt_on_the_static_decoder_equals_eager(make_model):
    model = scrambled(make_model(), std=0.1)
    reqs = [SampleRequest([CAPTIONS[0]], 2, seed=[1, 2], guidance_scale=2.0,
                          negative_prompt=CAPTIONS[3]),
            SampleRequest([CAPTIONS[1]], 1, seed=[3])]
    eager = generate_batch(model, reqs)
    static = generate_batch(model, reqs, decoder=StaticDecoder(model, mode=None))
    assert all(torch.equal(a, b) for a, b in zip(eager, static, strict=True))
