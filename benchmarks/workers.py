"""One system, one generation, one fresh process: what `harness.py` runs and times.

    python benchmarks/workers.py '{"system": "sdonnx", "model": ..., "latents": ..., "image": ..., ...}'

Systems: "sdonnx" (an sdonnx folder, any recipe; "provider": cpu or openvino, run by the OpenVINO venv's Python;
"low_memory": true for its low-memory mode,
"graph_cache": a folder for its optimized-graph cache, "guidance_interval": [low, high] sigmas),
"diffusers" (PyTorch fp32 on a diffusers folder: the pipeline its model_index.json names) and "optimum" (ORTStableDiffusionPipeline on an
optimum export; run by the optimum virtual environment's Python). Every system gets the same
starting latents (job["latents"], unit noise), prompt, size, steps, guidance and Euler sampler
(diffusers' EulerDiscreteScheduler; sdonnx's euler matches it), and the same thread count.
"sdcpp" (stable-diffusion.cpp, run by its own virtual environment's Python) gets the same prompt, size,
steps, guidance, seed and threads, but draws its own noise from the seed.

With job["control"] ({"diffusers": ControlNetModel folder, "onnx": its sdonnx export, "image": the
control image}), sdonnx and diffusers run their ControlNet pipelines, and the U-Net time per step
includes the ControlNet's.

Prints one JSON line: ready_s (construction until ready to generate), e2e_s (one generation),
unet_step_s (median over steps of the U-Net time within a step, CFG halves included),
peak_rss_gb (the process's VmHWM, imports included: that is what a user's process pays).
The image goes to job["image"] as uint8 .npy, rounded as diffusers rounds.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_gb  # noqa: E402


class StepTimer:
    """U-Net time per sampler step: calls add to the current step, `step()` closes it."""

    def __init__(self):
        self.steps: list[float] = []
        self.current = 0.0

    def add(self, seconds: float) -> None:
        self.current += seconds

    def step(self) -> None:
        self.steps.append(self.current)
        self.current = 0.0

    def median(self) -> float:
        return statistics.median(self.steps) if self.steps else float("nan")


def run_sdonnx(job: dict, timer: StepTimer) -> tuple[float, np.ndarray]:
    import sdonnx
    from sdonnx.runtime.session import Session

    run = Session.run

    def timed(self, **feeds):
        started = time.perf_counter()
        out = run(self, **feeds)
        if self.name in ("unet", "unet_shallow", "controlnet"):
            timer.add(time.perf_counter() - started)
        return out

    Session.run = timed
    started = time.perf_counter()
    pipe = sdonnx.Pipeline.load(job["model"], provider=job.get("provider", "cpu"), progress=False, threads=job["threads"],
                                low_memory=job.get("low_memory", False), graph_cache=job.get("graph_cache"))
    ready = time.perf_counter() - started
    latents = np.load(job["latents"])
    interval = job.get("guidance_interval")
    control = job.get("control")
    image = pipe(job["prompt"], latents=latents, steps=job["steps"], guidance=job["guidance"], sampler="euler",
                 height=job["size"], width=job["size"], seed=0, callback=lambda *_: timer.step(),
                 guidance_interval=tuple(interval) if interval else None, cache_interval=job.get("cache_interval", 1),
                 control=sdonnx.Control(control["onnx"], control["image"]) if control else ())[0]
    return ready, np.asarray(image)


def _torch_pipeline_call(pipe, job: dict, timer: StepTimer, latents) -> np.ndarray:
    def on_step(pipe, step, t, kwargs):
        timer.step()
        return kwargs

    from PIL import Image

    extra = {"image": Image.open(job["control"]["image"]).convert("RGB")} if job.get("control") else {}
    images = pipe(job["prompt"], latents=latents, num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                  height=job["size"], width=job["size"], output_type="np", callback_on_step_end=on_step, **extra).images
    return (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)


def run_diffusers(job: dict, timer: StepTimer) -> tuple[float, np.ndarray]:
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    torch.set_num_threads(job["threads"])
    index = json.loads((Path(job["model"]) / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    started = time.perf_counter()
    if job.get("control"):
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        net = ControlNetModel.from_pretrained(job["control"]["diffusers"], torch_dtype=torch.float32)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(job["model"], controlnet=net,
                                                                 torch_dtype=torch.float32, **extra)
    else:
        pipe = DiffusionPipeline.from_pretrained(job["model"], torch_dtype=torch.float32, **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started
    for module in (pipe.unet, getattr(pipe, "controlnet", None)):
        if module is not None:
            _time_forward(module, timer)
    with torch.inference_mode():
        image = _torch_pipeline_call(pipe, job, timer, torch.from_numpy(np.load(job["latents"])))
    return ready, image


def _time_forward(module, timer: StepTimer) -> None:
    forward = module.forward

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        timer.add(time.perf_counter() - t0)
        return out

    module.forward = timed


def run_optimum(job: dict, timer: StepTimer) -> tuple[float, np.ndarray]:
    import onnxruntime as ort
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    torch.set_num_threads(job["threads"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    started = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(job["model"], provider="CPUExecutionProvider",
                                                      session_options=options)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started
    session = pipe.unet.session
    run = session.run

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = run(*args, **kwargs)
        timer.add(time.perf_counter() - t0)
        return out

    session.run = timed
    image = _torch_pipeline_call(pipe, job, timer, torch.from_numpy(np.load(job["latents"])))
    return ready, image


def run_sdcpp(job: dict, timer: StepTimer) -> tuple[float, np.ndarray]:
    """stable-diffusion.cpp through stable-diffusion-cpp-python (its own venv) on an original-layout single
    file, weights converted at load to job["wtype"] (f32, f16, q8_0, q4_0); job["flash"]: its flash attention;
    job["cache_mode"]: one of its training-free caches (easycache, ucache, ...).
    Its sampler is "euler" with its own RNG (the seed gives other noise than torch's), and it reports no
    per-step time, so unet_step_s is its sampling time (text encoding and decode left out) over the steps."""
    from stable_diffusion_cpp import StableDiffusion

    started = time.perf_counter()
    sd = StableDiffusion(model_path=job["model"], wtype=job["wtype"], n_threads=job["threads"],
                         diffusion_flash_attn=bool(job.get("flash")), verbose=False)
    cache = {"cache_mode": job["cache_mode"]} if job.get("cache_mode") else {}
    ready = time.perf_counter() - started
    sampled = []

    def progress(step: int, steps: int, seconds: float) -> None:
        sampled.append(seconds)

    images = sd.generate_image(prompt=job["prompt"], width=job["size"], height=job["size"], cfg_scale=job["guidance"],
                               sample_steps=job["steps"], sample_method="euler", seed=job["seed"],
                               progress_callback=progress, **cache)
    timer.steps = sampled[-job["steps"]:] or [float("nan")]
    return ready, np.asarray(images[0].convert("RGB"))


SYSTEMS = {"sdonnx": run_sdonnx, "diffusers": run_diffusers, "optimum": run_optimum, "sdcpp": run_sdcpp}


def main(job: dict) -> dict:
    timer = StepTimer()
    started = time.perf_counter()
    ready, image = SYSTEMS[job["system"]](job, timer)
    total = time.perf_counter() - started
    np.save(job["image"], image)
    return {"ready_s": ready, "e2e_s": total - ready, "unet_step_s": timer.median(), "peak_rss_gb": peak_rss_gb()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
