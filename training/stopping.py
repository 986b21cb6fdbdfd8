"""Stopping a run from outside: SIGTERM (`docker stop`, torchrun, a scheduler) and a first
Ctrl-C ask for a stop at the next safe point: the trainer writes latest.pth and exits 0,
also from the middle of a validation pass or a sample grid. A second Ctrl-C quits at once
(KeyboardInterrupt; latest.pth keeps the last save)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised inside the loop when a stop was asked for; the trainer saves latest.pth."""


class StopSignals:
    """Context manager installing the SIGTERM / SIGINT handlers of a run (main thread)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.reason = ""
        self.sigints = 0
        self.announce = announce  # rank 0 says what happens; the other ranks stay quiet
        self._old: dict[int, Any] = {}
        self._raise = False  # inside `interruptible()`: a stop raises TrainingStopped at once

    def __enter__(self) -> StopSignals:
        self._old = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_term),
                     signal.SIGINT: signal.signal(signal.SIGINT, self._on_int)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def interruptible(self, enabled: bool = True) -> Iterator[None]:
        """Within it a stop raises TrainingStopped from the signal handler, i.e. between two
        Python operations of a forward pass: for work that changes no training state (an
        evaluation), so a stop need not wait for a 10-second forward on a CPU to finish.
        Under DDP the ranks must leave together, so the trainer polls `requested` instead."""
        if enabled and self.requested:
            raise TrainingStopped
        self._raise = enabled
        try:
            yield
        finally:
            self._raise = False

    def _request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason
        if self._raise:
            self._raise = False  # once: a second signal must not interrupt the unwinding
            raise TrainingStopped

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        if self.announce and not self.requested:
            log.warning("SIGTERM: stopping at the next safe point and saving latest.pth")
        self._request("SIGTERM")

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        # Counted apart from SIGTERM: a launcher may forward a Ctrl-C as SIGTERM, and that
        # must not make the user's first Ctrl-C look like a second one.
        self.sigints += 1
        if self.sigints > 1:
            raise KeyboardInterrupt
        if self.announce:
            log.warning("Ctrl-C: stopping at the next safe point and saving latest.pth "
                        "(Ctrl-C again quits at once, without saving)")
        self._request("Ctrl-C")


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C reaches the whole process group, and a
    worker that dies of it breaks the loader the trainer still reads while it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
