"""FastAPI dependencies: the stores, settings, API-key auth, rate limit and job lookup.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in the thread
pool, and a thread hop per dependency was most of a status GET's cost. Those that talk
to Redis use the app's `redis.asyncio` client (the counters, `AsyncStore`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Path, Request

from worker.protocol import JobKind, JobRecord, JobStore, Settings

from .errors import ApiError, not_found
from .ratelimit import WindowCounter
from .store_async import AsyncStore

logger = logging.getLogger(__name__)

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)
_BEARER = re.compile(r"^Bearer[ \t]+(\S+)[ \t]*$", re.IGNORECASE)


async def get_store(request: Request) -> JobStore:
    """The process's job store (built by `create_app`)."""
    return request.app.state.store  # type: ignore[no-any-return]


async def get_app_settings(request: Request) -> Settings:
    """The settings this app was built with."""
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_async_store(request: Request) -> AsyncStore:
    """The process's asyncio store (made at start-up by `create_app`'s lifespan)."""
    return request.app.state.astore  # type: ignore[no-any-return]


StoreDep = Annotated[JobStore, Depends(get_store)]
AsyncStoreDep = Annotated[AsyncStore, Depends(get_async_store)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


@dataclass(frozen=True)
class Limiters:
    """The API's counters: requests per caller, failed authentications per address."""

    requests: WindowCounter
    auth_failures: WindowCounter

    @classmethod
    def over(cls, connection: aioredis.Redis) -> Limiters:
        return cls(WindowCounter(connection, "rate"), WindowCounter(connection, "authfail"))


@dataclass(frozen=True)
class Principal:
    """Who is calling: `owner` scopes jobs (hash of the key, '' when keys are off);
    `who` names the rate-limit bucket (the key's hash, or the client address)."""

    owner: str
    who: str


def key_owner(key: str) -> str:
    """Stable, non-reversible id of an API key (what job hashes store; keys never are)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def client_address(request: Request) -> str:
    """The caller's address (the proxy's client when PROMPTPIX_FORWARDED_ALLOW_IPS trusts it)."""
    return request.client.host if request.client else "unknown"


def check_api_key(request: Request, settings: Settings) -> Principal:
    """Resolve the caller; 401 when keys are on and the bearer key is missing or unknown."""
    keys = settings.api_key_list
    if not keys:
        return Principal(owner="", who=f"ip:{client_address(request)}")
    match = _BEARER.match(request.headers.get("authorization", ""))
    given = match.group(1).encode() if match else b""
    # Compare against every key, always, so timing says nothing about which one matched.
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.encode()) and given:
            found = key
    if found is None:
        raise ApiError(401, "unauthorized",
                       "missing or unknown API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    owner = key_owner(found)
    return Principal(owner=owner, who=f"key:{owner}")


async def count_auth_failure(request: Request, settings: Settings,
                             refusal: ApiError) -> ApiError:
    """Count a failed authentication against the caller's address (reads Redis).

    Returns the error to answer: the 401 as given, or 429 `auth_rate_limited` once the
    address passed `PROMPTPIX_AUTH_FAILURE_LIMIT` failures this minute. Valid keys are
    compared before anything is counted, so they keep working from that address.
    """
    limit = settings.auth_failure_limit
    if limit <= 0:
        return refusal
    limiters: Limiters = request.app.state.limiters
    address = client_address(request)
    wait = await limiters.auth_failures.hit(f"ip:{address}", limit)
    if wait is None:
        return refusal
    logger.warning("over %d failed authentications a minute from %s", limit, address)
    return ApiError(429, "auth_rate_limited",
                    f"over {limit} failed authentications a minute from this address; "
                    f"retry in {wait} s", headers={"Retry-After": str(wait)})


async def authenticated(request: Request, settings: Settings) -> Principal:
    """The caller of a `/v1` route (`check_api_key`, counting failures)."""
    try:
        return check_api_key(request, settings)
    except ApiError as e:
        raise await count_auth_failure(request, settings, e) from None


async def rate_limited(request: Request) -> Principal:
    """Dependency: the caller (`authenticated`), after counting this request against
    `PROMPTPIX_RATE_LIMIT`. One dependency without sub-dependencies: FastAPI's cost per
    resolved dependency was a visible share of a request's."""
    settings: Settings = request.app.state.settings
    principal = await authenticated(request, settings)
    if settings.rate_limit > 0:
        limiters: Limiters = request.app.state.limiters
        wait = await limiters.requests.hit(principal.who, settings.rate_limit)
        if wait is not None:
            raise ApiError(429, "rate_limited",
                           f"over {settings.rate_limit} requests a minute; retry in {wait} s",
                           headers={"Retry-After": str(wait)})
    return principal


PrincipalDep = Annotated[Principal, Depends(rate_limited)]
JobIdPath = Annotated[str, Path(description="job id (32 hex digits)")]


def owned_job(job: JobRecord | None, principal: Principal,
              kind: JobKind = JobKind.GENERATE) -> JobRecord:
    """The job, or 404 when unknown, expired, another key's or of another kind than the
    route's."""
    if (job is None or not hmac.compare_digest(job.owner, principal.owner)
            or job.kind is not kind):
        raise not_found()
    return job


def find_job(job_id: str, principal: Principal, store: JobStore,
             kind: JobKind = JobKind.GENERATE) -> JobRecord:
    """`owned_job` of a job id (reads Redis; blocking)."""
    if not _JOB_ID.match(job_id):
        raise not_found()
    return owned_job(store.get(job_id), principal, kind)


async def job_status(job_id: str, principal: Principal, astore: AsyncStore,
                     kind: JobKind = JobKind.GENERATE) -> tuple[JobRecord, int | None]:
    """`owned_job` of a job id and its queue position (`AsyncStore.status`: one round
    trip)."""
    if not _JOB_ID.match(job_id):
        raise not_found()
    job, position = await astore.status(job_id)
    return owned_job(job, principal, kind), position


def load_job(job_id: JobIdPath, principal: PrincipalDep, store: StoreDep) -> JobRecord:
    """Dependency: `find_job`."""
    return find_job(job_id, principal, store)


JobDep = Annotated[JobRecord, Depends(load_job)]
