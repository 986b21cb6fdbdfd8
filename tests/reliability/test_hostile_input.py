"""Hand-written hostile requests the schema fuzzer does not generate.

The cases already in tests/app/test_validation.py (oversized and chunked bodies, NaN and
Infinity, numbers as strings for num_images / temperature / seed, truncated or non-UTF-8
JSON, wrong content types, `x.png`) are not repeated. Every answer here must be the
error shape with a 4xx, or a 202 that stores the prompt exactly as sent; never a 5xx.
Path traversal over a real socket (where no client library normalises `..`) is in
test_auth_and_paths.py.
"""

from __future__ import annotations

import json
import sys

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import VALID
from tests.app.test_validation import error_of

URL = "/v1/generations"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def c(make_client) -> TestClient:
    # Rate limit off: these tests send many requests from one address.
    return make_client(rate_limit=0)


@pytest.mark.parametrize("raw", [
    # Nested past any recursion limit, under the 64 KiB body limit.
    b'{"prompt": "a", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    b"[" * 30000 + b"]" * 30000,
    b'{"prompt": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
    # Integers too long for int() (Python's 4300-digit limit) or for the seed range.
    b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
    b'{"prompt": "a", "seed": 1' + b"0" * 400 + b"}",
    b'{"prompt": "a", "num_images": 1' + b"0" * 400 + b"}",
    b'{"prompt": "a", "temperature": 1' + b"0" * 400 + b".0}",
    # Lone surrogates cannot be stored as UTF-8.
    b'{"prompt": "a\\ud800b"}',
    b'{"prompt": "\\udfff"}',
    # Types the strict schema refuses even when Python would coerce them.
    b'{"prompt": "a", "num_images": "0x2"}',
    b'{"prompt": "a", "seed": "1e3"}',
    b'{"prompt": "a", "top_k": 1.0}',
    b'{"prompt": "a", "guidance_scale": "3"}',
    b'{"prompt": "a", "class_label": false}',
    b'{"prompt": ["a"]}',
    b'{"prompt": {"text": "a"}}',
    b'{"prompt": null}',
    b"{}",
    b'{"prompt": "a", "__proto__": {"admin": true}}',
    # Numbers that parse but must not reach torch (issue 14, item 9): each field bounded.
    b'{"prompt":"a","top_k":1180591620717411303424}',
    b'{"prompt":"a","top_k":257}',
    b'{"prompt":"a","guidance_scale":1e308}',
    b'{"prompt":"a","class_label":1180591620717411303424}',
    b'{"prompt":"a","num_images":1180591620717411303424}',
])
def test_hostile_bodies_are_422(c: TestClient, raw: bytes) -> None:
    assert len(raw) < 64 * 1024
    error_of(c.post(URL, content=raw, headers=JSON), 422, "invalid_request")


def test_huge_body_of_many_small_fields(c: TestClient) -> None:
    # Under the byte limit but ~5,000 keys: refused as unknown fields, quickly.
    body = {"prompt": "a", **{f"k{i}": 0 for i in range(5000)}}
    raw = json.dumps(body).encode()
    assert len(raw) < 64 * 1024
    err = error_of(c.post(URL, content=raw, headers=JSON), 422, "invalid_request")
    assert err["field"].startswith("k")


def test_huge_body_just_over_the_limit(c: TestClient) -> None:
    # /v1/generations takes uploads: its limit is PROMPTPIX_MAX_UPLOAD_BYTES (4 MiB).
    raw = b'{"prompt": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    error_of(c.post(URL, content=raw, headers=JSON), 413, "payload_too_large")


def _planes_prompt() -> str:
    """A character from every Unicode plane that can be encoded (no surrogates)."""
    chars = ["\U0001F600", "\U00010000", "\U00020000", "\U00030000", "\U000E0001",
             "\U000F0000", "\U0010FFFF"]
    chars += [chr(p * 0x10000 + 0x41) for p in range(4, 14)]  # unassigned planes
    return "a " + "".join(chars)


@pytest.mark.parametrize("prompt", [
    "\x00",  # NUL alone: not whitespace, so accepted as text
    "a\x00b\x01\x1b[31mred\x1b[0m\x7f\x85",  # C0/C1 controls, an ANSI escape
    "a\u202eright-to-left override\u200b\ufeff",
    _planes_prompt(),
    "\U0010FFFF" * 1000,  # 1000 characters (4000 UTF-8 bytes): at the limit
    "' OR 1=1; -- \"; DROP TABLE jobs; {{7*7}} ${jndi:ldap://x} <script>alert(1)</script>",
    "promptpix:job:00000000000000000000000000000000",  # looks like one of our Redis keys
])
def test_odd_prompts_are_stored_verbatim(c: TestClient, prompt: str) -> None:
    r = c.post(URL, json={**VALID, "prompt": prompt})
    assert r.status_code == 202, r.text
    view = c.get(r.json()["status_url"])
    assert view.status_code == 200
    assert view.json()["prompt"] == prompt


def test_whitespace_from_every_category_is_blank(c: TestClient) -> None:
    blank = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u3000"
    assert error_of(c.post(URL, json={**VALID, "prompt": blank}), 422,
                    "invalid_request")["field"] == "prompt"


def test_prompt_limit_counts_characters_not_bytes(c: TestClient) -> None:
    assert c.post(URL, json={**VALID, "prompt": "\U0001F600" * 1000}).status_code == 202
    error_of(c.post(URL, json={**VALID, "prompt": "\U0001F600" * 1001}), 422, "invalid_request")


@pytest.mark.parametrize("index", ["-1", "-0", "16", "99999999999999999999", "9" * 5000,
                                   "1e3", "0x1", "1.0", "+1", "%20", "\u0663", "nan"])
def test_image_indices_out_of_range_or_not_integers(c: TestClient, index: str) -> None:
    job = c.post(URL, json=VALID).json()
    r = c.get(f"{URL}/{job['id']}/images/{index}.png")
    assert r.status_code in (404, 422), (index, r.status_code, r.text)
    assert r.json()["error"]["code"] in ("not_found", "invalid_request")


@pytest.mark.parametrize("job_id", [
    "a" * 10000, "%00", "%ff%fe", "%F0%9F%98%80", "0" * 31, "0" * 33, "g" * 32,
    "A" * 32, "..", "...", "%2e%2e", "*", "promptpix:running", "-1", "null",
    "00000000-0000-0000-0000-000000000000",
])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_job_ids_that_are_not_ids(c: TestClient, job_id: str, method: str) -> None:
    r = c.request(method, f"{URL}/{job_id}")
    assert r.status_code in (404, 405), (job_id, r.status_code, r.text)
    assert set(r.json()) == {"error"}


def test_uppercase_of_a_real_id_is_not_that_job(c: TestClient) -> None:
    job = c.post(URL, json=VALID).json()
    error_of(c.get(f"{URL}/{job['id'].upper()}"), 404, "not_found")


@pytest.mark.parametrize("key", [b"\xc3\xa9\xff", b"\x01\x02", b"a" * 255, b"../../x"])
def test_odd_idempotency_keys(c: TestClient, key: bytes) -> None:
    first = c.post(URL, json=VALID, headers=[(b"Idempotency-Key", key)])
    assert first.status_code == 202, first.text
    again = c.post(URL, json=VALID, headers=[(b"Idempotency-Key", key)])
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize("header", [b"Bearer", b"Bearer ", b"bearer \x00", b"Basic Zm9vOmJhcg==",
                                    b"Bearer " + b"k" * 8000, b"Bearer \xff\xfe"])
def test_odd_authorization_headers_with_keys_on(make_client, header: bytes) -> None:
    c = make_client(api_keys="key-a-0123456789", rate_limit=0)
    error_of(c.get("/v1/models", headers=[(b"Authorization", header)]), 401, "unauthorized")


def test_recursion_limit_untouched() -> None:
    # The nested bodies above must not have been "handled" by raising the interpreter's
    # recursion limit somewhere in the app.
    assert sys.getrecursionlimit() <= 10000
