"""Evaluations show progress and can be stopped: SIGTERM or Ctrl-C during validation or the
sample grid saves latest.pth and exits within 10 s; a second Ctrl-C quits at once. Output
redirected to a file is a log line per interval, not tqdm's carriage-return frames."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.train_helpers import PY, REPO, TINY, env

# 16x16 images, 2,000 validation images: a validation pass of several seconds here.
SLOW_EVAL = [*TINY, "--image_size", "16", "--hidden_dim", "64", "--max_steps", "2",
             "--eval_every", "1", "--val_samples", "2000", "--num_sample_images", "4",
             "--log_every", "1"]


def _start(ck: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:  # stderr is a file, as in `docker logs` or `> train.log`
        return subprocess.Popen([PY, "train_llm_prompt.py", *SLOW_EVAL, "--checkpoint_dir",
                                 str(ck), *extra], cwd=REPO, env=env(1),
                                stdout=subprocess.DEVNULL, stderr=fh)


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen[bytes],
                   timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before {text!r}:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{text!r} did not appear in {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], signum: int) -> float:
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return time.monotonic() - t0


def test_sigterm_during_validation_saves_and_exits(tmp_path: Path) -> None:
    from model import load_checkpoint

    ck, log = tmp_path / "ck", tmp_path / "train.log"
    proc = _start(ck, log)
    _wait_for_text(log, "validation: 0/", proc)
    time.sleep(0.5)
    seconds = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    print(f"\nexit {seconds:.2f} s after SIGTERM during validation")
    assert proc.returncode == 0, text[-3000:]
    assert seconds < 10, seconds
    meta = load_checkpoint(ck / "latest.pth")[1]
    assert meta["train_state"]["step"] == 1 and meta["train_state"]["eval_pending"] is True
    assert "validation: 1000/" not in text  # it was cut short
    # The run summary, and no carriage-return frames in a log file.
    assert "run stopped (SIGTERM) at step 1 of 2" in text
    assert "no best checkpoint yet" in text and "--resume" in text
    assert "\r" not in text
    assert "training: 0/2 step" in text

    # --resume redoes the interrupted evaluation first, then finishes the run.
    log2 = tmp_path / "resume.log"
    with log2.open("wb") as fh:
        subprocess.run([PY, "train_llm_prompt.py", *SLOW_EVAL, "--val_samples", "16",
                        "--checkpoint_dir", str(ck), "--resume"], cwd=REPO, env=env(1),
                       stdout=subprocess.DEVNULL, stderr=fh, timeout=300, check=True)
    from tests.training.train_helpers import read_log

    assert [r["step"] for r in read_log(ck, "val")] == [1, 2]
    text = log2.read_text()
    assert "run finished: 2 steps" in text
    best = (ck / "best_model.pth").resolve()
    assert f"serve it: PROMPTPIX_CHECKPOINT={best} make up" in text
    assert "validation " in text and "bits/dim (step " in text


def test_ctrl_c_during_sample_grid_saves_and_exits(tmp_path: Path) -> None:
    from model import load_checkpoint

    ck, log = tmp_path / "ck", tmp_path / "train.log"
    proc = _start(ck, log, "--val_samples", "16", "--num_sample_images", "8",
                  "--sample_prompts", "a", "b", "c", "d", "e", "f", "g", "h")
    _wait_for_text(log, "sample grid (64 images): 0/", proc)
    time.sleep(0.3)
    seconds = _stop(proc, signal.SIGINT)
    text = log.read_text()
    print(f"\nexit {seconds:.2f} s after Ctrl-C during the sample grid")
    assert proc.returncode == 0, text[-3000:]
    assert seconds < 10, seconds
    assert "Ctrl-C: stopping" in text and "run stopped (Ctrl-C) at step 1" in text
    # Validation had finished: its best checkpoint counts, the grid does not.
    meta = load_checkpoint(ck / "latest.pth")[1]
    assert meta["train_state"]["step"] == 1 and meta["train_state"]["eval_pending"] is False
    assert (ck / "best_model.pth").is_file() and not (ck / "samples").exists()
    assert "serve it: PROMPTPIX_CHECKPOINT=" in text


def test_second_ctrl_c_quits_at_once() -> None:
    from training.stopping import StopSignals

    with pytest.raises(KeyboardInterrupt), StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.reason == "Ctrl-C"
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding the Ctrl-C: not a second
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_cpu_defaults_keep_an_evaluation_short(tmp_path: Path, one_thread: None) -> None:
    """--val_samples / --num_sample_images 0 (the defaults): 100 images and one sample a
    prompt on a CPU (1000 and 4 on a GPU); an explicit value is kept."""
    from training.config import parse_train_args
    from training.distributed import DistInfo
    from training.trainer import Trainer

    cfg = parse_train_args([])
    assert (cfg.val_samples, cfg.num_sample_images) == (0, 0)
    t = Trainer(parse_train_args([*TINY, "--val_samples", "0", "--num_sample_images", "0",
                                  "--checkpoint_dir", str(tmp_path / "a")]), DistInfo())
    assert (t.val_samples, t.num_sample_images) == (100, 1)
    t = Trainer(parse_train_args([*TINY, "--val_samples", "7", "--num_sample_images", "3",
                                  "--checkpoint_dir", str(tmp_path / "b")]), DistInfo())
    assert (t.val_samples, t.num_sample_images) == (7, 3)
