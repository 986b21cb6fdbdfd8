"""The shapes grammar, its determinism, and the analyser reading the generator back."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from training.datasets import DatasetError, build_dataset
from training.datasets.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    POSITION_CENTRE,
    POSITIONS,
    SHAPES,
    SIZES,
    analyse,
    make_prompt,
    parse_caption,
    render,
)

FOUR = ("colour", "shape", "position", "background")
N_CAPTIONS = 2000


@pytest.fixture(scope="module")
def rendered16() -> list[tuple[np.ndarray, str, dict]]:
    return [render(i, 16) for i in range(N_CAPTIONS)]


def test_same_index_same_bytes_and_facts_independent_of_size() -> None:
    for i in (0, 7, 49_999, 1_000_123):
        a, cap_a, facts_a = render(i, 16)
        b, cap_b, facts_b = render(i, 16)
        assert a.tobytes() == b.tobytes() and cap_a == cap_b and facts_a == facts_b
        assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
        _, cap_32, facts_32 = render(i, 32)
        assert (cap_32, facts_32) == (cap_a, facts_a)
    assert render(0, 16)[0].tobytes() != render(1, 16)[0].tobytes()


def test_dataset_splits_and_items() -> None:
    train = build_dataset("shapes", None, 16, "train", shapes_train_size=100)
    val = build_dataset("shapes", "ignored", 16, "val")
    assert len(train) == 100 and len(val) == 2000
    assert (train.channels, train.num_classes, train.class_names) == (3, 0, None)
    image, caption, class_id = val[5]
    ref, ref_caption, _ = render(1_000_005, 16)
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert torch.equal(image, torch.from_numpy(ref).permute(2, 0, 1))
    assert (caption, class_id) == (ref_caption, -1)
    assert val.captions()[:10] == [val[i][1] for i in range(10)]
    assert len(build_dataset("shapes", None, 8).captions()) == 50_000
    with pytest.raises(IndexError):
        train[100]
    for bad in (7, 65):
        with pytest.raises(DatasetError, match=r"8\.\.64"):
            build_dataset("shapes", None, bad)


def test_pixels_are_two_palette_colours_and_geometry_follows_the_grammar(rendered16) -> None:
    for s in (16, 32, 64):
        for i in range(200):
            img, _, facts = render(i, s) if s != 16 else rendered16[i]
            colours = {tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0).tolist()}
            assert colours == {BACKGROUND_RGB[facts["background"]], PALETTE[facts["colour"]]}
            fg = np.any(img != BACKGROUND_RGB[facts["background"]], axis=-1)
            ys, xs = np.nonzero(fg)
            side = {"small": 0.3, "large": 0.55}[facts["size"]] * s
            assert xs.max() - xs.min() + 1 == round(side) and ys.max() - ys.min() + 1 == round(side)
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            fx, fy = POSITION_CENTRE[facts["position"]]
            for c, f, lo, hi in ((cx, fx, xs.min(), xs.max()), (cy, fy, ys.min(), ys.max())):
                clamped = lo == 0 or hi == s - 1
                assert clamped or abs(c - f * s) <= 0.04 * s + 0.5
            if facts["shape"] == "triangle":  # upward and mirror-symmetric
                box = fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                assert np.array_equal(box, box[:, ::-1])
                assert box[0].sum() < box[-1].sum() == box.shape[1]


def test_caption_grammar_and_paraphrase_rates(rendered16) -> None:
    allowed = set(" ".join(COLOURS + SHAPES + SIZES + POSITIONS + BACKGROUNDS).split())
    allowed |= {"a", "in", "the", "on", "background"}
    forms = [0, 0, 0]
    for _, caption, facts in rendered16:
        assert set(re.sub(",", " ", caption).split()) <= allowed, caption
        assert parse_caption(caption) == facts
        form = [make_prompt(**facts, form=f) for f in range(3)].index(caption)
        forms[form] += 1
    rates = [n / N_CAPTIONS for n in forms]
    assert 0.26 <= rates[1] + rates[2] <= 0.34, rates
    assert 0.11 <= rates[1] <= 0.19 and 0.11 <= rates[2] <= 0.19, rates
    assert {f["colour"] for *_, f in rendered16} == set(COLOURS)
    assert {f["position"] for *_, f in rendered16} == set(POSITIONS)


def test_make_prompt_and_parse_caption_forms() -> None:
    assert make_prompt("red", "circle", "center", "small", "white") == (
        "a small red circle in the center on a white background")
    assert make_prompt("blue", "square", "top left", "large", "black", form=1) == (
        "blue square, large, top left, black background")
    assert make_prompt("green", "triangle", "bottom right", "small", "gray", form=2) == (
        "a green triangle on gray, small, bottom right")
    facts = {"colour": "green", "shape": "triangle", "position": "bottom right",
             "background": "gray", "size": "small"}
    assert parse_caption("  a green triangle on gray,  small, bottom right ") == facts
    for bad in ("a large crimson circle in the upper left on a white background", "a photo"):
        with pytest.raises(DatasetError, match="not in the shapes grammar"):
            parse_caption(bad)
    with pytest.raises(DatasetError, match="colour"):
        make_prompt("crimson", "circle", "center", "small", "white")


@pytest.mark.parametrize("size,count", [(16, 1500), (32, 500)])
def test_analyser_reads_back_the_generator(size: int, count: int, rendered16) -> None:
    # Half train indices, half validation indices.
    indices = [i if i % 2 else 1_000_000 + i for i in range(count)]
    exact = sizes = 0
    for i in indices:
        img, _, facts = rendered16[i] if size == 16 and i < N_CAPTIONS else render(i, size)
        got = analyse(img)
        assert set(got) == set(facts)
        exact += all(got[k] == facts[k] for k in FOUR)
        sizes += got["size"] == facts["size"]
    assert exact / count >= 0.99 and sizes / count >= 0.99, (exact / count, sizes / count)


def test_analyser_takes_tensors_and_blank_images() -> None:
    img, _, facts = render(3, 24)
    assert analyse(torch.from_numpy(img).permute(2, 0, 1)) == facts
    blank = np.full((16, 16, 3), BACKGROUND_RGB["black"], dtype=np.uint8)
    assert analyse(blank) == {"colour": None, "shape": None, "position": None,
                              "background": "black", "size": None}
    with pytest.raises(DatasetError, match="RGB"):
        analyse(np.zeros((16, 16), dtype=np.uint8))


def test_training_split_has_partial_captions_and_varied_geometry() -> None:
    """Training captions: about half name a non-empty subset of the facts, in the grammar's
    words; training images: the same facts with varied geometry (the analyser still reads
    them back). Validation stays the grammar, pixel for pixel."""
    from training.datasets.shapes import PARTIAL_PROB, ShapesDataset

    n = 400
    train = ShapesDataset(16, "train", shapes_train_size=n)
    caps = train.captions()
    assert caps == ShapesDataset(16, "train", shapes_train_size=n).captions()
    partial = []
    for i, cap in enumerate(caps):
        facts = render(i, 16)[2]
        try:
            assert parse_caption(cap) == facts
        except DatasetError:
            partial.append((cap, facts))
    assert abs(len(partial) / n - PARTIAL_PROB) < 0.1
    short = 0
    for cap, facts in partial:
        named = [k for k in ("colour", "shape", "size", "background") if str(facts[k]) in cap]
        named += ["position"] if f"in the {facts['position']}" in cap else []
        assert named, cap  # at least one fact, and only true ones: no other word of a vocab
        for vocab in (COLOURS, SHAPES, SIZES, BACKGROUNDS):
            said = [w for w in vocab if re.search(rf"\b{w}\b", cap)]
            assert len(said) <= 1 and all(w in facts.values() for w in said), cap
        short += cap == f"a {facts['colour']} {facts['shape']}"
    assert short >= 3  # "a red circle" is among them
    varied = sum(not np.array_equal(train[i][0].permute(1, 2, 0).numpy(), render(i, 16)[0])
                 for i in range(100))
    assert varied > 50
    read = [analyse(train[i][0]) for i in range(100)]
    ok = sum(all(r[k] == render(i, 16)[2][k] for k in FOUR) for i, r in enumerate(read))
    assert ok >= 90
    val = ShapesDataset(16, "val")
    assert val.captions()[:50] == [render(1_000_000 + i, 16)[1] for i in range(50)]
    assert torch.equal(val[3][0], torch.from_numpy(render(1_000_003, 16)[0]).permute(2, 0, 1))
