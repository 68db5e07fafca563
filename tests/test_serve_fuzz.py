"""The server's OpenAPI schema fuzzed with schemathesis: whatever a client sends, no 5xx and no crash.

Every operation gets generated requests, valid and invalid, against the real app on the embedded
model. The server's limits are set tiny (3 steps, 2 images, 128 px) so that the valid requests
among them run in milliseconds; what is checked is that each answer is a 2xx or a 4xx.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from sdonnx.serve.app import create_app  # noqa: E402
from sdonnx.serve.config import Limits, ServeConfig  # noqa: E402

APP = create_app(ServeConfig(max_queue=64, limits=Limits(max_steps=3, max_images=2, max_side=128)), preload=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
