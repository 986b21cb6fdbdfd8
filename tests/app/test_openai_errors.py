"""OpenAI's error shape on /v1/images/... only (the real app over the real Redis)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient


def test_rate_limit_in_openai_shape(make_client: Callable[..., TestClient]) -> None:
    c = make_client(rate_limit=2)
    assert [c.get("/v1/models").status_code for _ in range(2)] == [200, 200]
    r = c.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json() == {"error": {"message": r.json()["error"]["message"],
                                  "type": "rate_limit_error", "param": None,
                                  "code": "rate_limited"}}
    # Our own routes keep our shape.
    assert c.get("/v1/models").json()["error"]["code"] == "rate_limited"


def test_bad_requests_are_400(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "16x32"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    r = client.post("/v1/images/generations", json={"prompt": "x", "output_format": "jpeg"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_format"
    r = client.post("/v1/images/generations", json={"prompt": "x", "stream": True, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/images/generations", content=b"{", headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    for sig in ("00", "%C3%A9" * 32):  # hmac.compare_digest refuses non-ASCII text
        r = client.get(f"/v1/images/files/{'0' * 32}/0.png?expires=1&sig={sig}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature"


def test_model_alias_setting_is_checked() -> None:
    import pytest
    from pydantic import ValidationError

    from worker.protocol import Settings

    assert Settings(model_aliases="dall-e-3=shapes16, gpt-image-1=x").alias_map == {
        "dall-e-3": "shapes16", "gpt-image-1": "x"}
    with pytest.raises(ValidationError, match="PROMPTPIX_MODEL_ALIASES entry 'dall-e-3'"):
        Settings(model_aliases="dall-e-3")
    with pytest.raises(ValidationError, match="PROMPTPIX_MODEL_NAME"):
        Settings(model_name="has space")
