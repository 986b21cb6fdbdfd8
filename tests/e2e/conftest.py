"""Session fixtures of the end-to-end tests that share one stack (see api_stack.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.api_stack import Stack
from tests.worker.helpers import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16x16 model (its id is the file stem, `tiny16`)."""
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny16.pth", image_size=16)


@pytest.fixture(scope="package")
def api_stack(tmp_path_factory: pytest.TempPathFactory, tiny16: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("api_stack"), tiny16)
    try:
        yield s
    finally:
        s.close()


