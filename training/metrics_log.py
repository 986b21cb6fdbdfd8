"""Training metrics: one JSON object a line in `train_log.jsonl`, and TensorBoard if present."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to CHECKPOINT_DIR/train_log.jsonl (appending keeps a resumed run's
    curve in one file) and mirrors scalars to TensorBoard under CHECKPOINT_DIR/tb."""

    def __init__(self, directory: Path, tensorboard: bool = True) -> None:
        self.path = directory / "train_log.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                log.info("tensorboard not installed; logging to %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(directory / "tb"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def image(self, tag: str, step: int, image: Any) -> None:
        """A uint8 [C, H, W] image (the sample grid) to TensorBoard's Images tab."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="CHW")
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a train_log.jsonl (for tests and reports)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
