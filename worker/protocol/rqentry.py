"""An RQ entry's writes without RQ's per-job machinery: recorded once by RQ itself, then
filled in per job, and sent packed in one script argument.

`queue.enqueue_call` against a pipeline costs a `Job` object, its `to_dict` and the
pipeline's bookkeeping on every submission: half the API's admission cost. What it writes
for one of our jobs varies only in the job id (inside keys, the queue push and the
description), two timestamps and the payload; everything else (RQ's own fields, their
order, the TTLs, the origin queue) depends on the queue and the job's kind. So RQ records
one entry per (queue, kind) for a placeholder id, and `RqEntryTemplate.writes` swaps in a
job's values: the same commands, field for field, that RQ would send (a test compares them
against RQ's own; `data` holds the same bytes in an uncompressed zlib stream), so a
worker reads the entry unchanged.

The writes travel as one `pack`ed string (`scripts.ADMIT` unpacks it): redis-py encodes a
command's arguments one by one in Python, and the ~50 arguments of an entry were a
visible share of a submission; the template's constant runs are packed once.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from rq.utils import utcformat

from .schema import ProtocolError

TEMPLATE_JOB_ID = "0" * 32  # the placeholder job id RQ records the template with
_TIMES = ("created_at", "enqueued_at")  # RQ's per-job timestamps (utcformat)
_FILLED = frozenset({*_TIMES, "data"})  # the fields filled per job (besides the id)

Filler = Callable[[str, str, bytes], Any]  # (job id, RQ time, data) -> the value


def packed_item(value: Any) -> bytes:
    """One value as `pack` writes it: `<byte length>:<bytes>` (str as UTF-8, numbers as
    redis-py would send them)."""
    raw = value if isinstance(value, bytes) else str(value).encode()
    return b"%d:%s" % (len(raw), raw)


def pack(values: Iterable[Any]) -> bytes:
    """Values as one string for a script (`scripts.ADMIT`'s `unpacked`)."""
    return b"".join(map(packed_item, values))


def unpack(packed: bytes) -> list[bytes]:
    """`pack`'s values back (as bytes), as `scripts.ADMIT` reads them (for tests)."""
    out, i = [], 0
    while i < len(packed):
        colon = packed.index(b":", i)
        n = int(packed[i:colon])
        out.append(packed[colon + 1:colon + 1 + n])
        i = colon + 1 + n
    return out


def rq_data(func: str, payload: dict[str, Any]) -> bytes:
    """RQ's `data` field of a job calling `func(payload)`: JSONSerializer's bytes in a zlib
    stream (`zlib_stored`, which RQ's `zlib.decompress` reads as it reads its own)."""
    return zlib_stored(json.dumps((func, None, (payload,), {})).encode("utf-8"))


def zlib_stored(raw: bytes) -> bytes:
    """`raw` as a zlib stream of stored (uncompressed) deflate blocks. `zlib.compress`
    spends ~30 us setting up its compressor per call, at any level, for a payload of a
    few hundred bytes that would shrink by a third: a visible share of a submission."""
    blocks = [raw[i:i + 0xFFFF] for i in range(0, len(raw), 0xFFFF)] or [b""]
    out = [b"\x78\x01"]  # deflate, 32 KiB window, no dictionary (a multiple of 31)
    for n, block in enumerate(blocks, 1):
        out += [struct.pack("<BHH", n == len(blocks), len(block), len(block) ^ 0xFFFF), block]
    out.append(struct.pack(">I", zlib.adler32(raw)))
    return b"".join(out)


def rq_time(ts: float) -> str:
    """A unix time as RQ stores its timestamps (`rq.utils.utcformat`)."""
    return utcformat(datetime.fromtimestamp(ts, tz=timezone.utc))


class RqEntryTemplate:
    """The commands RQ sends to enqueue one attempt-1 job of one kind on one queue, with
    the per-job values left open. Built from `recorded`: the command stack RQ left on a
    never-sent pipeline for a job of id `TEMPLATE_JOB_ID`."""

    def __init__(self, recorded: list[tuple[Any, ...]], func: str) -> None:
        self.func = func
        parts: list[bytes | Filler] = []  # packed constant runs, and the holes' fillers
        found: set[str] = set()
        for args in recorded:
            parts.append(packed_item(len(args)))
            for n, arg in enumerate(args):
                field = args[n - 1] if args[0] == "HSET" and n >= 3 and n % 2 == 1 else None
                if field in _FILLED:
                    found.add(field)
                    parts.append(_filler(field))
                elif isinstance(arg, str) and TEMPLATE_JOB_ID in arg:
                    pieces = arg.split(TEMPLATE_JOB_ID)
                    parts.append(lambda j, _t, _d, p=pieces: j.join(p))
                else:  # RQ's JobStatus is a str enum: its value is what redis-py sends
                    parts.append(packed_item(arg.encode().decode()
                                             if isinstance(arg, str) else arg))
        if found != _FILLED:
            raise ProtocolError(f"RQ's job hash lacks {sorted(_FILLED - found)}: this RQ "
                                "version writes its entries differently")
        self._parts: list[bytes | Filler] = []
        for part in parts:  # adjacent constants joined once
            if (isinstance(part, bytes) and self._parts
                    and isinstance(self._parts[-1], bytes)):
                self._parts[-1] += part
            else:
                self._parts.append(part)

    def writes(self, job_id: str, now: float, payload: dict[str, Any]) -> bytes:
        """The entry of job `job_id` (attempt 1) calling `func(payload)`, enqueued at unix
        time `now`, `pack`ed: each command as its argument count, then the command and its
        arguments (what `scripts.ADMIT` replays)."""
        at, data = rq_time(now), rq_data(self.func, payload)
        return b"".join(p if isinstance(p, bytes) else packed_item(p(job_id, at, data))
                        for p in self._parts)


def _filler(field: str) -> Filler:
    if field == "data":
        return lambda _j, _t, d: d
    return lambda _j, t, _d: t
