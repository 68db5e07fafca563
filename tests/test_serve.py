"""`sdonnx serve` as its users meet it: a real uvicorn server on a loopback port, driven by the
`webuiapi` client from PyPI (which no one here wrote) and by plain HTTP, on the embedded model.

What must hold: A1111's routes answer in A1111's shapes, the images are the library's own for the
same settings, bad requests get 422 naming the A1111 field before they queue, a burst gets only
200s and 429s (with Retry-After) and leaves the server up, interrupt and client disconnects stop
work, auth and the body limit hold, and Ctrl-C/SIGTERM shut the CLI's server down cleanly.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

uvicorn = pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

from sdonnx.errors import InputError  # noqa: E402
from sdonnx.models import EMBEDDED_MODEL  # noqa: E402
from sdonnx.runtime.pipeline import Pipeline  # noqa: E402
from sdonnx.serve.app import create_app  # noqa: E402
from sdonnx.serve.config import Limits, ServeConfig, parse_auth  # noqa: E402

PROMPT = "a red circle on a blue background"
LONG_STEPS = 600  # a job long enough (seconds) to watch, interrupt or queue behind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server for `config` on a thread; `url` is its base address."""

    def __init__(self, config: ServeConfig):
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{config.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served():
    running = Running(ServeConfig(port=free_port(), max_queue=2, limits=Limits(max_steps=1000)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(served):
    return webuiapi.WebUIApi(baseurl=served.url + "/sdapi/v1", sampler="Euler", steps=8)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_txt2img_through_webuiapi_is_the_librarys_image(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=7, steps=8, width=64, height=64, cfg_scale=2, batch_size=2)
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [7, 8]
    expected = pipe(PROMPT, seed=7, steps=8, guidance=2.0, sampler="euler", batch=2)
    for got, want in zip(result.images, expected):
        assert got.size == (64, 64)
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert "Seed: 7" in result.info["infotexts"][0] and "Sampler: Euler" in result.info["infotexts"][0]
    assert result.parameters["prompt"] == PROMPT


def test_hires_fix_through_webuiapi(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=9, steps=8, width=64, height=64, cfg_scale=2, enable_hr=True,
                         hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.5)
    expected = pipe(PROMPT, seed=9, steps=8, guidance=2.0, sampler="euler", hires_scale=2, hires_strength=0.5,
                    hires_upscaler="lanczos")[0]
    assert result.image.size == (128, 128)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected))
    assert "Size: 64x64" in result.info["infotexts"][0] and "Hires upscaler: Lanczos" in result.info["infotexts"][0]


def circle_control(size: int = 64) -> Image.Image:
    control = Image.new("RGB", (size, size), "black")
    from PIL import ImageDraw

    ImageDraw.Draw(control).ellipse((8, 30, 30, 52), fill="white")  # lower left
    return control


def test_controlnet_units_through_webuiapi(api, pipe, served):
    from sdonnx import Control

    control = circle_control()
    unit = webuiapi.ControlNetUnit(image=control, model="embedded", weight=1.0)  # webuiapi's "Resize and Fill"
    result = api.txt2img(prompt=PROMPT, seed=2, steps=8, width=64, height=64, cfg_scale=2, controlnet_units=[unit])
    expected = pipe(PROMPT, seed=2, steps=8, guidance=2.0, sampler="euler", control=Control("embedded", control))[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected))
    assert "ControlNet 0:" in result.info["infotexts"][0]
    assert requests.get(served.url + "/controlnet/model_list", timeout=10).json() == {"model_list": ["embedded"]}
    canny = webuiapi.ControlNetUnit(image=control, module="canny", model="embedded", threshold_a=50, threshold_b=150)
    edged = api.txt2img(prompt=PROMPT, seed=2, steps=8, width=64, height=64, cfg_scale=2, controlnet_units=[canny])
    from sdonnx.runtime.preprocess import canny as edges

    want = pipe(PROMPT, seed=2, steps=8, guidance=2.0, sampler="euler",
                control=Control("embedded", edges(control, 50, 150)))[0]
    assert np.array_equal(np.asarray(edged.image.convert("RGB")), np.asarray(want))


def test_n_iter_seeds_follow_a1111(api):
    result = api.txt2img(prompt=PROMPT, seed=100, steps=2, width=64, height=64, batch_size=2, n_iter=2)
    assert result.info["all_seeds"] == [100, 101, 102, 103]
    assert len(result.images) == 4


def test_random_seed_is_reported_and_reproduces(api):
    first = api.txt2img(prompt=PROMPT, seed=-1, steps=4, width=64, height=64)
    seed = first.info["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = api.txt2img(prompt=PROMPT, seed=seed, steps=4, width=64, height=64)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))


def test_img2img_through_webuiapi(api, pipe):
    init = pipe("a blue square on a white background", seed=3, steps=8)[0]
    result = api.img2img(images=[init], prompt=PROMPT, seed=5, steps=8, width=64, height=64, cfg_scale=2,
                         denoising_strength=0.5)
    expected = pipe.img2img(PROMPT, image=init, seed=5, steps=8, guidance=2.0, sampler="euler", strength=0.5)[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected))
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]


def test_inpaint_mask_invert_and_data_prefix(served, pipe):
    init = pipe("a blue square on a white background", seed=3, steps=4)[0]
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))  # white (repaint) on the right
    body = {"prompt": PROMPT, "seed": 2, "steps": 6, "cfg_scale": 2, "sampler_name": "Euler",
            "init_images": ["data:image/png;base64," + b64_png(init)], "mask": b64_png(mask),
            "inpainting_mask_invert": 1, "denoising_strength": 1.0}
    r = requests.post(served.url + "/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    inverted = Image.eval(mask, lambda v: 255 - v)
    expected = pipe.inpaint(PROMPT, image=init, mask=inverted, seed=2, steps=6, guidance=2.0, sampler="euler",
                            strength=1.0, only_masked=True, only_masked_padding=0)[0]  # A1111's inpaint_full_res
    assert np.array_equal(got, np.asarray(expected))
    whole = requests.post(served.url + "/sdapi/v1/img2img", json={**body, "inpaint_full_res": False}, timeout=60)
    expected = pipe.inpaint(PROMPT, image=init, mask=inverted, seed=2, steps=6, guidance=2.0, sampler="euler",
                            strength=1.0)[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(whole.json()["images"][0]))).convert(
        "RGB")), np.asarray(expected))


def test_samplers_schedulers_and_models(api):
    names = api.util_get_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "LCM"} <= set(names)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert api.util_get_model_names() == [api.util_get_current_model()]
    assert {lora["name"] for lora in api.get_loras()} >= {"lcm"}
    karras = api.txt2img(prompt=PROMPT, seed=1, steps=4, width=64, height=64, sampler_name="DPM++ 2M",
                         scheduler="Karras")
    assert "Sampler: DPM++ 2M" in karras.info["infotexts"][0] and "Schedule type: Karras" in karras.info["infotexts"][0]


def test_the_lists_a1111_clients_read_at_start(api):
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == ["Latent", "Latent (nearest)"]
    for empty in (api.get_sd_vae, api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models,
                  api.get_prompt_styles):
        assert empty() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_memory()["ram"]["free"] > 0
    assert api.get_cmd_flags()["api"] is True
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


def test_lora_tag_and_png_info(api):
    result = api.txt2img(prompt=f"{PROMPT} <lora:lcm:1>", seed=1, steps=4, cfg_scale=1, width=64, height=64,
                         sampler_name="LCM")
    text = result.info["infotexts"][0]
    assert "<lora:lcm:1>" in text and "Lora hashes:" in text
    info = api.png_info(result.image)
    assert info.parameters["Seed"] == "1" and info.parameters["Sampler"] == "LCM" and info.info == text


def test_options_switch_among_listed_models_only(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha", "beta"):
        (models / name).symlink_to(EMBEDDED_MODEL, target_is_directory=True)
    running = Running(ServeConfig(model=models, port=free_port()))
    try:
        api = webuiapi.WebUIApi(baseurl=running.url + "/sdapi/v1")
        assert [m.split(" [")[0] for m in api.util_get_model_names()] == ["alpha", "beta"]
        assert api.util_get_current_model().startswith("alpha")
        api.util_set_model("beta")  # webuiapi picks the closest title, "beta [hash]"
        assert api.util_get_current_model().startswith("beta")
        r = requests.post(running.url + "/sdapi/v1/options", json={"sd_model_checkpoint": str(EMBEDDED_MODEL)})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
        r = requests.post(running.url + "/sdapi/v1/txt2img", timeout=60, json={
            "prompt": PROMPT, "steps": 2, "override_settings": {"sd_model_checkpoint": "alpha"}})
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "alpha"
        assert api.util_get_current_model().startswith("beta")  # an override lasts one request
        (models / "gamma").symlink_to(EMBEDDED_MODEL, target_is_directory=True)
        api.refresh_checkpoints()
        assert [m.split(" [")[0] for m in api.util_get_model_names()] == ["alpha", "beta", "gamma"]
    finally:
        running.stop()


BAD = [  # (body, route, the field the 422 names)
    ({"prompt": PROMPT, "steps": 0}, "txt2img", "steps"),
    ({"prompt": PROMPT, "steps": "many"}, "txt2img", "steps"),
    ({"prompt": PROMPT, "width": 65}, "txt2img", "width"),
    ({"prompt": PROMPT, "batch_size": 0}, "txt2img", "batch_size"),
    ({"prompt": PROMPT, "n_iter": 0}, "txt2img", "n_iter"),
    ({"prompt": PROMPT, "cfg_scale": -1}, "txt2img", "cfg_scale"),
    ({"prompt": PROMPT, "sampler_name": "Euler z"}, "txt2img", "sampler_name"),
    ({"prompt": PROMPT, "scheduler": "Beta"}, "txt2img", "scheduler"),
    ({"prompt": PROMPT, "sampler_name": "DDIM", "scheduler": "karras"}, "txt2img", "scheduler"),
    ({"prompt": PROMPT, "seed": -2}, "txt2img", "seed"),
    ({"prompt": PROMPT, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "txt2img", "hr_upscaler"),
    ({"prompt": PROMPT, "enable_hr": True, "hr_scale": 9}, "txt2img", "hr_scale"),
    ({"prompt": PROMPT, "enable_hr": True, "hr_resize_x": 512}, "txt2img", "hr_resize_x"),
    ({"prompt": PROMPT, "enable_hr": True, "hr_prompt": "something else"}, "txt2img", "hr_prompt"),
    ({"prompt": PROMPT, "enable_hr": True, "denoising_strength": 0.01}, "txt2img", "denoising_strength"),
    ({"prompt": PROMPT, "restore_faces": True}, "txt2img", "restore_faces"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ADetailer": {"args": [True]}}}, "txt2img", "alwayson_scripts"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [{"model": "nope", "image": "{init}"}]}}},
     "txt2img", "alwayson_scripts.ControlNet.args.0.model"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [
        {"model": "embedded", "image": "{init}", "module": "depth_midas"}]}}},
     "txt2img", "alwayson_scripts.ControlNet.args.0.module"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [
        {"model": "embedded", "image": "{init}", "control_mode": "My prompt is more important"}]}}},
     "txt2img", "alwayson_scripts.ControlNet.args.0.control_mode"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [
        {"model": "embedded", "image": "{init}", "weight": "heavy"}]}}},
     "txt2img", "alwayson_scripts.ControlNet.args.0.weight"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [
        {"model": "embedded", "image": "{init}", "resize_mode": ["x"]}]}}},
     "txt2img", "alwayson_scripts.ControlNet.args.0.resize_mode"),
    ({"prompt": PROMPT, "alwayson_scripts": {"ControlNet": {"args": [{"model": "embedded", "image": "{init}"}]}},
      "enable_hr": True}, "txt2img", "hr_scale"),
    ({"prompt": PROMPT + " <lora:../../etc/passwd:1>"}, "txt2img", "prompt"),
    ({"prompt": PROMPT + " <lora:/etc/passwd:1>"}, "txt2img", "prompt"),
    ({"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "/etc"}}, "txt2img",
     "override_settings.sd_model_checkpoint"),
    ({"prompt": PROMPT, "override_settings": {"CLIP_stop_at_last_layers": 0}}, "txt2img",
     "override_settings.CLIP_stop_at_last_layers"),
    ({"prompt": PROMPT, "init_images": []}, "img2img", "init_images"),
    ({"prompt": PROMPT, "init_images": ["not base64!"]}, "img2img", "init_images"),
    ({"prompt": PROMPT, "init_images": [base64.b64encode(b"GIF89a nope").decode()]}, "img2img", "init_images"),
    ({"prompt": PROMPT, "init_images": ["{init}"], "denoising_strength": 1.5}, "img2img", "denoising_strength"),
    ({"prompt": PROMPT, "init_images": ["{init}"], "mask": "{small}"}, "img2img", "mask"),
    ({"prompt": PROMPT, "init_images": ["{init}"], "resize_mode": 3}, "img2img", "resize_mode"),
]


@pytest.mark.parametrize("body, route, field", BAD, ids=[f"{r}-{f}-{i}" for i, (_, r, f) in enumerate(BAD)])
def test_bad_requests_get_422_naming_the_a1111_field(served, body, route, field):
    images = {"{init}": b64_png(Image.new("RGB", (64, 64), "white")), "{small}": b64_png(Image.new("L", (32, 32)))}
    body = json.loads(json.dumps(body), object_hook=lambda d: {k: images.get(v, v) if isinstance(v, str) else v
                                                               for k, v in d.items()})
    if "init_images" in body:
        body["init_images"] = [images.get(i, i) for i in body["init_images"]]
    started = time.monotonic()
    r = requests.post(f"{served.url}/sdapi/v1/{route}", json=body, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert ".".join(map(str, detail["loc"][1:])) == field, detail
    assert time.monotonic() - started < 5  # checked before it queues, not after a generation


def test_openai_images_route(served):
    r = requests.post(served.url + "/v1/images/generations", json={"prompt": PROMPT, "n": 2, "size": "64x64"},
                      timeout=60)
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 2 and Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (64, 64)
    r = requests.post(served.url + "/v1/images/generations", json={"prompt": PROMPT, "size": "big"}, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "size"]
    r = requests.post(served.url + "/v1/images/generations", json={"prompt": PROMPT, "response_format": "url"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "response_format"]


def long_job(url: str, **fields):
    body = {"prompt": PROMPT, "steps": LONG_STEPS, "sampler_name": "Euler", **fields}
    return requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)


def test_progress_during_a_job_then_interrupt(served, api):
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(long_job, served.url, n_iter=2)
        wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0)
        progress = api.get_progress()
        assert 0 < progress["progress"] < 1 and progress["state"]["job"] == "txt2img"
        assert progress["state"]["job_count"] == 2 and progress["state"]["sampling_steps"] == LONG_STEPS
        assert progress["eta_relative"] > 0
        wait_until(lambda: api.get_progress()["current_image"] is not None)  # a step preview, while watched
        preview = Image.open(io.BytesIO(base64.b64decode(api.get_progress()["current_image"])))
        assert preview.size == (64, 64)
        skipped = requests.get(served.url + "/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=10)
        assert skipped.json()["current_image"] is None
        started = time.monotonic()
        api.interrupt()
        r = pending.result()
        assert time.monotonic() - started < 10
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and r.json()["images"] == []
    wait_until(lambda: api.get_progress()["state"]["job_count"] == 0)


def test_skip_goes_on_with_the_next_iteration(served, api):
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(long_job, served.url, n_iter=2, steps=200, seed=11)
        wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0)
        requests.post(served.url + "/sdapi/v1/skip", timeout=10)
        r = pending.result()
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and info["all_seeds"] == [12] and not info["interrupted"]


def test_burst_gets_only_200_and_429_and_the_server_stays_up(served):
    body = {"prompt": PROMPT, "steps": 60, "sampler_name": "Euler"}

    def post(_):
        return requests.post(served.url + "/sdapi/v1/txt2img", json=body, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(post, range(10)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes  # one runs, two wait (max_queue 2)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in replies if r.status_code == 429)
    assert requests.get(served.url + "/health", timeout=10).json()["status"] == "ok"


def test_a_disconnected_client_loses_its_queued_job(served, api):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_job, served.url, steps=300)
        wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(served.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": LONG_STEPS}, timeout=0.5)
        wait_until(lambda: api.get_progress()["state"]["queued"] == 0, timeout=5)
        assert api.get_progress()["state"]["sampling_steps"] == 300  # the first job still runs
        api.interrupt()
        running.result()


def test_auth_is_required_off_loopback_and_checked(tmp_path):
    with pytest.raises(InputError, match="host"):
        ServeConfig(host="0.0.0.0")
    ServeConfig(host="0.0.0.0", insecure_no_auth=True)
    with pytest.raises(InputError, match="api_auth"):
        parse_auth("user-without-password")
    running = Running(ServeConfig(port=free_port(), api_auth=parse_auth("ann:s3cret,bob:pw"), max_body_bytes=4096))
    try:
        assert requests.get(running.url + "/sdapi/v1/samplers", timeout=10).status_code == 401
        assert requests.get(running.url + "/sdapi/v1/samplers", auth=("ann", "wrong"), timeout=10).status_code == 401
        assert requests.get(running.url + "/", timeout=10).status_code == 401
        assert requests.get(running.url + "/health", timeout=10).status_code == 200
        api = webuiapi.WebUIApi(baseurl=running.url + "/sdapi/v1", username="bob", password="pw")
        assert api.txt2img(prompt=PROMPT, steps=2, width=64, height=64).image.size == (64, 64)
        r = requests.post(running.url + "/sdapi/v1/txt2img", auth=("ann", "s3cret"), timeout=10,
                          json={"prompt": "x" * 5000})
        assert r.status_code == 413
    finally:
        running.stop()


def test_web_page_is_served_without_external_resources(served):
    r = requests.get(served.url + "/", timeout=10)
    assert r.status_code == 200 and 'id="generate"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: works offline
    assert requests.get(served.url + "/openapi.json", timeout=10).json()["info"]["title"] == "sdonnx"


def test_cli_refuses_an_open_host_and_drains_on_sigterm(tmp_path):
    cli = [sys.executable, "-m", "sdonnx", "serve"]
    refused = subprocess.run([*cli, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--host: got '0.0.0.0'" in refused.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*cli, "--port", str(port), "--threads", "1", "--max-steps", "1000"],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _answers(url + "/health"), timeout=60)
        api = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1")
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(long_job, url, steps=300)
            wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0)
            queued = pool.submit(long_job, url, steps=300)
            wait_until(lambda: api.get_progress()["state"]["queued"] == 1)
            process.send_signal(signal.SIGTERM)
            assert queued.result().status_code == 503  # cancelled at once, told to come back
            assert running.result().status_code == 200  # the running job finishes
        process.wait(30)
        assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "Application shutdown complete" in process.stderr.read()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False
