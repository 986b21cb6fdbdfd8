"""`--init_from`: the guide's workflow, base model (train.py) first, then the text model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.train_helpers import TINY, run_script

# Shapes at 8x8: the base model learns the pixel statistics the text model then starts from.
DATA = ["--shapes_train_size", "256", "--prior_samples", "256", "--val_samples", "32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python train.py ...`: the base model (no text), trained for 60 steps."""
    ck = tmp_path_factory.mktemp("base") / "checkpoints"
    run_script(["train.py", *TINY, *DATA, "--max_steps", "60", "--lr", "3e-3",
                "--warmup_steps", "5", "--checkpoint_dir", str(ck)], timeout=300)
    return ck / "best_model.pth"


def _text_run(ck: Path, *extra: str) -> tuple[float, str]:
    from model import load_checkpoint

    proc = run_script(["train_llm_prompt.py", *TINY, *DATA, "--max_steps", "4", "--lr", "1e-3",
                       "--checkpoint_dir", str(ck), *extra], timeout=300)
    return float(load_checkpoint(ck / "latest.pth")[1]["val_bpd"]), proc.stderr


def test_text_model_from_base_beats_scratch(base: Path, tmp_path: Path) -> None:
    scratch, _ = _text_run(tmp_path / "scratch")
    warm, log = _text_run(tmp_path / "warm", "--init_from", str(base))
    print(f"\nval bits/dim after 4 steps: scratch {scratch:.3f}, from the base model {warm:.3f}")
    assert warm < scratch - 0.2, (warm, scratch)
    # It says what it loaded and what it did not.
    assert f"--init_from {base}: loaded" in log
    assert "blocks (" in log and "head (" in log
    assert "freshly initialised, not in the file: text (" in log
    assert "text_to_cond" in log


def test_loaded_weights_equal_the_files(base: Path) -> None:
    from model import ModelConfig, PromptPix, load_checkpoint
    from model.tokenizers import build_tokenizer
    from training.init_from import init_from_checkpoint

    src = load_checkpoint(base)[0].state_dict()
    tok = build_tokenizer(kind="word", captions=["a red circle"], vocab_size=50)
    cfg = ModelConfig(**{**load_checkpoint(base)[0].config.to_dict(), "use_text": True,
                         "text_embed_dim": 32, "num_text_layers": 1, "text_nhead": 2,
                         "max_text_length": 16, "vocab_size": len(tok)})
    model = PromptPix(cfg, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_checkpoint(model, base)
    after = model.state_dict()
    for name in report.loaded:
        assert torch.equal(after[name], src[name]), name
    for name in report.fresh:
        assert torch.equal(after[name], before[name]), name
    # Fresh: the text side (the encoder, its projections, the blocks' cross-attention).
    assert {"text", "text_to_cond", "text_to_ctx"} <= {n.split(".")[0] for n in report.fresh}
    assert all(n.startswith(("text", "blocks.")) for n in report.fresh)
    assert report.loaded_params > 0.5 * sum(p.numel() for p in model.parameters())


def test_another_format_version_is_refused(base: Path, tmp_path: Path) -> None:
    """A checkpoint of another token layout / format version: refused, nothing trained."""
    from model.checkpoint import FORMAT_VERSION

    payload = torch.load(base, weights_only=True)
    payload["format_version"] = FORMAT_VERSION - 1
    old = tmp_path / "old_layout.pth"
    torch.save(payload, old)
    proc = run_script(["train_llm_prompt.py", *TINY, "--max_steps", "2", "--init_from", str(old),
                       "--checkpoint_dir", str(tmp_path / "ck")], check=False)
    assert proc.returncode == 1
    assert "format_version" in proc.stderr and str(old) in proc.stderr
    assert not (tmp_path / "ck" / "latest.pth").exists()


def test_another_image_size_is_refused(base: Path, tmp_path: Path) -> None:
    flags = list(TINY)
    flags[flags.index("--image_size") + 1] = "16"
    proc = run_script(["train_llm_prompt.py", *flags, "--max_steps", "2", "--init_from",
                       str(base), "--checkpoint_dir", str(tmp_path / "ck")], check=False)
    assert proc.returncode == 1 and "token layout" in proc.stderr


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_script(["train_llm_prompt.py", "--init_from", str(tmp_path / "nope.pth")],
                      check=False)
    assert proc.returncode == 2 and "--init_from" in proc.stderr
