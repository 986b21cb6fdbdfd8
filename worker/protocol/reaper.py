"""Background loops shared by the API and the workers: the reaper and a periodic thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from .store import JobStore, storage_full

logger = logging.getLogger(__name__)


class Periodic(threading.Thread):
    """Call `fn` every `interval` seconds in a daemon thread until `stop()`.

    Redis errors are logged (once per outage) and the loop goes on: the service must
    recover by itself when Redis returns.
    """

    def __init__(self, name: str, interval: float, fn: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.fn = fn
        self._stop_event = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.fn()
                if self._failing:
                    logger.info("%s: Redis reachable and writable again", self.name)
                self._failing = False
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if not self._failing:
                    logger.warning("%s: Redis unreachable (%s); retrying", self.name, e)
                self._failing = True
            except redis.ResponseError as e:
                if not storage_full(e):
                    logger.exception("%s: iteration failed", self.name)
                elif not self._failing:
                    logger.warning("%s: Redis is full (%s); retrying", self.name, e)
                    self._failing = True
            except Exception:  # a bug must not silently stop liveness for the whole process
                logger.exception("%s: iteration failed", self.name)
            self._stop_event.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def reap_once(store: JobStore) -> list[tuple[str, str]]:
    """One reaper sweep if this process wins the lock for this interval."""
    if not store.try_reaper_lock(store.settings.reaper_interval):
        return []
    outcomes = store.reap() + store.reap_orphans()
    for job_id, outcome in outcomes:
        logger.warning("reaper: job %s %s", job_id, outcome)
    return outcomes


def start_reaper(store: JobStore) -> Periodic:
    """Start the reaper loop (every `PROMPTPIX_REAPER_INTERVAL` seconds) in this process."""
    loop = Periodic("promptpix-reaper", store.settings.reaper_interval, lambda: reap_once(store))
    loop.start()
    return loop
