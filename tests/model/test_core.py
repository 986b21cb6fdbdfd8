"""Likelihood, frequency prior, checkpoint safety, and that the model can learn."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from model.prior import count_frequency_prior

from .conftest import CAPTIONS, scrambled, tiny_config


def test_nll_is_mean_cross_entropy_in_bits(make_model):
    model = scrambled(make_model(), std=0.1)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        logits = model.forward_logits(images, CAPTIONS[:2])
        bpd = model.nll(images, CAPTIONS[:2])
    for b in range(2):
        total = 0.0
        for t, (r, col, ch) in enumerate(
            (r, c, ch) for r in range(4) for c in range(4) for ch in range(3)
        ):
            total -= F.log_softmax(logits[b, t].double(), -1)[int(images[b, ch, r, col])].item()
        assert bpd[b].item() == pytest.approx(total / 48 / math.log(2), rel=1e-5)


def test_frequency_prior_counts_a_hand_made_dataset():
    # 2x1x1 grey images: position 0 sees values {0, 0, 5}, position 1 sees {7, 7, 7}.
    data = torch.tensor([[[[0, 7]]], [[[0, 7]]], [[[5, 7]]]], dtype=torch.uint8)  # (3,1,1,2)
    data = data.view(3, 1, 1, 2)
    prior = count_frequency_prior(
        [data[:, :, :, :1].expand(3, 1, 1, 1)], image_size=1, channels=1, smoothing=0.0
    )
    assert torch.allclose(prior.exp()[0, [0, 5]], torch.tensor([2 / 3, 1 / 3]))
    img = torch.tensor([[0, 7], [5, 7]], dtype=torch.uint8).view(1, 1, 2, 2)
    prior = count_frequency_prior([img, img], image_size=2, channels=1, smoothing=1.0)
    probs = prior.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    # position 1 saw 7 twice: smoothed toward the channel histogram, still the clear mode.
    assert probs[1].argmax() == 7 and probs[0].argmax() == 0 and probs[2].argmax() == 5
    channel = torch.full((256,), 1.0)
    channel[[0, 5]] += 2
    channel[7] += 4
    channel /= channel.sum()
    expected = (torch.bincount(torch.tensor([7, 7]), minlength=256) + 256 * channel) / (2 + 256)
    assert torch.allclose(probs[1], expected, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_logits(make_model, tmp_path):
    model = scrambled(make_model(num_classes=3), std=0.1)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, meta={"dataset": "shapes", "default_guidance_scale": 2.0})
    loaded, meta = load_checkpoint(path)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(
            model.forward_logits(images, CAPTIONS[:2], [0, 1]),
            loaded.forward_logits(images, CAPTIONS[:2], [0, 1]),
        )
    assert meta["dataset"] == "shapes" and meta["format_version"] == FORMAT_VERSION
    assert meta["default_guidance_scale"] == 2.0 and loaded.default_guidance_scale == 2.0
    assert len(meta["model_id"]) == 16 and meta["tokenizer"] == "word"


def test_bpe_tokenizer_round_trips(tmp_path):
    from model import PromptPix
    from model.tokenizers import build_tokenizer

    tok = build_tokenizer("bpe", CAPTIONS * 5, vocab_size=300)
    model = PromptPix(tiny_config(image_size=2, vocab_size=len(tok)), tok)
    save_checkpoint(tmp_path / "b.pth", model)
    loaded, meta = load_checkpoint(tmp_path / "b.pth")
    assert meta["tokenizer"] == "bpe"
    assert torch.equal(
        loaded.tokenize(["a crimson ball"])[0], model.tokenize(["a crimson ball"])[0]
    )


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/promptpix-pwned",))


def test_pickle_with_code_is_refused_without_running(tmp_path):
    marker = "/tmp/promptpix-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    torch.save(
        {"format_version": 1, "config": {}, "tokenizer": None, "meta": {}, "state_dict": Boom()},
        path,
    )
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "raw.pth")
    assert not os.path.exists(marker)


def test_corrupt_truncated_and_mismatched_files_are_named(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    model = make_model()
    good = tmp_path / "good.pth"
    save_checkpoint(good, model)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.pth")
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.pth")
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path / "v99.pth")
    payload["format_version"] = 1  # the old sub-pixel layout
    torch.save(payload, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match=r"sub-pixel layout.*retrain"):
        load_checkpoint(tmp_path / "v1.pth")
    payload["format_version"] = FORMAT_VERSION
    payload["config"]["hidden_dim"] = 64
    torch.save(payload, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.pth")
    payload["config"]["hidden_size"] = 64
    torch.save(payload, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="unknown fields"):
        load_checkpoint(tmp_path / "unknown.pth")


def test_model_learns_a_fixed_batch(make_model):
    torch.manual_seed(0)
    model = make_model(image_size=4, hidden_dim=48, num_layers=2).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 4, 4), generator=gen, dtype=torch.uint8)
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=3e-3)
    ids, mask = model.tokenize(CAPTIONS)
    from model import bits_per_dim

    first = None
    for _ in range(300):
        loss = bits_per_dim(model(images, ids, mask), images).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 7.5 and loss.item() < 1.0, (first, loss.item())


def test_model_package_imports_nothing_of_ours():
    code = (
        "import sys, model; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('app', 'worker', 'training')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prepare_image_equals_the_training_pipeline(tmp_path):
    """An upload is prepared byte for byte as training prepares a dataset file: EXIF
    orientation, RGBA composited on white, bicubic resize of the shorter side, centre crop."""
    import numpy as np
    from PIL import Image

    from model import PromptPixError, prepare_image
    from training.datasets.base import load_image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 47, 4), dtype=np.uint8), "RGBA")
    path = tmp_path / "up.png"
    rgba.save(path)
    want = load_image(path, 16)
    got = prepare_image(path.read_bytes(), 16, 3)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(prepare_image(path, 16, 3), want)
    assert (got[:, 0, 0] > 0).all()  # transparency became white, not black
    grey = prepare_image(path, 8, 1)
    ref = Image.fromarray(load_image(path, 8).permute(1, 2, 0).numpy(), "RGB").convert("L")
    assert grey.shape == (1, 8, 8) and np.array_equal(grey[0].numpy(), np.array(ref))
    with pytest.raises(PromptPixError, match="cannot read the image"):
        prepare_image(b"not an image", 8, 3)


def test_resume_refuses_a_sub_pixel_checkpoint(make_model, tmp_path):
    """`--resume` loads through load_checkpoint: a format_version 1 (sub-pixel layout) file
    is refused with the same message, not half-loaded."""
    from training.config import TrainConfig
    from training.model_setup import load_for_resume

    path = tmp_path / "latest.pth"
    save_checkpoint(path, make_model(), train_state={"step": 3})
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"format_version 1: the old sub-pixel layout"):
        load_for_resume(path, TrainConfig(), master=True)
