"""Checkpoint writes survive a power cut: the file and the rename are both on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.worker.helpers import make_tiny_checkpoint


def test_checkpoint_write_fsyncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 15. os.fsync is only watched (the real call still runs)."""
    synced: list[tuple[bool, int]] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    path = make_tiny_checkpoint(tmp_path / "ckpt" / "tiny.pth", steps=1)
    folder_inode = os.stat(path.parent).st_ino
    assert (True, folder_inode) in synced
    # ...and the folder's fsync comes after the file's (i.e. after the rename).
    assert synced.index((True, folder_inode)) > next(
        i for i, (is_dir, _) in enumerate(synced) if not is_dir)
