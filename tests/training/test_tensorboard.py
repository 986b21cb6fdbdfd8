"""TensorBoard is on by default (the `train` extra installs it): curves, the learning rate
and the sample grids as images, read back from the event files TensorBoard itself reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.train_helpers import TINY
from training.cli import train_main


def test_curves_lr_and_sample_grids_in_tensorboard(tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is in the train extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.config import parse_train_args

    assert parse_train_args([]).tensorboard is True
    ck = tmp_path / "ck"
    assert train_main([*TINY, "--tensorboard", "true", "--max_steps", "4", "--eval_every", "2",
                       "--log_every", "1", "--checkpoint_dir", str(ck)]) == 0
    acc = EventAccumulator(str(ck / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/bpd", "train/lr", "val/val_bpd"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/val_bpd")] == [2, 4]
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]
    assert images[0].encoded_image_string.startswith(b"\x89PNG")
    assert images[0].width > 8 and images[0].height > 8
