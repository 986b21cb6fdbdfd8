"""Exact resume: N steps in one go == N/2 steps, stop, --resume, N/2 more."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.train_helpers import TINY, raw_weights, read_log
from training.cli import train_main


def test_resume_is_exact(tmp_path: Path, one_thread: None) -> None:
    from model import load_checkpoint

    # 64 images / batch 8 = 8 steps an epoch: the stop at step 5 is mid-epoch, so the
    # sampler position matters; EMA and condition dropout exercise their saved state.
    # --lr_decay_steps pins the schedule so the half run has the same one as the full run.
    flags = [*TINY, "--ema", "0.9", "--cond_drop_prob", "0.3", "--lr_decay_steps", "10",
             "--eval_every", "4", "--num_sample_images", "1", "--log_every", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_main([*flags, "--max_steps", "10", "--checkpoint_dir", str(a)]) == 0
    assert train_main([*flags, "--max_steps", "5", "--checkpoint_dir", str(b)]) == 0
    assert load_checkpoint(b / "latest.pth")[1]["train_state"]["batch_in_epoch"] == 5
    assert train_main([*flags, "--max_steps", "10", "--checkpoint_dir", str(b),
                       "--resume"]) == 0

    wa, wb = raw_weights(a / "latest.pth"), raw_weights(b / "latest.pth")
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-5, diff
    ema_a = load_checkpoint(a / "latest.pth")[0].state_dict()
    ema_b = load_checkpoint(b / "latest.pth")[0].state_dict()
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-5
    # Same loss curve, and the resumed run appended to the same log.
    la = [(r["step"], r["loss"]) for r in read_log(a)]
    lb = [(r["step"], r["loss"]) for r in read_log(b)]
    assert [s for s, _ in lb] == list(range(1, 11))
    for (sa, xa), (sb, xb) in zip(la, lb, strict=True):
        assert sa == sb and abs(xa - xb) <= 1e-5
    meta = load_checkpoint(b / "best_model.pth")[1]
    assert meta["ema"] is True


def test_resume_follows_this_runs_schedule(tmp_path: Path, one_thread: None) -> None:
    """Resuming to train longer (a longer --lr_decay_steps, another --lr) continues with the
    new flags' schedule from the saved step, not the first run's."""
    from training.state import lr_factor

    ck = tmp_path / "s"
    flags = [*TINY, "--warmup_steps", "2", "--num_sample_images", "1", "--log_every", "1",
             "--checkpoint_dir", str(ck)]
    assert train_main([*flags, "--max_steps", "4", "--lr_decay_steps", "4", "--lr", "1e-3"]) == 0
    assert train_main([*flags, "--max_steps", "8", "--lr_decay_steps", "20", "--lr", "2e-3",
                       "--resume"]) == 0
    lrs = {r["step"]: r["lr"] for r in read_log(ck)}
    # The log's lr at step s is the rate after s optimizer steps (what step s+1 uses).
    for s in range(1, 5):
        assert lrs[s] == pytest.approx(1e-3 * lr_factor(s, 2, 4, 0.1), rel=1e-6), s
    for s in range(5, 9):
        assert lrs[s] == pytest.approx(2e-3 * lr_factor(s, 2, 20, 0.1), rel=1e-6), s
    assert lrs[5] > 2 * lrs[4]  # off the first run's floor


def test_resume_from_best_model_is_refused(tmp_path: Path, one_thread: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "c"
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck)]) == 0
    rc = train_main([*TINY, "--max_steps", "4", "--checkpoint_dir", str(ck),
                     "--resume", str(ck / "best_model.pth")])
    assert rc == 1
    assert "train_state" in capsys.readouterr().err


def test_bits_per_dim_goes_down(tmp_path: Path, one_thread: None) -> None:
    """A few hundred steps on shapes drive validation bits/dim well below the start."""
    ck = tmp_path / "conv"
    flags = [*TINY, "--shapes_train_size", "512", "--lr", "3e-3", "--warmup_steps", "20",
             "--max_steps", "240", "--eval_every", "120", "--log_every", "10",
             "--val_samples", "64", "--prior_samples", "512", "--sample_prompts", "a",
             "--num_sample_images", "1"]
    assert train_main([*flags, "--checkpoint_dir", str(ck)]) == 0
    train = read_log(ck)
    first = train[0]["bpd"]  # the mean of steps 1-10
    val = [r["val_bpd"] for r in read_log(ck, "val")]
    assert val[-1] < val[0] < first
    assert val[-1] < 0.4 * first, (first, val)  # measured: 2.09 -> 0.25 -> 0.16


def test_fresh_run_does_not_overwrite_a_stored_run(tmp_path: Path, one_thread: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The same command run again without --resume would replace the stored run's
    latest.pth and best_model.pth (the served model) at its first evaluation: refused."""
    ck = tmp_path / "c"
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck)]) == 0
    stored = {n: (ck / n).read_bytes() for n in ("latest.pth", "best_model.pth")}
    log_lines = (ck / "train_log.jsonl").read_text()
    capsys.readouterr()
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck)]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "latest.pth" in err and str(ck) in err
    assert {n: (ck / n).read_bytes() for n in stored} == stored
    assert (ck / "train_log.jsonl").read_text() == log_lines
    # Only best_model.pth (a copied-in model, no latest.pth): --resume has nothing to
    # continue and starts fresh, which must not replace it either.
    (ck / "latest.pth").unlink()
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck), "--resume"]) == 1
    assert "best_model.pth" in capsys.readouterr().err
    assert (ck / "best_model.pth").read_bytes() == stored["best_model.pth"]
