"""The same A1111 server scaled out on Ray Serve: each replica one sdonnx process (one Pipeline).

    sdonnx serve --ray --replicas 2 --threads 1            # a local Ray, two replicas
    serve run sdonnx.serve.ray:app                         # the embedded model, one replica
    serve run sdonnx.serve.ray:build_app model=/models replicas=2 threads=4 max_replicas=8

Ray's proxy takes the HTTP requests and routes each to a replica with a free slot: a replica takes
one request at a time (`max_ongoing_requests=1`, as two generations sharing cores are slower than
one after the other), at most `max_queued` wait in Ray's queue, and the rest get Ray's 503 at once.
Each replica reserves `threads` CPUs (`ray_actor_options`), so Ray places replicas where cores are
free; with `max_replicas` above `replicas`, Ray's autoscaler adds replicas while requests wait.
Within a replica, requests run exactly as in `sdonnx serve` (app.py): the same routes, checks,
auth and limits. /progress is per replica and waits its turn like any request.
See docs/serve.md for running this on a multi-node cluster (KubeRay).
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ray import serve

from sdonnx.config import check_int
from sdonnx.errors import InputError
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.serve.config import ServeConfig

MAX_QUEUED = 8


@serve.ingress()
class Replica:
    """One sdonnx server process; Ray builds its FastAPI app after the constructor."""

    def __init__(self, config: ServeConfig):
        self.config = config

    def __serve_build_asgi_app__(self):
        from sdonnx.serve.app import create_app

        return create_app(self.config)


def deployment(config: ServeConfig, *, replicas: int = 1, max_replicas: int | None = None,
               max_queued: int = MAX_QUEUED) -> serve.Application:
    """The Ray Serve application for `config`: `replicas` replicas (autoscaling up to max_replicas)."""
    check_int("replicas", replicas, 1)
    check_int("max_queued", max_queued, 0)
    if max_replicas is not None:
        check_int("max_replicas", max_replicas, replicas)
    threads = config.options.threads or 1
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": 1, "upscale_delay_s": 5,
                                          "downscale_delay_s": 120}}
    # The replica's own queue holds nothing: Ray's queue (max_queued_requests) is the one that sheds load.
    config = replace(config, max_queue=0)
    return serve.deployment(Replica, name="sdonnx", max_ongoing_requests=1, max_queued_requests=max_queued,
                            ray_actor_options={"num_cpus": threads}, **scaling).bind(config)


def build_app(args: Mapping[str, str]) -> serve.Application:
    """`serve run sdonnx.serve.ray:build_app key=value ...`: model, threads, replicas, max_replicas,
    max_queued, lora_dir (as `sdonnx serve`'s flags), and api_auth_env: the environment variable that
    holds USER:PASS (so the password stays in a secret, not in the Serve config)."""
    from sdonnx.serve.config import parse_auth

    known = {"model", "threads", "replicas", "max_replicas", "max_queued", "api_auth_env", "lora_dir"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError("args", unknown, f"some of {sorted(known)}")
    auth = ()
    if "api_auth_env" in args:
        if not os.environ.get(args["api_auth_env"]):
            raise InputError("api_auth_env", args["api_auth_env"], "an environment variable holding USER:PASS")
        auth = parse_auth(os.environ[args["api_auth_env"]])
    config = ServeConfig(
        model=Path(args["model"]) if "model" in args else None,
        host="0.0.0.0", insecure_no_auth=not auth,  # Ray's proxy binds the port; replicas never do
        api_auth=auth,
        lora_dir=Path(args["lora_dir"]) if "lora_dir" in args else None,
        options=RuntimeOptions(threads=int(args.get("threads", 1))),
    )
    return deployment(config, replicas=int(args.get("replicas", 1)),
                      max_replicas=int(args["max_replicas"]) if "max_replicas" in args else None,
                      max_queued=int(args.get("max_queued", MAX_QUEUED)))


def run(config: ServeConfig, *, replicas: int, max_replicas: int | None, max_queued: int) -> None:
    """`sdonnx serve --ray`: start a local Ray (or join RAY_ADDRESS), serve until Ctrl-C or SIGTERM,
    then shut the application and the Ray processes this started down."""
    import ray

    def stop(signum, frame):
        raise KeyboardInterrupt

    app = deployment(config, replicas=replicas, max_replicas=max_replicas, max_queued=max_queued)
    signal.signal(signal.SIGTERM, stop)
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name="sdonnx", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


app = deployment(ServeConfig(host="0.0.0.0", insecure_no_auth=True))
