"""bench/gpu.py runs end to end at tiny sizes on CPU, and exits cleanly without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_gpu_script_without_cuda_says_so_and_exits_0() -> None:
    r = _run("bench/gpu.py")
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout


def test_gpu_script_dry_run_exercises_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    r = _run("bench/gpu.py", "--dry-run", "--write", str(out))
    assert r.returncode == 0, r.stderr
    table = out.read_text()
    for figure in ("cached vs full-forward logits", "seeds reproduce", "sample 4 x",
                   "train 4x4", "train 8x8", "px/s at batch 2, static decode step",
                   "px/s at batch 2, eager decode", "return_bits", "total time"):
        assert figure in table, (figure, table)
    assert "FAIL" not in table and "skipped" not in table and "out of memory" not in table


def test_batching_bench_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    r = _run("bench/batching.py", "--jobs", "2", "--size", "4", "--hidden", "32",
             "--layers", "1", "--repeats", "1", "--write", str(out))
    assert r.returncode == 0, r.stderr
    assert "one batch of 2 jobs" in out.read_text()
