"""The lines a run ends with (finished or stopped): where its best checkpoint is, how good,
after how many steps and how long, and the command that serves it."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from .progress import duration


@dataclass
class RunSummary:
    checkpoint_dir: Path
    step: int
    total_steps: int
    start_step: int
    seconds: float
    best_val: float
    best_step: int | None
    stopped_by: str = ""  # "SIGTERM", "Ctrl-C", or "" when the run finished

    def lines(self) -> list[str]:
        d = self.checkpoint_dir.resolve()
        best, latest = d / "best_model.pth", d / "latest.pth"
        head = (f"run stopped ({self.stopped_by}) at step {self.step} of {self.total_steps}"
                if self.stopped_by else f"run finished: {self.step} steps")
        out = [f"{head}; this session trained {self.step - self.start_step} steps in "
               f"{duration(self.seconds)}"]
        if best.is_file() and not math.isinf(self.best_val):
            at = f" (step {self.best_step})" if self.best_step is not None else ""
            out.append(f"best checkpoint: {best}: validation {self.best_val:.4f} bits/dim{at}")
            out.append(f"serve it: PROMPTPIX_CHECKPOINT={shlex.quote(str(best))} make up")
        else:
            out.append(f"no best checkpoint yet: no validation has finished ({d})")
        if self.stopped_by or self.step < self.total_steps:
            out.append(f"continue: the same command with --resume (from {latest})")
        return out
