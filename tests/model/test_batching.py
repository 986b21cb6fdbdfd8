"""Batched sampling of several requests, and the static-shape (compilable) decode step."""

from __future__ import annotations

import pytest
import torch

from model import SampleRequest, StaticDecoder, compiled_decoder, generate_batch
from model.compile import batch_bucket
from model.sampling import decode_step

from .conftest import CAPTIONS, scrambled


def _requests() -> list[SampleRequest]:
    # Every per-row parameter differs between requests, guided and unguided rows mix.
    return [
        SampleRequest(CAPTIONS[:1], 2, seed=[1, 2], temperature=0.8, top_k=10),
        SampleRequest(CAPTIONS[1:3], 1, seed=[3, 4], guidance_scale=2.0, top_p=0.9),
        SampleRequest(CAPTIONS[3:4], 1, seed=5, top_k=3, top_p=0.5, guidance_scale=1.5),
    ]


def _alone(model, r: SampleRequest) -> torch.Tensor:
    return model.generate(r.prompts, r.num_images, class_labels=r.class_labels,
                          temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                          guidance_scale=r.guidance_scale, seed=r.seed)


def test_each_request_of_a_batch_equals_its_run_alone(make_model):
    model = scrambled(make_model(), std=0.05)
    out = generate_batch(model, _requests())
    for got, r in zip(out, _requests(), strict=True):
        assert got is not None and torch.equal(got, _alone(model, r))


def test_class_labels_mix_with_unlabelled_requests(make_model):
    model = scrambled(make_model(use_text=False, num_classes=3), std=0.05)
    reqs = [SampleRequest(["", ""], 1, class_labels=[2, 0], seed=[1, 2]),
            SampleRequest([""], 2, seed=[3, 4], guidance_scale=2.0)]
    out = generate_batch(model, reqs)
    for got, r in zip(out, reqs, strict=True):
        assert got is not None and torch.equal(got, _alone(model, r))


def test_stopping_one_request_leaves_the_others(make_model):
    model = scrambled(make_model(), std=0.05)
    reqs = _requests()
    seen: list[int] = []
    reqs[0].should_stop = lambda: True
    reqs[0].progress = lambda done, total, partial: seen.append(done)
    reqs[1].progress = lambda done, total, partial: seen.append(-done)
    out = generate_batch(model, reqs)
    assert out[0] is None
    assert seen.count(1) == 1 and [-d for d in seen if d < 0] == [1, 2, 3, 4]
    assert out[1] is not None and torch.equal(out[1], _alone(model, _requests()[1]))


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 17, 33, 64, 65, 129)] == [
        1, 2, 4, 8, 16, 32, 64, 64, 128, 192]


def test_static_decode_step_equals_eager(make_model):
    """The static full-cache step (what gets compiled), run eagerly, samples the same images,
    padded to its bucket (5 rows -> 8, then 3 rows -> 4), one set of buffers per bucket."""
    model = scrambled(make_model(), std=0.05)
    dec = StaticDecoder(model, mode=None)
    for reqs in (_requests(), _requests()[1:]):
        got = generate_batch(model, reqs, decoder=dec)
        for g, r in zip(got, reqs, strict=True):
            assert g is not None and torch.equal(g, _alone(model, r))
    assert sorted(key[0] for key in dec._slots) == [4, 8]
    generate_batch(model, _requests()[1:], decoder=dec)
    assert len(dec._slots) == 2  # the same bucket again reuses its buffers


def test_compile_falls_back_to_eager_on_cpu(make_model):
    model = make_model()
    decoder, why = compiled_decoder(model, enabled=True)
    assert decoder is None and "cpu" in why
    assert compiled_decoder(model, enabled=False) == (None, "compile off")
    assert callable(decode_step)


@pytest.mark.slow
def test_compiled_cpu_decode_matches_eager(make_model):
    """torch.compile (default mode, inductor C++) of the step; ~30 s to compile on 2 cores."""
    model = scrambled(make_model(), std=0.05)
    decoder, _ = compiled_decoder(model, enabled=True, allow_cpu=True)
    got = generate_batch(model, _requests(), decoder=decoder)
    for g, r in zip(got, _requests(), strict=True):
        assert g is not None and torch.equal(g, _alone(model, r))
