"""Progress that reads well where it lands: a tqdm bar (with its ETA) on a terminal, and a
plain log line every N steps or seconds when stderr is a file, a pipe or `docker logs`
(where tqdm's carriage-return frames pile up into one unreadable line)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")

# Without a terminal, a long phase (validation, sampling, a header scan) says where it is
# at least this often.
LINE_EVERY_S = 30.0


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> Any: ...
    def close(self) -> Any: ...


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """4s, 3m05s, 1h02m03s."""
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress:
    """tqdm's update / set_postfix / close, written as one log line every `every_steps`
    updates or `every_s` seconds (whichever comes first), and at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0,
                 every_steps: int | None = None, every_s: float | None = LINE_EVERY_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._last_n = self._start_n = initial
        self.every_steps, self.every_s = every_steps, every_s
        self._t0 = self._last_t = time.monotonic()
        self.postfix = ""
        self._closed = False
        if total > initial:  # say at once that a long phase has begun, and how long it is
            self._emit(self._t0)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = (self.n >= self.total
               or (self.every_steps is not None and self.n - self._last_n >= self.every_steps)
               or (self.every_s is not None and now - self._last_t >= self.every_s))
        if due:
            self._emit(now)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._emit(time.monotonic())
        self._closed = True

    def _emit(self, now: float) -> None:
        self._last_n, self._last_t = self.n, now
        done, elapsed = self.n - self._start_n, now - self._t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = eta = ""
        if done > 0 and elapsed > 0:
            per = elapsed / done
            speed = (f", {per:.2f} s/{self.unit}" if per >= 1
                     else f", {1 / per:.1f} {self.unit}/s")
            eta = f", ETA {duration(per * max(0, self.total - self.n))}"
        post = f"  {self.postfix}" if self.postfix else ""
        log.info("%s: %d/%d %s%s%s, %s elapsed%s%s", self.desc, self.n, self.total,
                 self.unit, pct, speed, duration(elapsed), eta, post)


def progress(total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
             every_steps: int | None = None, every_s: float | None = LINE_EVERY_S,
             leave: bool = True) -> Progress:
    """A tqdm bar on a terminal, else a LineProgress; a silent one when not `enabled`."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if stderr_is_terminal():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    leave=leave)
    return LineProgress(total, desc, unit, initial=initial, every_steps=every_steps,
                        every_s=every_s)


def track(items: Iterable[T], total: int, desc: str, unit: str,
          enabled: bool = True) -> Iterator[T]:
    """Iterate `items`, reporting progress as `progress` does."""
    bar = progress(total, desc, unit, enabled=enabled, leave=False)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
