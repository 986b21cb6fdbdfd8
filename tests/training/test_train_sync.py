"""The training loop reads the device once per log interval (as nanoGPT does), not three
times a step: one record per interval, and a non-finite loss is still caught there,
before anything is saved."""

from __future__ import annotations

from pathlib import Path

from tests.training.train_helpers import TINY, read_log, run_script
from training.cli import train_main


def test_one_record_per_log_interval(tmp_path: Path, one_thread: None) -> None:
    ck = tmp_path / "ck"
    # 64 images / batch 8: 8 steps an epoch, evaluated at its end (step 8) and at step 12.
    assert train_main([*TINY, "--max_steps", "12", "--log_every", "5", "--num_sample_images",
                       "1", "--checkpoint_dir", str(ck)]) == 0
    train = read_log(ck)
    # Records at the interval (5, 10) and where an evaluation ends it early (8, 12).
    assert [(r["step"], r["steps"]) for r in train] == [(5, 5), (8, 3), (10, 2), (12, 2)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in read_log(ck, "val")] == [8, 12]


def test_nonfinite_loss_is_caught_at_the_interval(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    proc = run_script(["train_llm_prompt.py", *TINY, "--max_steps", "8", "--log_every", "4",
                       "--save_freq", "4", "--lr", "1e30", "--grad_clip", "0",
                       "--warmup_steps", "0", "--checkpoint_dir", str(ck)], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: loss is nan at step 2; nothing was saved" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (ck / "latest.pth").exists()  # the save at step 4 never wrote NaN weights
    assert read_log(ck) == []
