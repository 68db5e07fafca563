"""`sdonnx serve`: the flags as a ServeConfig, then uvicorn.

Registering the subcommand imports neither FastAPI nor uvicorn, so the base install's `sdonnx`
works without the `serve` extra; running it without them says what to install. Every flag is
checked (and the model folders read) before the port opens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdonnx.config import config_from_args
from sdonnx.errors import InputError, SdonnxError
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.serve.config import Limits, ServeConfig, parse_auth

GRACEFUL_SECONDS = 30  # on Ctrl-C or SIGTERM: how long the running job may take to finish


def register(subparsers: argparse._SubParsersAction) -> None:
    from sdonnx.runtime.cli import add_runtime_flags

    serve = subparsers.add_parser("serve", help="serve AUTOMATIC1111's HTTP API and a web page",
                                  description=_serve.__doc__)
    serve.add_argument("-m", "--model", type=Path,
                       help="a model folder, or a folder of model folders (default: the embedded model)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; another needs --api-auth or --insecure-no-auth)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    serve.add_argument("--max-queue", type=int, default=8,
                       help="jobs that may wait behind the running one; more get 429 (default 8)")
    serve.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="require HTTP basic auth (as A1111)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback --host without --api-auth")
    serve.add_argument("--max-steps", type=int, default=Limits.max_steps,
                       help=f"most sampler steps a request may ask (default {Limits.max_steps})")
    serve.add_argument("--max-images", type=int, default=Limits.max_images,
                       help=f"most images per request, batch_size x n_iter (default {Limits.max_images})")
    serve.add_argument("--max-side", type=int, default=Limits.max_side,
                       help=f"longest image side in pixels a request may ask (default {Limits.max_side})")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MiB (default 32)")
    serve.add_argument("--lora-dir", type=Path, metavar="DIR", help="LoRAs that prompts may name (<lora:NAME:W>)")
    serve.add_argument("--embeddings-dir", type=Path, metavar="DIR", help="textual-inversion files")
    serve.add_argument("--vae-dir", type=Path, metavar="DIR",
                       help="exported VAE folders (sdonnx export VAE OUT) that requests may choose as sd_vae")
    serve.add_argument("--control-dir", type=Path, metavar="DIR",
                       help="ControlNet folders that requests may name (besides the model's own controlnets/)")
    serve.add_argument("--ray", action="store_true",
                       help="scale out on Ray Serve: --replicas processes, each one model (the ray extra)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas to start (default 1)")
    serve.add_argument("--max-replicas", type=int,
                       help="with --ray: let Ray's autoscaler add replicas up to this many while requests wait")
    add_runtime_flags(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    """Serve A1111's /sdapi/v1 API (txt2img, img2img, progress, ...), OpenAI's /v1/images/generations
    and a web page at /, one generation at a time with a bounded queue."""
    config = ServeConfig(
        model=args.model, host=args.host, port=args.port, max_queue=args.max_queue,
        api_auth=parse_auth(args.api_auth) if args.api_auth else (), insecure_no_auth=args.insecure_no_auth,
        max_body_bytes=int(args.max_body_mb * 2**20), lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
        control_dir=args.control_dir, vae_dir=args.vae_dir,
        options=config_from_args(RuntimeOptions, args), limits=config_from_args(Limits, args),
    )
    if args.ray:
        try:
            from sdonnx.serve import ray as ray_app
        except ImportError as e:
            raise SdonnxError(f"sdonnx serve --ray needs the ray extra: pip install 'sdonnx[ray]' ({e})") from None
        ray_app.run(config, replicas=args.replicas, max_replicas=args.max_replicas, max_queued=args.max_queue)
        return 0
    if args.replicas != 1 or args.max_replicas is not None:
        raise InputError("replicas", args.replicas, "--ray too (one process serves one model otherwise)")
    try:
        import uvicorn

        from sdonnx.serve.app import create_app
    except ImportError as e:
        raise SdonnxError(f"sdonnx serve needs the serve extra: pip install 'sdonnx[serve]' ({e})") from None
    app = create_app(config)
    server = app.state.server

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            server.worker.stop_accepting()  # queued jobs answer 503 now; the running one may finish
            await super().shutdown(sockets)

    Uvicorn(uvicorn.Config(app, host=config.host, port=config.port, timeout_graceful_shutdown=GRACEFUL_SECONDS,
                           log_level="info")).run()
    return 0
