"""Shared bits of the training tests: tiny flags, running the seed's scripts from the root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# A model small enough to train in seconds on 2 shared cores: 8x8 RGB = 192 tokens.
TINY = [
    "--dataset", "shapes", "--image_size", "8", "--shapes_train_size", "64",
    "--hidden_dim", "32", "--num_layers", "2", "--text_embed_dim", "32",
    "--num_text_layers", "1", "--text_nhead", "2", "--max_text_length", "32",
    "--batch_size", "8", "--num_workers", "0", "--warmup_steps", "2",
    "--val_samples", "16", "--prior_samples", "64", "--num_sample_images", "2",
    "--tensorboard", "false",
]


def env(threads: int = 1) -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = str(REPO)
    return e


def run_script(args: list[str], timeout: float = 120, threads: int = 1,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python <script> args...` from the repository root, as a user types it."""
    proc = subprocess.run([PY, *args], cwd=REPO, env=env(threads), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def read_log(ckpt: Path, kind: str = "train") -> list[dict]:
    from training.metrics_log import read_log as _read

    return [r for r in _read(ckpt / "train_log.jsonl") if r["kind"] == kind]


def raw_weights(path: Path) -> dict:
    """The trained (not EMA) weights of a latest.pth."""
    from model import load_checkpoint

    model, meta = load_checkpoint(path)
    ts = meta["train_state"]
    return ts["model"] if ts.get("model") is not None else model.state_dict()
