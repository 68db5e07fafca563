"""The HTTP application: A1111's /sdapi/v1 routes, OpenAI's image route, a web page, a health check.

`create_app(ServeConfig(...))` builds a FastAPI app (OpenAPI at /docs and /openapi.json). Every
generation request is checked against the model before it queues (422 naming the field), then runs
on the one worker thread (worker.py); a full queue answers 429 with Retry-After, a shutting-down
server 503. A client that disconnects loses its job. With `api_auth`, every route but /health
needs HTTP basic auth (A1111's --api-auth); bodies over `max_body_bytes` get 413 before they are read.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from sdonnx import __version__
from sdonnx.config import check_int
from sdonnx.errors import InputError, SdonnxError
from sdonnx.runtime import embeddings
from sdonnx.runtime.request import available_memory
from sdonnx.serve import a1111
from sdonnx.serve.a1111 import Img2ImgRequest, OpenAIImageRequest, PngInfoRequest, Txt2ImgRequest
from sdonnx.serve.catalog import Catalog
from sdonnx.serve.config import ServeConfig, is_loopback
from sdonnx.serve.worker import Busy, Job, Stopping, Worker

POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there


class Server:
    """The state the routes share: the catalog, the worker, A1111's options."""

    def __init__(self, config: ServeConfig, catalog: Catalog | None = None):
        self.config = config
        self.catalog = catalog or Catalog(config.model, config.options, lora_dir=config.lora_dir,
                                          control_dir=config.control_dir, embeddings_dir=config.embeddings_dir,
                                          vae_dir=config.vae_dir)
        self.worker = Worker(config.max_queue)
        self.model = self.catalog.default
        self.clip_skip = 1
        self.vae: str | None = None  # A1111's sd_vae option: a served VAE's name, None for "Automatic"

    def translate(self, body: Txt2ImgRequest) -> a1111.Work:
        return a1111.translate(body, self.catalog, self.model, clip_skip=self.clip_skip, limits=self.config.limits,
                               vae=self.vae)

    async def run(self, request: Request, work: Callable[[], a1111.Work]) -> tuple[a1111.Work, a1111.Result]:
        """Check the request (threadpool), queue it, wait for it; cancel it if the client leaves.
        A full queue answers before the checks, which would take the cores the running job needs."""
        self.worker.check_room()
        checked = await run_in_threadpool(work)
        job = self.worker.submit(lambda worker: a1111.run(checked, worker, self.catalog), checked.label)
        return checked, await self.wait(request, job)

    async def wait(self, request: Request | None, job: Job) -> Any:
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
            if done:
                if job.future.cancelled():
                    raise Stopping("the server shut down before this job ran")
                return job.future.result()
            if request is not None and await request.is_disconnected():
                self.worker.cancel(job)
                raise asyncio.CancelledError  # nobody reads the answer

    def options(self) -> dict[str, Any]:
        return {"sd_model_checkpoint": self.catalog.title(self.model), "sd_checkpoint_hash": None,
                "sd_vae": self.vae or "Automatic", "CLIP_stop_at_last_layers": self.clip_skip, "samples_format": "png"}


def create_app(config: ServeConfig, *, catalog: Catalog | None = None, preload: bool = True) -> FastAPI:
    """The app for `config`. preload: load the default model before the first request is taken."""
    server = Server(config, catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if preload:
            await server.wait(None, server.worker.submit(lambda w: server.catalog.pipeline(server.model), "load"))
        yield
        await run_in_threadpool(server.worker.shutdown)

    app = FastAPI(title="sdonnx", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion on ONNX Runtime, with AUTOMATIC1111's /sdapi/v1 API")
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(NameTheProcess)
    add_error_handlers(app)
    guard = [Depends(basic_auth(config.api_auth))]

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        progress, queued = server.worker.progress()
        return {"status": "ok", "model": server.model, "running": progress.job or None, "queued": queued}

    @app.get("/", response_class=HTMLResponse, dependencies=guard, include_in_schema=False)
    async def page() -> str:
        return resources.files("sdonnx.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/sdapi/v1/txt2img", dependencies=guard, tags=["a1111"])
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        work, result = await server.run(request, lambda: server.translate(body))
        return await run_in_threadpool(a1111.response, body, work, result)

    @app.post("/sdapi/v1/img2img", dependencies=guard, tags=["a1111"])
    async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
        work, result = await server.run(request, lambda: server.translate(body))
        return await run_in_threadpool(a1111.response, body, work, result)

    @app.get("/sdapi/v1/progress", dependencies=guard, tags=["a1111"])
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        p, queued = server.worker.progress(watch=not skip_current_image)
        done = (p.job_no + (p.step / p.steps if p.steps else 0.0)) / p.job_count if p.job_count else 0.0
        elapsed = time.time() - p.started if p.started else 0.0
        state = {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False, "job": p.job,
                 "job_count": p.job_count, "job_timestamp": p.timestamp, "job_no": p.job_no,
                 "sampling_step": p.step, "sampling_steps": p.steps, "queued": queued}
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
                "current_image": None if skip_current_image else p.current_image,
                "textinfo": f"step {p.step} of {p.steps}" if p.job_count else None}

    @app.post("/sdapi/v1/interrupt", dependencies=guard, tags=["a1111"])
    async def interrupt() -> None:
        server.worker.interrupt()

    @app.post("/sdapi/v1/skip", dependencies=guard, tags=["a1111"])
    async def skip() -> None:
        server.worker.skip()

    @app.get("/sdapi/v1/samplers", dependencies=guard, tags=["a1111"])
    async def samplers() -> list[dict[str, Any]]:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers", dependencies=guard, tags=["a1111"])
    async def schedulers() -> list[dict[str, Any]]:
        return a1111.schedulers()

    @app.get("/sdapi/v1/sd-models", dependencies=guard, tags=["a1111"])
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": server.catalog.title(name), "model_name": name, "hash": server.catalog.title(name)[-11:-1],
                 "sha256": None, "filename": name, "config": None} for name in server.catalog.folders]

    @app.get("/sdapi/v1/loras", dependencies=guard, tags=["a1111"])
    async def loras() -> list[dict[str, Any]]:
        return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
                for name, path in sorted(server.catalog.loras(server.model).items())]

    @app.get("/controlnet/model_list", dependencies=guard, tags=["controlnet"])
    async def controlnet_models() -> dict[str, list[str]]:
        return {"model_list": sorted(server.catalog.controlnets(server.model))}

    @app.get("/controlnet/module_list", dependencies=guard, tags=["controlnet"])
    async def controlnet_modules() -> dict[str, list[str]]:
        return {"module_list": list(a1111.CONTROL_MODULES)}

    @app.get("/controlnet/version", dependencies=guard, tags=["controlnet"])
    async def controlnet_version() -> dict[str, int]:
        return {"version": 2}

    @app.get("/sdapi/v1/upscalers", dependencies=guard, tags=["a1111"])
    async def upscalers() -> list[dict[str, Any]]:
        """The image upscalers the hires fix has (the latent ones: /latent-upscale-modes)."""
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in ("None", "Lanczos")]

    @app.get("/sdapi/v1/latent-upscale-modes", dependencies=guard, tags=["a1111"])
    async def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in ("Latent", "Latent (nearest)")]

    @app.get("/sdapi/v1/embeddings", dependencies=guard, tags=["a1111"])
    async def embeddings_list() -> dict[str, dict]:
        """Textual-inversion files of --embeddings-dir, used where their name is a word of a prompt."""
        names = embeddings.available(server.catalog.embeddings_dir)
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                  "vectors": None} for name in sorted(names)}, "skipped": {}}

    @app.get("/sdapi/v1/memory", dependencies=guard, tags=["a1111"])
    async def memory() -> dict[str, Any]:
        free = available_memory()
        ram = {"free": free, "used": None, "total": None} if free is not None else {"error": "unknown here"}
        return {"ram": ram, "cuda": {"error": "sdonnx reports no GPU memory"}}

    @app.get("/sdapi/v1/cmd-flags", dependencies=guard, tags=["a1111"])
    async def cmd_flags() -> dict[str, Any]:
        return {"api": True, "nowebui": False, "listen": not is_loopback(config.host), "port": config.port,
                "lora_dir": server.catalog.lora_dir is not None}

    @app.post("/sdapi/v1/refresh-checkpoints", dependencies=guard, tags=["a1111"])
    async def refresh_checkpoints() -> None:
        """Look for model folders again (a folder of models gains or loses some); LoRAs are read per request."""
        await run_in_threadpool(server.catalog.refresh)
        if server.model not in server.catalog.folders:
            server.model = server.catalog.default

    @app.post("/sdapi/v1/refresh-loras", dependencies=guard, tags=["a1111"])
    async def refresh_loras() -> None:
        """Nothing to do: the LoRA folder is read at each request."""

    @app.get("/sdapi/v1/sd-vae", dependencies=guard, tags=["a1111"])
    async def sd_vae() -> list[dict[str, str]]:
        """The exported VAE folders of --vae-dir, by name (override_settings / options sd_vae)."""
        return [{"model_name": name, "filename": name} for name in server.catalog.vaes()]

    for route in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
        app.add_api_route(f"/sdapi/v1/{route}", _nothing, methods=["GET"], dependencies=guard, tags=["a1111"],
                          name=route, summary=f"{route}: sdonnx has none")

    @app.get("/sdapi/v1/scripts", dependencies=guard, tags=["a1111"])
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options", dependencies=guard, tags=["a1111"])
    async def get_options() -> dict[str, Any]:
        return server.options()

    @app.post("/sdapi/v1/options", dependencies=guard, tags=["a1111"])
    async def set_options(body: dict[str, Any]) -> None:
        """sd_model_checkpoint (a listed model; loaded before this returns) and CLIP_stop_at_last_layers;
        other A1111 options are accepted and ignored."""
        clip_skip = body.get("CLIP_stop_at_last_layers", server.clip_skip)
        check_int("CLIP_stop_at_last_layers", clip_skip, 1, 12)
        name = server.model
        if "sd_model_checkpoint" in body:
            name = server.catalog.name_of(body["sd_model_checkpoint"], "sd_model_checkpoint")
        vae = server.catalog.vae_of(body.get("sd_vae", server.vae), name, "sd_vae")
        if (name, vae) != (server.model, server.vae):
            await server.wait(None, server.worker.submit(lambda w: server.catalog.pipeline(name, vae), "load"))
            server.model, server.vae = name, vae
        server.clip_skip = clip_skip

    @app.post("/sdapi/v1/png-info", dependencies=guard, tags=["a1111"])
    async def png_info(body: PngInfoRequest) -> dict[str, Any]:
        return await run_in_threadpool(a1111.png_info, body)

    @app.post("/v1/images/generations", dependencies=guard, tags=["openai"])
    async def openai_generations(body: OpenAIImageRequest, request: Request) -> dict[str, Any]:
        work, result = await server.run(request, lambda: a1111.translate_openai(
            body, server.catalog, server.model, limits=config.limits))
        images = await run_in_threadpool(
            lambda: [a1111.png_base64(i, t) for i, t in zip(result.images, result.infotexts)])
        return {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": work.config.prompt}
                                                      for b64 in images]}

    return app


async def _nothing() -> list:
    """A1111 lists that sdonnx has nothing for (external VAEs, hypernetworks, face restorers, styles)."""
    return []


def basic_auth(users: tuple[tuple[str, str], ...]) -> Callable:
    """A dependency that demands one of `users` by HTTP basic auth (none: everyone passes)."""
    security = HTTPBasic(auto_error=False)

    async def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if not users:
            return
        if credentials is not None and any(
                secrets.compare_digest(credentials.username.encode(), user.encode())
                & secrets.compare_digest(credentials.password.encode(), password.encode()) for user, password in users):
            return
        raise HTTPException(401, "this server needs HTTP basic auth (--api-auth)", {"WWW-Authenticate": "Basic"})

    return check


def add_error_handlers(app: FastAPI) -> None:
    """InputError -> 422 naming the field; Busy -> 429 and Stopping -> 503 with Retry-After; other
    sdonnx errors (a broken model folder) -> 500 with their message."""

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError) -> JSONResponse:
        loc = ["body", *e.field.split(".")]
        return JSONResponse({"detail": [{"loc": loc, "msg": str(e), "type": "value_error", "input": repr(e.received)}],
                             "error": "InputError", "errors": str(e)}, 422)

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(e), "error": "Busy"}, 429, {"Retry-After": str(e.retry_after)})

    @app.exception_handler(Stopping)
    async def stopping(request: Request, e: Stopping) -> JSONResponse:
        return JSONResponse({"detail": str(e), "error": "Stopping"}, 503, {"Retry-After": "5"})

    @app.exception_handler(SdonnxError)
    async def failed(request: Request, e: SdonnxError) -> JSONResponse:
        return JSONResponse({"detail": str(e), "error": type(e).__name__}, 500)


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length or as it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send) -> None:
        body = f'{{"detail": "request body over {self.max_bytes} bytes", "error": "TooLarge"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class NameTheProcess:
    """ASGI middleware: X-Sdonnx-Process (host:pid) on every answer, to tell which replica served it.
    (Pure ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes.)"""

    def __init__(self, app):
        self.app = app
        self.header = (b"x-sdonnx-process", f"{socket.gethostname()}:{os.getpid()}".encode())

    async def __call__(self, scope, receive, send):
        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


class _TooLarge(Exception):
    pass
