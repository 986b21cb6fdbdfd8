"""Training under faults: SIGKILL at random points then --resume gives the uninterrupted
run's weights; a hostile dataset cannot make the trainer write outside its folder.

tests/training/test_train_signals.py already kills the trainer 3 times (15 in its slow
version) and checks that latest.pth always loads; tests/training/test_train_resume.py
checks one clean stop/resume. This adds the end-to-end claim: killed 10 times at random
moments (often inside a save), resumed each time, the final weights equal a run that was
never interrupted.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.train_helpers import PY, REPO, TINY, env, raw_weights

# Each kill cycle advances a handful of steps (first save + up to 0.3 s, ~70 ms a step on
# an idle 2-core machine): 10 cycles must end well before the run does.
MAX_STEPS = 120
FLAGS = [*TINY, "--max_steps", str(MAX_STEPS), "--save_freq", "1", "--lr_decay_steps",
         str(MAX_STEPS), "--eval_every", "1000", "--num_sample_images", "1"]


def _train(ck: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "train_llm_prompt.py", *FLAGS, "--checkpoint_dir", str(ck),
                             *extra], cwd=REPO, env=env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _saved_step(ck: Path) -> int:
    from model import load_checkpoint

    return int(load_checkpoint(ck / "latest.pth")[1]["train_state"]["step"])


def _kill_and_resume(tmp: Path, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    full, cut = tmp / "full", tmp / "cut"
    proc = _train(full)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]

    steps_at_kill = []
    for i in range(kills):
        proc = _train(cut, *(["--resume"] if i else []))
        latest = cut / "latest.pth"
        before = latest.stat().st_mtime_ns if latest.exists() else 0
        # Wait for this run's first save, then kill at a random moment of the next ones
        # (a save of this tiny model is a large share of each step).
        end = time.monotonic() + 120
        while not latest.exists() or latest.stat().st_mtime_ns == before:
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < end, "no save within 120 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
        step = _saved_step(cut)  # never corrupt: it loads every time
        assert step < MAX_STEPS, "the run finished before it could be killed"
        assert not steps_at_kill or step >= steps_at_kill[-1]
        steps_at_kill.append(step)
    proc = _train(cut, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert _saved_step(cut) == _saved_step(full) == MAX_STEPS
    wa, wb = raw_weights(full / "latest.pth"), raw_weights(cut / "latest.pth")
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-6, diff
    leftovers = [p.name for p in cut.iterdir() if ".tmp" in p.name]
    return {"kills": kills, "steps_at_kill": steps_at_kill, "max_abs_weight_diff": diff,
            "temp_files_left": leftovers}


@pytest.mark.slow
def test_ten_sigkills_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    figures = _kill_and_resume(tmp_path, kills=10)
    print("\ntraining kill figures:", figures)


def test_hostile_dataset_cannot_write_outside_checkpoint_dir(tmp_path: Path) -> None:
    """A folder dataset whose metadata names files outside it is refused before training;
    captions full of paths and control characters train, and every file the trainer
    writes lands under --checkpoint_dir."""
    from PIL import Image

    from training.cli import train_main

    data, ck = tmp_path / "data", tmp_path / "ck"
    data.mkdir()
    captions = ["../../../pwned", "/tmp/promptpix-pwned", "a\x00b\x1b[2J", "..\\..\\x",
                "samples/../../escape", "%2e%2e/%2e%2e/x"]
    rows = []
    for i in range(24):  # the folder reader holds out 1 in 20 for validation
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": captions[i % len(captions)]})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outside_before = sorted(p for p in tmp_path.rglob("*") if ck not in p.parents)
    flags = list(TINY)
    flags[flags.index("shapes")] = "folder"
    i = flags.index("--shapes_train_size")
    del flags[i:i + 2]
    rc = train_main([*flags, "--data_root", str(data), "--max_steps", "2", "--batch_size",
                     "2", "--val_samples", "2", "--prior_samples", "6",
                     "--sample_prompts", "../../../evil", "--checkpoint_dir", str(ck)])
    assert rc == 0
    outside_after = sorted(p for p in tmp_path.rglob("*") if ck not in p.parents and p != ck)
    assert outside_after == [p for p in outside_before if p != ck]
    assert not Path("/tmp/promptpix-pwned").exists()
    assert (ck / "latest.pth").exists()

    # A metadata row that points outside the folder stops the run before any write.
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png",
                                                     "text": "x"}) + "\n")
    ck2 = tmp_path / "ck2"
    assert train_main([*flags, "--data_root", str(data), "--max_steps", "1",
                       "--checkpoint_dir", str(ck2)]) != 0
    assert not (ck2 / "latest.pth").exists()
