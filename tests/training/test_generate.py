"""Local sampling helpers: safe readable names, prompt files, grids, reproducible seeds."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from training.generate import SampleOptions, generate_to_dir, read_prompt_file, unique_slugs
from training.images import make_grid, slugify


def _tiny_model() -> torch.nn.Module:
    from model import ModelConfig, PromptPix
    from model.tokenizers import build_tokenizer

    tok = build_tokenizer("word", ["a red circle", "a blue square"], 64)
    cfg = ModelConfig(image_size=4, hidden_dim=16, num_layers=1, num_heads=2,
                      text_embed_dim=16, num_text_layers=1, text_nhead=2,
                      max_text_length=16, vocab_size=len(tok))
    torch.manual_seed(0)
    return PromptPix(cfg, tokenizer=tok)


def test_slugify_is_safe() -> None:
    assert slugify("A Photo of a Cat!") == "a-photo-of-a-cat"
    for hostile in ("../../etc/passwd", "/abs/path", "a\x00b", "..", "C:\\x"):
        s = slugify(hostile)
        assert "/" not in s and "\\" not in s and ".." not in s and "\x00" not in s and s
    assert slugify("") == "prompt" and len(slugify("x" * 500)) <= 60


def test_unique_slugs() -> None:
    assert unique_slugs(["a cat", "A cat!", "", "dog"]) == [
        "a-cat", "a-cat-2", "unconditional", "dog"]


def test_prompt_file_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("a cute cat\n\n  \n  a red car  \n")
    assert read_prompt_file(f) == ["a cute cat", "a red car"]


def test_grid_shape() -> None:
    grid = make_grid(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), nrow=3, pad=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)


def test_seeds_reproduce_images_whatever_the_batch(tmp_path: Path) -> None:
    model = _tiny_model()
    a = generate_to_dir(model, ["a red circle"], tmp_path / "a",
                        SampleOptions(num_images=3, batch_size=3, seed=5), show_progress=False)
    b = generate_to_dir(model, ["a red circle"], tmp_path / "b",
                        SampleOptions(num_images=3, batch_size=1, seed=5), show_progress=False)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert Image.open(a[0]).size == (4, 4)
