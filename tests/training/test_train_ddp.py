"""DDP on CPU (gloo): `--world_size 2` spawns two ranks that stay in lockstep."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.train_helpers import TINY, read_log, run_script


def _check_run(ck: Path, steps: int) -> None:
    from model import load_checkpoint

    val = read_log(ck, "val")
    assert [r["step"] for r in val] == list(range(1, steps + 1))
    for r in val:  # every rank's weights hashed after each step: identical
        assert len(r["rank_weights"]) == 2 and len(set(r["rank_weights"])) == 1
    _, meta = load_checkpoint(ck / "latest.pth")
    assert meta["world_size"] == 2 and meta["train_state"]["step"] == steps
    assert len(meta["train_state"]["rng"]) == 2  # one RNG state per rank, for exact resume
    # Only rank 0 logs: one record per step.
    assert [r["step"] for r in read_log(ck)] == list(range(1, steps + 1))


def test_world_size_2_spawn(tmp_path: Path) -> None:
    ck = tmp_path / "ddp"
    run_script(["train_llm_prompt.py", *TINY, "--batch_size", "4", "--world_size", "2",
                "--max_steps", "2", "--eval_every", "1", "--num_sample_images", "1",
                "--checkpoint_dir", str(ck)], timeout=180)
    _check_run(ck, 2)


@pytest.mark.slow
def test_torchrun(tmp_path: Path) -> None:
    ck = tmp_path / "ddp"
    # `torchrun` is `python -m torch.distributed.run`; the module form needs no PATH entry.
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "train_llm_prompt.py", *TINY, "--batch_size", "4", "--max_steps", "2",
                "--eval_every", "1", "--num_sample_images", "1", "--checkpoint_dir", str(ck)],
               timeout=240)
    _check_run(ck, 2)
