"""The Ray Serve application (serve/ray.py) on a local Ray: two replicas of one thread each take a
burst of 12 requests; every answer is a 200 or Ray's 503 (backpressure), both replicas serve, and
the application is still up afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sdonnx.runtime.providers import RuntimeOptions  # noqa: E402
from sdonnx.serve.config import Limits, ServeConfig  # noqa: E402
from sdonnx.serve.ray import deployment  # noqa: E402
from test_serve import PROMPT, free_port, wait_until  # noqa: E402


@pytest.fixture
def ray_url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(options=RuntimeOptions(threads=1), limits=Limits(max_steps=1000))
        serve.run(deployment(config, replicas=2, max_queued=2), name="sdonnx", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_take_a_burst_with_only_200_and_503(ray_url):
    wait_until(lambda: requests.get(ray_url + "/health", timeout=5).status_code == 200, timeout=120)
    body = {"prompt": PROMPT, "steps": 150, "sampler_name": "Euler", "seed": 1}

    def post(_):
        return requests.post(ray_url + "/sdapi/v1/txt2img", json=body, timeout=300)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(post, range(12)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
    served_by = {r.headers["X-Sdonnx-Process"] for r in replies if r.status_code == 200}
    assert len(served_by) == 2, served_by
    first = replies[codes.index(200)].json()["images"][0]
    assert all(r.json()["images"][0] == first for r in replies if r.status_code == 200)  # same seed, same image
    time.sleep(0.5)
    assert requests.post(ray_url + "/sdapi/v1/txt2img", json={**body, "steps": 4}, timeout=120).status_code == 200
