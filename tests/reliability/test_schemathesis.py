"""Schemathesis against /openapi.json of a running server (real uvicorn over HTTP).

Every operation; no 5xx; every response matches the schema (status, content type, body).
`make test` runs ~50 generated cases; `make reliability` a few hundred.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import start_api


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    """No 5xx, except /readyz's documented 503 (this server has no worker on purpose;
    Redis is up, so no other route may answer 503) and the OpenAI route's documented 504
    (no worker: every job it waits for times out)."""
    if response.status_code >= 500 and not (
            response.status_code == 503 and case.operation.path == "/readyz") and not (
            response.status_code == 504 and case.operation.path == "/v1/images/generations"):
        raise AssertionError(f"{case.method} {case.formatted_path} answered "
                             f"{response.status_code}: {response.text[:300]}")


CHECKS = [no_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
FAST_PER_OPERATION = 10  # 5 parametrised operations + 4 fixed ones: ~54 cases
SLOW_PER_OPERATION = 80  # ~400 cases
COMMON = {"deadline": None, "derandomize": True, "database": None,
          "suppress_health_check": list(HealthCheck)}


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    rs = RedisServer().start()
    port = free_port()
    log: Path = tmp_path_factory.mktemp("fuzz") / "api.log"
    api = start_api(rs.url, port, log, PROMPTPIX_RATE_LIMIT="0", PROMPTPIX_RESULT_TTL="60",
                    PROMPTPIX_SYNC_TIMEOUT="1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop()
        rs.cleanup()
        assert "unhandled error" not in log.read_text(), log.read_text()[-3000:]


def _fuzz(url: str, per_operation: int) -> dict[str, int]:
    """Generate `per_operation` cases for every operation and check each response.

    Driven through hypothesis directly (not schemathesis' pytest plugin, which does not
    load under this pytest)."""
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    counts: dict[str, int] = {}
    for result in api.get_all_operations():
        op = result.ok()
        seen = counts.setdefault(op.label, 0)

        @given(case=op.as_strategy())
        @settings(max_examples=per_operation, **COMMON)
        def run(case) -> None:
            counts[case.operation.label] += 1
            case.call_and_validate(checks=CHECKS, timeout=10)

        run()
        assert counts[op.label] > seen, op.label
    return counts


def test_api_fuzz(api_url: str) -> None:
    counts = _fuzz(api_url, FAST_PER_OPERATION)
    assert {"POST /v1/generations", "GET /v1/generations/{job_id}",
            "DELETE /v1/generations/{job_id}", "GET /v1/models"} <= set(counts), counts
    print("\nschemathesis cases:", sum(counts.values()), counts)


@pytest.mark.slow
def test_api_fuzz_long(api_url: str) -> None:
    counts = _fuzz(api_url, SLOW_PER_OPERATION)
    print("\nschemathesis cases:", sum(counts.values()), counts)
