"""The cached sampler equals the full forward; seeds reproduce; text matters, padding doesn't."""

from __future__ import annotations

import pytest
import torch

from model import GenerationStopped, PromptPixError

from .conftest import CAPTIONS, scrambled


@pytest.mark.parametrize(
    "overrides", [dict(), dict(use_text=False, num_classes=3), dict(channels=1)]
)
@pytest.mark.parametrize("sliced", [False, True])
def test_prefill_and_decode_equal_full_forward(make_model, overrides, sliced):
    """The cached path (a prefill of k pixels, then one pixel per step, each written into
    the static cache by position) gives the full forward's logits for every sub-pixel,
    attending over the whole static cache under a mask (the compiled step) or over a view
    of its filled part (`length`, the eager step)."""
    model = scrambled(make_model(**overrides), std=0.1)
    c = model.config
    C, P = c.channels, model.num_pixels
    images = torch.randint(0, 256, (3, C, c.image_size, c.image_size), dtype=torch.uint8)
    prompts = [CAPTIONS[0], CAPTIONS[1], ""]
    labels = [0, 2, -1] if c.num_classes else None
    with torch.no_grad():
        full = model.forward_logits(images, prompts, labels).view(3, P, C, 256)
        ids, mask = model.tokenize(prompts)
        cond, text = model.condition(ids, mask, model.labels(labels, 3))
        values = images.permute(0, 2, 3, 1).reshape(3, P, C).long()
        prev = torch.cat([values[:, :1], values[:, :-1]], 1)
        caches = model.new_caches(3)
        k = 5  # prefill a prefix, then one pixel at a time
        chunks = [torch.arange(k)] + [torch.tensor([p]) for p in range(k, P)]
        for pos in chunks:
            length = int(pos.max()) + 1 if sliced else None
            h = model.decode(model.embed(prev[:, pos], pos, cond), text, caches, pos, length)
            earlier = values[:, pos].unbind(-1)
            got = torch.stack([model.channel_logits(h, earlier, pos, ch) for ch in range(C)], 2)
            assert (got - full[:, pos]).abs().max().item() <= 1e-4, f"pixels {pos.tolist()}"


def test_greedy_cached_equals_uncached(make_model):
    model = scrambled(make_model(), std=0.1)
    a = model.generate(CAPTIONS[:2], num_images=2, top_k=1, seed=3, use_cache=True)
    b = model.generate(CAPTIONS[:2], num_images=2, top_k=1, seed=3, use_cache=False)
    assert torch.equal(a, b)


def test_sampled_cached_equals_uncached_with_guidance(make_model):
    model = scrambled(make_model(), std=0.05)
    kw = dict(num_images=2, seed=11, guidance_scale=2.5, temperature=0.9, top_p=0.95)
    assert torch.equal(
        model.generate(CAPTIONS[:1], use_cache=True, **kw),
        model.generate(CAPTIONS[:1], use_cache=False, **kw),
    )


def test_seed_reproduces_and_per_image_seeds_are_batch_independent(make_model):
    model = scrambled(make_model(), std=0.05)
    a = model.generate(CAPTIONS[:2], num_images=2, seed=7)
    assert a.shape == (4, 3, 4, 4) and a.dtype == torch.uint8
    assert torch.equal(a, model.generate(CAPTIONS[:2], num_images=2, seed=7))
    assert not torch.equal(a, model.generate(CAPTIONS[:2], num_images=2, seed=8))
    many = model.generate([CAPTIONS[0]], num_images=3, seed=[5, 6, 7])
    one = model.generate([CAPTIONS[0]], num_images=1, seed=[6])
    assert torch.equal(many[1], one[0])


def test_prompt_major_order_and_text_changes_logits(make_model):
    model = scrambled(make_model(), std=0.1)
    out = model.generate([CAPTIONS[0], CAPTIONS[1]], num_images=2, seed=[1, 2, 1, 2])
    solo = model.generate([CAPTIONS[1]], num_images=2, seed=[1, 2])
    assert torch.equal(out[2:], solo)
    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        a = model.forward_logits(images, [CAPTIONS[0]])
        b = model.forward_logits(images, [CAPTIONS[1]])
    assert (a - b).abs().max() > 1e-3


def test_padding_never_changes_logits(make_model):
    model = scrambled(make_model(), std=0.1)
    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        alone = model.forward_logits(images, ["a red circle"])
        # Batched with a much longer prompt, "a red circle" gets padded.
        padded = model.forward_logits(images.repeat(2, 1, 1, 1), ["a red circle", CAPTIONS[0] * 3])
    assert (alone[0] - padded[0]).abs().max().item() <= 1e-5


def test_unknown_words_map_to_unk(make_model):
    model = make_model()
    ids, _ = model.tokenize(["a crimson zeppelin"])
    assert ids[0].tolist()[2:4] == [1, 1]  # <bos> a <unk> <unk> <eos>
    model.generate(["a crimson zeppelin"], seed=0)  # never crashes


def test_progress_every_row_and_stop(make_model):
    model = make_model()
    seen = []
    model.generate(
        ["x"],
        num_images=2,
        seed=0,
        progress=lambda done, total, partial: seen.append((done, total, partial.clone())),
    )
    assert [s[:2] for s in seen] == [(r, 4) for r in range(1, 5)]
    first = seen[0][2]
    assert first.shape == (2, 3, 4, 4) and first[:, :, 1:].eq(0).all()
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(GenerationStopped):
        model.generate(["x"], seed=0, should_stop=stop)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0),
        dict(top_p=0),
        dict(top_k=-1),
        dict(guidance_scale=0.5),
        dict(seed=[1, 2]),
    ],
)
def test_bad_sampling_parameters_are_named(make_model, kw):
    with pytest.raises(PromptPixError, match=next(iter(kw)).split("_")[0]):
        make_model().generate(["x"], **kw)


def test_class_label_on_a_classless_model_is_refused(make_model):
    with pytest.raises(PromptPixError, match="no classes"):
        make_model().generate(["x"], class_labels=[0])


def test_return_bits_is_each_images_nll_under_its_prompt(make_model):
    model = scrambled(make_model(), std=0.1)
    kw = dict(num_images=2, seed=[4, 5, 6, 7], guidance_scale=2.0, temperature=0.8, top_k=20)
    images, bits = model.generate(CAPTIONS[:2], return_bits=True, **kw)
    assert torch.equal(images, model.generate(CAPTIONS[:2], **kw))
    prompts = [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    with torch.no_grad():
        want = model.nll(images, prompts)
    assert bits.shape == (4,) and (bits - want).abs().max().item() <= 1e-4
