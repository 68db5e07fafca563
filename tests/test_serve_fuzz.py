"""The server's OpenAPI schema fuzzed with schemathesis: whatever a client sends, no 5xx and no crash.

Every operation gets generated requests, valid and invalid, over HTTP to a real uvicorn server on
the embedded model. The server's limits are set tiny (3 steps, 2 images, 128 px) so that the valid
requests among them run in milliseconds; what is checked is that each answer is a 2xx or a 4xx.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from sdonnx.serve.config import Limits, ServeConfig  # noqa: E402
from test_serve import Running, free_port  # noqa: E402


# Started at import: schemathesis reads the schema when the tests are collected.
SERVER = Running(ServeConfig(port=free_port(), max_queue=64, limits=Limits(max_steps=3, max_images=2, max_side=128)))
schema = schemathesis.openapi.from_url(SERVER.url + "/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def stop_the_server():
    yield
    SERVER.stop()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
