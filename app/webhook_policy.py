"""Where webhooks may go (`PROMPTPIX_WEBHOOK_ALLOW`): by default public addresses only, so
the service cannot be made to call its own network (loopback, private, link-local)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from worker.protocol import JobRecord, Settings, WebhookEvent

from .errors import ApiError
from .schemas import GenerationRequest, WebhookStatus

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_WEBHOOK_URL_CHARS = 2048


class WebhookRejected(ValueError):
    """A webhook URL or address the policy refuses (the message says why)."""


def address_allowed(address: str | IPAddress, allow: str) -> bool:
    """Whether an IP address passes the policy: `public` admits global addresses; each
    CIDR admits its range. IPv4-mapped IPv6 addresses are judged as IPv4."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for entry in (e.strip() for e in allow.split(",")):
        if entry == "public":
            if ip.is_global and not ip.is_multicast:
                return True
        elif entry and ip in ipaddress.ip_network(entry, strict=False):
            return True
    return False


def check_url(url: str, settings: Settings) -> str:
    """The webhook URL if its form is acceptable (http/https, a host, no credentials) and a
    literal IP host passes the policy; host names are checked once resolved, at delivery."""
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise WebhookRejected(f"webhook URL is longer than {MAX_WEBHOOK_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "http://[::1", "http://[name]/": brackets hold IPv6 only
        raise WebhookRejected(f"webhook URL is malformed: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRejected(f"webhook must be an http:// or https:// URL, got {url[:100]!r}")
    if parts.username or parts.password:
        raise WebhookRejected("webhook URL must not carry credentials")
    try:
        _ = parts.port
    except ValueError as e:
        raise WebhookRejected(f"webhook URL has an invalid port: {e}") from e
    try:
        ip = ipaddress.ip_address(parts.hostname)
    except ValueError:
        dns_name(parts.hostname)
        return url  # a name: judged after DNS resolution, when delivering
    if not address_allowed(ip, settings.webhook_allow):
        raise WebhookRejected(f"webhook address {ip} is not allowed (PROMPTPIX_WEBHOOK_ALLOW="
                              f"{settings.webhook_allow!r}; default: public addresses only)")
    return url


def dns_name(host: str) -> None:
    """Refuse a host name that the resolver cannot even be asked about (an empty or
    over-long label: `getaddrinfo` raises UnicodeError from its IDNA encoding)."""
    try:
        host.encode("idna")
    except UnicodeError as e:
        raise WebhookRejected(f"webhook host {host[:100]!r} is not a valid DNS name "
                              f"({e})") from e


def resolve(url: str, allow: str) -> tuple[str, int]:
    """The address to connect to: the host's resolved addresses must all pass the policy
    (so a name cannot mix an internal address in); returns the first, and the port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    dns_name(host)  # a URL stored before the API checked it
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise WebhookRejected(f"cannot resolve {host!r}: {e}") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = [a for a in addresses if not address_allowed(a.split("%")[0], allow)]
    if not addresses or refused:
        raise WebhookRejected(f"{host!r} resolves to {', '.join(refused) or 'nothing'}, not "
                              f"allowed by PROMPTPIX_WEBHOOK_ALLOW={allow!r}")
    return addresses[0], port


def webhook_for(body: GenerationRequest, settings: Settings) -> tuple[str, list[str]] | None:
    """(URL, events) of a submission's webhook, or None; 422 `webhooks_disabled` without
    PROMPTPIX_WEBHOOK_SECRET, 422 `webhook_not_allowed` for a URL the policy refuses."""
    if body.webhook is None:
        return None
    if settings.webhook_secret is None:
        raise ApiError(422, "webhooks_disabled", "this server sends no webhooks (it has no "
                       "PROMPTPIX_WEBHOOK_SECRET)", "webhook")
    try:
        url = check_url(body.webhook, settings)
    except WebhookRejected as e:
        raise ApiError(422, "webhook_not_allowed", str(e), "webhook") from e
    events = body.webhook_events_filter or [e.value for e in WebhookEvent]
    return url, sorted(set(events))


def webhook_status(job: JobRecord) -> WebhookStatus | None:
    """The job view's `webhook` (None when the job has none)."""
    if not job.webhook:
        return None
    return WebhookStatus(delivered=job.webhook_delivered, attempts=job.webhook_attempts,
                         last_status=job.webhook_last_status)
