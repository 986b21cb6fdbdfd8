"""`JobRecord`: a job as its Redis hash holds it, typed, read and written in this one place.

The Lua scripts change single fields atomically (`scripts.py`); every Python reader, in
the API and in the workers, goes through `JobRecord.from_hash`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .schema import JobKind, JobStatus, ProtocolError


def _text(raw: Mapping[bytes | str, bytes | str], name: str) -> str:
    v = raw.get(name.encode()) if name.encode() in raw else raw.get(name)
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else str(v)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class JobRecord:
    """One job (`promptpix:job:<id>`). Times are unix seconds; None/'' = not set yet."""

    id: str
    status: JobStatus
    attempt: int
    retries: int
    rq_id: str  # the RQ entry of the current attempt (`<id>-a<attempt>`)
    owner: str  # hash of the submitting API key ('' with keys off)
    params: Any  # the stored GenerationParams JSON (its text when it is not JSON at all)
    created_at: float
    progress: float = 0.0
    has_preview: bool = False
    images: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str = ""
    model: dict[str, Any] | None = None  # id, image_size, channels of the model it ran on
    error_code: str = ""
    error_message: str = ""
    idem: str = ""  # the Idempotency-Key's Redis key, if any
    quota: str = ""  # the caller's waiting-jobs zset, if capped
    user: str = ""  # a client's own label (OpenAI's `user`), never the owner
    test_hooks: Any = None
    webhook: str = ""  # URL told of this job's events ('' = none)
    webhook_events: tuple[str, ...] = ()  # which (`WebhookEvent` values)
    webhook_delivered: bool = False  # the last event sent was accepted (2xx)
    webhook_attempts: int = 0  # delivery attempts so far, all events
    webhook_last_status: int | None = None  # HTTP status of the last attempt (None: none)
    kind: JobKind = JobKind.GENERATE
    result: Any = None  # what the job computed besides images (bits/dim, a score's results)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> JobRecord:
        """Parse a job hash (HGETALL's answer); ProtocolError names what is wrong."""
        t = lambda name: _text(raw, name)  # noqa: E731
        try:
            return cls(
                id=t("id"), status=JobStatus(t("status")), attempt=int(t("attempt") or 1),
                retries=int(t("retries") or 0), rq_id=t("rq_id"), owner=t("owner"),
                params=_json_or_text(t("params")), created_at=float(t("created_at") or 0),
                progress=float(t("progress") or 0), has_preview=t("has_preview") == "1",
                images=int(t("images") or 0),
                started_at=float(t("started_at")) if t("started_at") else None,
                finished_at=float(t("finished_at")) if t("finished_at") else None,
                worker=t("worker"), model=json.loads(t("model")) if t("model") else None,
                error_code=t("error_code"), error_message=t("error_message"),
                idem=t("idem"), quota=t("quota"), user=t("user"),
                test_hooks=_json_or_text(t("test_hooks")) if t("test_hooks") else None,
                webhook=t("webhook"),
                webhook_events=tuple(e for e in t("webhook_events").split(",") if e),
                webhook_delivered=t("webhook_delivered") == "1",
                webhook_attempts=int(t("webhook_attempts") or 0),
                webhook_last_status=(int(t("webhook_last_status"))
                                     if t("webhook_last_status") else None),
                kind=JobKind(t("kind") or JobKind.GENERATE.value),
                result=_json_or_text(t("result")) if t("result") else None,
            )
        except ValueError as e:
            raise ProtocolError(f"job hash {t('id')!r} is not a job record: {e}") from e

    def new_hash(self) -> dict[str, str]:
        """The fields of a job being created (the scripts set the rest as it moves on)."""
        return {
            "id": self.id, "status": self.status.value, "attempt": str(self.attempt),
            "retries": str(self.retries), "rq_id": self.rq_id, "owner": self.owner,
            "params": json.dumps(self.params), "created_at": repr(self.created_at),
            "progress": "0", "has_preview": "0", "images": "0", "idem": self.idem,
            "test_hooks": json.dumps(self.test_hooks) if self.test_hooks else "",
            "quota": self.quota, "webhook": self.webhook,
            "webhook_events": ",".join(self.webhook_events), "kind": self.kind.value,
        }

    def payload(self) -> dict[str, Any]:
        """The RQ payload of the current attempt (unvalidated: `parse_payload` checks it)."""
        out: dict[str, Any] = {"job_id": self.id, "attempt": self.attempt,
                               "params": self.params}
        if self.kind is not JobKind.GENERATE:
            out["kind"] = self.kind.value
        if self.test_hooks:
            out["test_hooks"] = self.test_hooks
        return out
