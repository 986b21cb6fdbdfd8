"""Reliability fixtures: reused from the serving tests, not redefined here.

`tiny_checkpoint` (a tiny trained model, once per session) comes from the end-to-end
serving tests; `make_client` / `client` (the real ASGI app over the session's real Redis)
from the API tests.
"""

from tests.app.conftest import client, make_client  # noqa: F401 - shared fixtures
from tests.e2e.test_serving import tiny_checkpoint  # noqa: F401 - shared session fixture
