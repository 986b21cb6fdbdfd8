"""Every client mistake gets a 4xx in the error shape, never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import VALID

URL = "/v1/generations"


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("patch, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 17}, "num_images"),
    ({"num_images": "2"}, "num_images"),
    ({"num_images": 2.0}, "num_images"),
    ({"num_images": True}, "num_images"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "1.0"}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**53}, "seed"),
    ({"seed": "12"}, "seed"),
    ({"class_label": -3}, "class_label"),
    ({"unknown": 1}, "unknown"),
    ({"prompt": "x" * 1001}, "prompt"),
])
def test_invalid_fields(client: TestClient, patch: dict, field: str) -> None:
    err = error_of(client.post(URL, json={**VALID, **patch}), 422, "invalid_request")
    assert err["field"] == field


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a", "temperature": NaN}',
    b'{"prompt": "a", "temperature": Infinity}',
    b'{"prompt": "a", "top_p": -Infinity}',
    b'{"prompt": "a", "guidance_scale": 1e999}',
    b'{"prompt": "a", "num_images": 1e999}',
])
def test_non_finite_numbers(client: TestClient, raw: bytes) -> None:
    r = client.post(URL, content=raw, headers={"Content-Type": "application/json"})
    error_of(r, 422, "invalid_request")


@pytest.mark.parametrize("raw, ctype", [
    (b'{"prompt": "a"', "application/json"),  # truncated JSON
    (b'{"prompt": "\xff\xfe\xfa"}', "application/json"),  # not UTF-8
    (b"\xc3\x28", "application/json"),
    (b'["a", "b"]', "application/json"),
    (b'"a red square"', "application/json"),
    (b"null", "application/json"),
    (b'{"prompt": "a"}', "text/plain"),
    (b"prompt=a", "application/x-www-form-urlencoded"),
    (b'{"prompt": "a"}', ""),
    (b"", "application/json"),
])
def test_malformed_bodies(client: TestClient, raw: bytes, ctype: str) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post(URL, content=raw, headers=headers)
    error_of(r, 422, "invalid_request")


# POST /v1/generations takes uploads (init_image): its body limit is
# PROMPTPIX_MAX_UPLOAD_BYTES (default 4 MiB), other routes keep 64 KiB.
UPLOAD_LIMIT = 4 * 1024 * 1024


def test_oversized_body_413(client: TestClient) -> None:
    big = {"prompt": "a" * (UPLOAD_LIMIT + 1024)}
    error_of(client.post(URL, json=big), 413, "payload_too_large")


def test_oversized_chunked_body_413(client: TestClient) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(UPLOAD_LIMIT // 1024 + 16):
            yield b"a" * 1024
        yield b'"}'

    r = client.post(URL, content=chunks(), headers={"Content-Type": "application/json"})
    error_of(r, 413, "payload_too_large")


def test_settings_caps(make_client) -> None:
    c = make_client(max_prompt_chars=10, max_images=2)
    assert error_of(c.post(URL, json={"prompt": "x" * 11}), 422, "invalid_request")["field"] \
        == "prompt"
    assert error_of(c.post(URL, json={"prompt": "x", "num_images": 3}), 422,
                    "invalid_request")["field"] == "num_images"
    assert c.post(URL, json={"prompt": "x" * 10, "num_images": 2}).status_code == 202


def test_not_found_shapes(client: TestClient) -> None:
    error_of(client.get(f"{URL}/{'0' * 32}"), 404, "not_found")
    error_of(client.get(f"{URL}/not-a-job"), 404, "not_found")
    error_of(client.delete(f"{URL}/{'0' * 32}"), 404, "not_found")
    error_of(client.get(f"{URL}/{'0' * 32}/images/0.png"), 404, "not_found")
    error_of(client.get("/no/such/route"), 404, "not_found")
    error_of(client.put(URL, json=VALID), 405, "method_not_allowed")


def test_image_index_validation(client: TestClient) -> None:
    job = client.post(URL, json=VALID).json()
    error_of(client.get(f"{URL}/{job['id']}/images/0.png"), 404, "not_found")
    error_of(client.get(f"{URL}/{job['id']}/images/x.png"), 422, "invalid_request")
    error_of(client.get(f"{URL}/{job['id']}/preview.png"), 404, "not_found")


def test_openapi_uses_error_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "422" in op["responses"]:
                ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (path, method)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("header, seconds", [
    ("wait=5", 5),
    ("respond-async, wait=30", 30),
    ("wait=3600", 60),
    ("wait=" + "9" * 5000, 60),  # int() of it raised: a 500 before
    ("wait=abc", 0),
])
def test_prefer_wait_header(header: str, seconds: int) -> None:
    from starlette.requests import Request

    from app.waiting import MAX_WAIT_S, prefer_wait

    assert MAX_WAIT_S == 60
    scope = {"type": "http", "headers": [(b"prefer", header.encode())]}
    assert prefer_wait(Request(scope)) == seconds
