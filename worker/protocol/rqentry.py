"""An RQ entry's writes without RQ's per-job machinery: recorded once by RQ itself, then
filled in per job.

`queue.enqueue_call` against a pipeline costs a `Job` object, its `to_dict` and the
pipeline's bookkeeping on every submission: half the API's admission cost. What it writes
for one of our jobs varies only in the job id (inside keys, the queue push and the
description), two timestamps and the payload; everything else (RQ's own fields, their
order, the TTLs, the origin queue) depends on the queue and the job's kind. So RQ records
one entry per (queue, kind) for a placeholder id, and `RqEntryTemplate.writes` swaps in a
job's values: the same commands, field for field, that RQ would send (a test compares them
against RQ's own), so a worker reads the entry unchanged.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rq.utils import utcformat

from .schema import ProtocolError

TEMPLATE_JOB_ID = "0" * 32  # the placeholder job id RQ records the template with
_TIMES = ("created_at", "enqueued_at")  # RQ's per-job timestamps (utcformat)
_FILLED = frozenset({*_TIMES, "data"})  # the fields filled per job (besides the id)


def rq_data(func: str, payload: dict[str, Any]) -> bytes:
    """RQ's `data` field of a job calling `func(payload)` (JSONSerializer, compressed)."""
    return zlib.compress(json.dumps((func, None, (payload,), {})).encode("utf-8"))


def rq_time(ts: float) -> str:
    """A unix time as RQ stores its timestamps (`rq.utils.utcformat`)."""
    return utcformat(datetime.fromtimestamp(ts, tz=timezone.utc))


class RqEntryTemplate:
    """The commands RQ sends to enqueue one attempt-1 job of one kind on one queue, with
    the per-job values left open. Built from `recorded`: the command stack RQ left on a
    never-sent pipeline for a job of id `TEMPLATE_JOB_ID`."""

    def __init__(self, recorded: list[tuple[Any, ...]], func: str) -> None:
        self.func = func
        flat: list[Any] = []
        # (index in `flat`, how to fill it from (job id, rq time, data))
        self._holes: list[tuple[int, Callable[[str, str, bytes], Any]]] = []
        found: set[str] = set()
        for args in recorded:
            flat.append(len(args))
            for n, arg in enumerate(args):
                field = args[n - 1] if args[0] == "HSET" and n >= 3 and n % 2 == 1 else None
                if field in _FILLED:
                    found.add(field)
                    self._holes.append((len(flat), _filler(field)))
                elif isinstance(arg, str) and TEMPLATE_JOB_ID in arg:
                    parts = arg.split(TEMPLATE_JOB_ID)
                    self._holes.append((len(flat), lambda j, _t, _d, p=parts: j.join(p)))
                elif isinstance(arg, str) and type(arg) is not str:
                    arg = arg.encode().decode()  # RQ's JobStatus (a str enum): what it sends
                flat.append(arg)
        if found != _FILLED:
            raise ProtocolError(f"RQ's job hash lacks {sorted(_FILLED - found)}: this RQ "
                                "version writes its entries differently")
        self._flat = flat

    def writes(self, job_id: str, now: float, payload: dict[str, Any]) -> list[Any]:
        """The entry of job `job_id` (attempt 1) calling `func(payload)`, enqueued at unix
        time `now`: each command as its argument count, then the command and its
        arguments (what `scripts.ADMIT` replays)."""
        out = self._flat.copy()
        at, data = rq_time(now), rq_data(self.func, payload)
        for i, fill in self._holes:
            out[i] = fill(job_id, at, data)
        return out


def _filler(field: str) -> Callable[[str, str, bytes], Any]:
    if field == "data":
        return lambda _j, _t, d: d
    return lambda _j, t, _d: t
