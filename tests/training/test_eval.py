"""`promptpix eval`: bits/dim, shapes alignment per guidance scale, digits CAS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import load_checkpoint
from tests.training.train_helpers import TINY
from training.cli import train_base_main, train_main
from training.evaluate import main as eval_main
from training.evaluate import shapes_prompts


def test_shapes_prompts_are_in_the_grammar() -> None:
    from training.datasets.shapes import parse_caption

    prompts = shapes_prompts(50, "large", seed=3)
    assert prompts == shapes_prompts(50, "large", seed=3)
    facts = [parse_caption(p) for p in prompts]
    assert {f["size"] for f in facts} == {"large"}
    assert len({f["colour"] for f in facts}) > 3


def test_eval_shapes(tmp_path: Path, one_thread: None,
                     capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck)]) == 0
    out = tmp_path / "eval.json"
    rc = eval_main(["--checkpoint", str(ck / "best_model.pth"), "--num_samples", "4",
                    "--val_samples", "8", "--guidance_scale", "1", "2", "--output", str(out),
                    "--set_default_guidance"])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = res["by_guidance_scale"]
    best = max(rows, key=lambda g: rows[g]["colour+shape+position"])
    _, meta = load_checkpoint(ck / "best_model.pth")  # rewritten, still loadable
    assert meta["default_guidance_scale"] == res["default_guidance_scale_set"] == float(best)
    assert res["dataset"] == "shapes" and res["val_bpd"] > 0 and res["val_images"] == 8
    assert set(res["by_guidance_scale"]) == {"1", "2"}
    row = res["by_guidance_scale"]["2"]
    for key in ("colour", "shape", "position", "colour+shape+position"):
        assert 0.0 <= row[key] <= 1.0
    assert row["n"] == 4
    assert "guidance" in capsys.readouterr().out


def test_eval_digits_classification_accuracy(tmp_path: Path, one_thread: None) -> None:
    ck = tmp_path / "digits"
    flags = [*TINY, "--dataset", "digits", "--max_steps", "2", "--checkpoint_dir", str(ck)]
    assert train_base_main(flags) == 0
    out = tmp_path / "d.json"
    assert eval_main(["--checkpoint", str(ck / "best_model.pth"), "--num_samples", "10",
                      "--val_samples", "20", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classifier_real_val_accuracy"] > 0.8  # the classifier itself is sound
    assert 0.0 <= res["by_guidance_scale"]["1"]["classification_accuracy_score"] <= 1.0


def test_eval_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_main(["--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "none.pth" in capsys.readouterr().err
