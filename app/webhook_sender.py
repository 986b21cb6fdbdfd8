"""`promptpix webhooks`: deliver job events to their webhooks, signed per Standard Webhooks.

The job transitions append events to a Redis stream in the same step as the status change
(`worker.protocol.scripts`); this process reads it with a consumer group, so each event is
delivered at least once by one of any number of these processes (an entry a crashed
process read but never acknowledged is claimed by another after `CLAIM_IDLE_S`). A failed
attempt moves the event to a retry zset (acknowledging it in the same MULTI); up to
PROMPTPIX_WEBHOOK_MAX_ATTEMPTS attempts over about an hour. Redirects are not followed,
and the connection goes to the address that passed PROMPTPIX_WEBHOOK_ALLOW.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from worker.protocol import JobStore, Keys, Settings, describe_settings_error, redis_connection

from .routes.generations import iso, job_view
from .webhook_policy import WebhookRejected, resolve

logger = logging.getLogger(__name__)

GROUP = "deliverers"
# Waits after attempts 1..9: 10 attempts over about 64 minutes.
BACKOFF_S = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)
CLAIM_IDLE_S = 60.0  # a read entry unacknowledged this long is another process's to take
RETRY_LEASE_S = 120.0  # a retry taken by one process is hidden from the others this long
READ_BLOCK_MS = 500
BATCH = 16

# Take due retries: bump their score by the lease so no other process takes them too.
# KEYS: retry zset. ARGV: now, lease, max.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], m)
end
return due
"""
# Record an attempt on the job (never re-creating an expired job's hash).
# KEYS: job hash. ARGV: delivered ('1'/'0'), last status ('' = none).
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
redis.call('HSET', KEYS[1], 'webhook_delivered', ARGV[1], 'webhook_last_status', ARGV[2])
return 1
"""


def backoff(attempt: int, scale: float = 1.0) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based)."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1] * scale


class Sender:
    """Reads the event stream and retry zset of one Redis; delivers; records attempts."""

    def __init__(self, store: JobStore, settings: Settings, name: str | None = None) -> None:
        from standardwebhooks.webhooks import Webhook

        if settings.webhook_secret is None:
            raise ValueError("PROMPTPIX_WEBHOOK_SECRET is not set")
        self.store, self.r, self.settings = store, store.r, settings
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.http = httpx.Client(follow_redirects=False, trust_env=False,
                                 timeout=settings.webhook_timeout)
        self._take_due = self.r.register_script(_TAKE_DUE)
        self._record = self.r.register_script(_RECORD)
        self._last_claim = 0.0

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self.r.xgroup_create(Keys.webhook_events, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def step(self) -> int:
        """One round: due retries, entries abandoned by a dead process, new entries.
        Returns how many events were attempted."""
        done = 0
        for raw in self._take_due(keys=[Keys.webhook_retries],
                                  args=[time.time(), RETRY_LEASE_S, BATCH]):
            event = json.loads(raw)
            self.deliver(event, retry_member=raw)
            done += 1
        entries: list[tuple[Any, dict[Any, Any]]] = []
        if time.monotonic() - self._last_claim > CLAIM_IDLE_S / 2:
            self._last_claim = time.monotonic()
            claimed = self.r.xautoclaim(Keys.webhook_events, GROUP, self.name,
                                        int(CLAIM_IDLE_S * 1000), "0-0", count=BATCH)
            entries += claimed[1]
        read = self.r.xreadgroup(GROUP, self.name, {Keys.webhook_events: ">"}, count=BATCH,
                                 block=READ_BLOCK_MS if not done else None)
        for _stream, items in read or []:
            entries += items
        for entry_id, fields in entries:
            f = {(k.decode() if isinstance(k, bytes) else k):
                 (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
            sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            self.deliver({"id": f"msg_{sid}", "job": f.get("job", ""),
                          "type": f.get("type", ""), "at": float(f.get("at") or 0),
                          "attempt": 1}, stream_id=sid)
            done += 1
        return done

    def deliver(self, event: dict[str, Any], stream_id: str | None = None,
                retry_member: bytes | None = None) -> bool:
        """One attempt; then acknowledge, schedule the next attempt, or give up."""
        job = self.store.get(event["job"])
        status: int | None = None
        ok = False
        if job is None or not job.webhook:
            logger.info("webhook event %s: job %s is gone; dropped", event["id"], event["job"])
            ok = True  # nothing left to tell
        else:
            body = json.dumps({
                "type": f"generation.{event['type']}", "created_at": iso(event["at"]),
                "data": json.loads(job_view(job, self.store).model_dump_json()),
            }, separators=(",", ":"))
            status, why = self.post(job.webhook, event["id"], body)
            ok = status is not None and 200 <= status < 300
            self._record(keys=[Keys.job(job.id)], args=["1" if ok else "0",
                                                        "" if status is None else str(status)])
            log = logger.info if ok else logger.warning
            log("webhook %s (%s of job %s) attempt %d: %s", event["id"], event["type"], job.id,
                event["attempt"], why)
        last = event["attempt"] >= self.settings.webhook_max_attempts
        with self.r.pipeline() as pipe:
            if retry_member is not None:
                pipe.zrem(Keys.webhook_retries, retry_member)
            if not ok and not last:
                nxt = {**event, "attempt": event["attempt"] + 1}
                due = time.time() + backoff(event["attempt"], self.settings.webhook_backoff_scale)
                pipe.zadd(Keys.webhook_retries, {json.dumps(nxt): due})
            if stream_id is not None:
                pipe.xack(Keys.webhook_events, GROUP, stream_id)
            pipe.execute()
        if not ok and last:
            logger.error("webhook %s of job %s: giving up after %d attempts", event["id"],
                         event["job"], event["attempt"])
        return ok

    def post(self, url: str, msg_id: str, body: str) -> tuple[int | None, str]:
        """POST the signed body to the address that passed the policy; (status, what
        happened). Status None: no HTTP answer."""
        try:
            address, port = resolve(url, self.settings.webhook_allow)
        except WebhookRejected as e:
            return None, f"refused: {e}"
        parts = urlsplit(url)
        host = parts.hostname or ""
        ip_host = f"[{address}]" if ":" in address else address
        target = urlunsplit(parts._replace(netloc=f"{ip_host}:{port}"))
        now = datetime.now(tz=timezone.utc)
        headers = {
            "host": parts.netloc, "content-type": "application/json",
            "user-agent": "promptpix-webhooks", "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, now, body),
        }
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            r = self.http.post(target, content=body.encode(), headers=headers,
                               extensions=extensions)
        except httpx.HTTPError as e:
            return None, f"no answer ({type(e).__name__}: {e})"
        return r.status_code, f"HTTP {r.status_code}"

    def close(self) -> None:
        self.http.close()


def main(argv: list[str] | None = None) -> int:
    """Run `promptpix webhooks` until SIGTERM/SIGINT; exit status."""
    p = argparse.ArgumentParser(prog="promptpix webhooks",
                                description="deliver job events to their webhooks")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"promptpix webhooks: invalid settings:\n{describe_settings_error(e)}",
              file=sys.stderr)
        return 2
    if settings.webhook_secret is None:
        print("promptpix webhooks: PROMPTPIX_WEBHOOK_SECRET is not set (whsec_<base64>, "
              "shared with the API)", file=sys.stderr)
        return 2
    sender = Sender(JobStore(redis_connection(settings, blocking=True), settings), settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("delivering webhooks from %s as %s", settings.redis_url_safe, sender.name)
    failing = False
    while not stop.is_set():
        try:
            sender.ensure_group()
            while not stop.is_set():
                sender.step()
            failing = False
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if not failing:
                logger.warning("Redis unreachable (%s); retrying", e)
            failing = True
            stop.wait(1.0)
    sender.close()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
