"""The guide's three commands, scaled down, run end to end from the repository root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.training.train_helpers import TINY, run_script


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python train_llm_prompt.py ...` (the guide's form, tiny): checkpoints and samples."""
    ckpt = tmp_path_factory.mktemp("llm") / "checkpoints_llm"
    run_script(["train_llm_prompt.py", *TINY, "--num_epochs", "100", "--max_steps", "6",
                "--eval_every", "3", "--use_frequency_prior", "True",
                "--checkpoint_dir", str(ckpt),
                "--sample_prompts", "a large red circle in the center on a white background"])
    return ckpt


def test_train_llm_prompt_writes_checkpoints_and_samples(llm_run: Path) -> None:
    from model import load_checkpoint

    assert (llm_run / "latest.pth").is_file() and (llm_run / "best_model.pth").is_file()
    model, meta = load_checkpoint(llm_run / "best_model.pth")
    assert model.config.image_size == 8 and model.config.use_text
    assert meta["dataset"] == "shapes" and meta["steps"] in (3, 6)
    assert meta["val_bpd"] > 0 and meta["default_guidance_scale"] == 1.0
    assert meta["example_prompts"] and all(isinstance(p, str) for p in meta["example_prompts"])
    assert meta["train_args"]["hidden_dim"] == 32 and meta["ema"] is False
    assert "train_state" not in meta  # best_model.pth is for serving
    latest = load_checkpoint(llm_run / "latest.pth")[1]
    assert latest["train_state"]["step"] == 6
    grids = sorted((llm_run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    records = [json.loads(line) for line in (llm_run / "train_log.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    # One record per log interval (--log_every 10), cut short by each evaluation: the mean
    # loss of the steps since the last record.
    assert [(r["step"], r["steps"]) for r in train] == [(3, 3), (6, 3)]
    assert {"loss", "bpd", "lr", "tokens_per_s"} <= set(train[0])


def test_generate_llm_prompt_single_prompt(llm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "generated_llm"
    proc = run_script(["generate_llm_prompt.py", "--checkpoint", str(llm_run / "best_model.pth"),
                       "--prompt", "a small blue square in the top left on a black background",
                       "--output_dir", str(out), "--num_images", "3", "--temperature", "1.0",
                       "--seed", "7", "--batch_size", "2"])
    names = sorted(p.name for p in out.iterdir())
    stem = "a-small-blue-square-in-the-top-left-on-a-black-background"
    assert names == [f"{stem}_000_seed7.png", f"{stem}_001_seed8.png", f"{stem}_002_seed9.png",
                     f"{stem}_grid.png"]
    for name in names[:3]:
        assert Image.open(out / name).size == (8, 8)
    assert Image.open(out / names[3]).size[0] > 8
    assert "seed 7" in proc.stdout


def test_generate_llm_prompt_prompt_file(llm_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cute cat playing with a ball\n\n   \n../../etc/passwd\n")
    out = tmp_path / "gen"
    run_script(["generate_llm_prompt.py", "--checkpoint", str(llm_run / "best_model.pth"),
                "--prompt_file", str(prompts), "--output_dir", str(out), "--num_images", "1",
                "--seed", "0"])
    names = sorted(p.name for p in out.iterdir())
    # Two prompts (blank lines skipped); the hostile one stays inside the output folder.
    assert names == ["a-cute-cat-playing-with-a-ball_000_seed0.png",
                     "a-cute-cat-playing-with-a-ball_grid.png",
                     "etc-passwd_000_seed0.png", "etc-passwd_grid.png"]


def test_train_py_base_model(tmp_path: Path) -> None:
    """`python train.py --dataset ... --data_root ./data`: no text; labels when present."""
    from model import load_checkpoint

    ckpt = tmp_path / "checkpoints"
    base = list(TINY)
    base[base.index("shapes")] = "digits"
    run_script(["train.py", *base, "--data_root", "./data", "--max_steps", "3",
                "--checkpoint_dir", str(ckpt)])
    model, meta = load_checkpoint(ckpt / "best_model.pth")
    assert not model.config.use_text and model.config.num_classes == 10
    assert model.config.channels == 1
    grid = Image.open(sorted((ckpt / "samples").glob("*.png"))[-1])
    assert grid.mode == "L"


def test_help_runs_from_root() -> None:
    proc = run_script(["train_llm_prompt.py", "--help"])
    for flag in ("--vocab_size", "--use_frequency_prior", "--world_size", "--ema", "--resume"):
        assert flag in proc.stdout
    assert "50257" in proc.stdout
