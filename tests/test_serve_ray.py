"""The Ray Serve application (serve/ray.py) on a local Ray: two replicas of one thread each take a
burst of 12 requests; every answer is a 200 or Ray's 503 (backpressure), both replicas serve, and
the application is still up afterwards."""

from __future__ import annotations

import time
from pathlib import Path
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


def test_the_kuberay_manifest_builds_the_app(monkeypatch, tmp_path):
    """docs/kuberay-sdonnx.yaml's application args are ones build_app takes (so the doc is not stale)."""
    yaml = pytest.importorskip("yaml")
    from sdonnx.errors import InputError
    from sdonnx.models import EMBEDDED_MODEL
    from sdonnx.serve.ray import build_app

    manifest = yaml.safe_load((Path(__file__).parents[1] / "docs" / "kuberay-sdonnx.yaml").read_text())
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    (tmp_path / "embedded").symlink_to(EMBEDDED_MODEL, target_is_directory=True)
    args["model"] = str(tmp_path)
    with pytest.raises(InputError, match="api_auth_env"):
        build_app(args)  # the secret's variable is not set
    monkeypatch.setenv(args["api_auth_env"], "ann:s3cret")
    deployment = build_app(args)._bound_deployment
    config = deployment.init_args[0]
    assert config.api_auth == (("ann", "s3cret"),) and config.options.threads == int(args["threads"])
    assert deployment.ray_actor_options == {"num_cpus": int(args["threads"])}
    assert deployment._deployment_config.max_ongoing_requests == 1
    assert deployment._deployment_config.max_queued_requests == int(args["max_queued"])
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (int(args["replicas"]), int(args["max_replicas"]))
    with pytest.raises(InputError, match="args"):
        build_app({"replica": "2"})
