"""Side by side, in one run: sdonnx (fp32, quantize recipes, low-memory mode), diffusers PyTorch fp32
and optimum's ORTStableDiffusionPipeline, on the same model, prompt, latents, size, steps and threads.

    python benchmarks/harness.py --model sd15 --size 256 --steps 20 --repeats 2 \
        --out benchmarks/results/sd15-256
    python benchmarks/harness.py --model embedded --steps 30 --out benchmarks/results/embedded

Each run is a fresh process (`workers.py`), interleaved over the systems (A B C A B C ...), so load
time and peak RSS are the system's own and every system shares the machine's conditions. Models:
"sd15" and "sdxl" are the full-size SD 1.5 and SDXL base architectures with seeded random
weights (`sd15_random.py`, `sdxl_random.py`), "embedded" the trained embedded model. What the systems need is made once and cached under
--work: the sdonnx export, its quantized variants, the optimum export, and optimum's virtual
environment (optimum-onnx 0.1.0 needs transformers < 4.58, so it cannot share ours).
Writes OUT.json and OUT.md: medians per system, and PSNR of each image against diffusers'.

Systems: "diffusers", "optimum", "sdcpp-WTYPE" (stable-diffusion.cpp at f32, f16, q8_0 or q4_0 weights, "+flash"
for its flash attention, "+easycache" / "+ucache" for its caches; its own venv, built from stable-diffusion-cpp-python's sdist; an original-layout
single file of the same weights; its RNG differs, so its PSNR is against sdcpp-f32's image when that runs),
"sdonnx-fp32", "sdonnx-RECIPE" (a quantize recipe), each sdonnx
one with modes appended: "+lowmem" (low-memory mode), "+cache" (the optimized-graph cache, filled by
one unmeasured warm-up run first), "+interval" (guidance only for sigmas in --guidance-interval),
"+sliced" / "+full" / "+fused" (the export's --attention; default: the export's default), "+deepcache"
(an export with --feature-cache, run at --cache-interval 3), "+openvino" (ONNX Runtime's OpenVINO provider,
onnxruntime-openvino in its own venv with sdonnx installed without dependencies; use with +sliced: OpenVINO
has no kernel for the fused op), e.g.
"sdonnx-int8+lowmem", "sdonnx-fp32+cache", "sdonnx-int8+interval", "sdonnx-fp32+fused".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import CACHE, SD15_PROMPT, machine, make_variant, psnr, run_worker

from sdonnx.export import ATTENTION, ExportConfig

PROMPTS = {"sd15": SD15_PROMPT, "sdxl": SD15_PROMPT, "embedded": "a red circle on a blue background"}
DEFAULT_SIZE = {"sd15": 256, "sdxl": 512, "embedded": 64}
DEFAULT_SYSTEMS = "diffusers,optimum,sdonnx-fp32,sdonnx-mixed,sdonnx-int8,sdonnx-int8+lowmem"
OPTIMUM_PACKAGES = ("torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "diffusers==0.39.0", "accelerate")
SDCPP_PACKAGES = ("stable-diffusion-cpp-python==0.4.7", "numpy", "pillow")  # built from its sdist: a few minutes
SDCPP_WTYPES = ("f32", "f16", "q8_0", "q4_0")
SDCPP_CACHES = ("easycache", "ucache")  # its training-free caches for U-Net models
WORKER = Path(__file__).with_name("workers.py")


def source(model: str) -> Path:
    """The diffusers folder of `model`."""
    if model == "embedded":
        from sdonnx.models import EMBEDDED_MODEL

        return EMBEDDED_MODEL.parent / "source"
    if model == "sdxl":
        from sdxl_random import build

        return build()
    from sd15_random import build

    return build()


def export(model: str, work: Path, attention: str, feature_cache: bool = False) -> tuple[Path, Path]:
    """(sdonnx fp32 export of `model` with `attention`, folder for its quantized variants), made once:
    work/sdonnx-fp32-ATTENTION[-fc] and work/ATTENTION[-fc] (-fc: with --feature-cache)."""
    if model == "embedded" and attention == "sliced" and not feature_cache:
        from sdonnx.models import EMBEDDED_MODEL

        return EMBEDDED_MODEL, work / attention  # the committed export was made with sliced attention
    name = attention + ("-fc" if feature_cache else "")
    onnx = work / f"sdonnx-fp32-{name}"
    if not (onnx / "manifest.json").is_file():
        from sdonnx.export import export_model

        print(f"exporting {source(model)} -> {onnx} (attention {attention})", file=sys.stderr)
        export_model(ExportConfig(source=str(source(model)), out=onnx, overwrite=True, quiet=True,
                                  attention=attention, feature_cache=feature_cache))
    return onnx, work / name


def optimum_python(venv: Path) -> Path:
    """The optimum environment's Python, created with OPTIMUM_PACKAGES if missing."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"creating {venv} ({', '.join(OPTIMUM_PACKAGES)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for package in OPTIMUM_PACKAGES[:1] + (" ".join(OPTIMUM_PACKAGES[1:]),):  # torch first: the CPU pin
            subprocess.run([str(python), "-m", "pip", "install", "-q", *package.split()], check=True)
    return python


def sdcpp_python(venv: Path) -> Path:
    """stable-diffusion.cpp's environment's Python, created with SDCPP_PACKAGES if missing (built for this CPU)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"creating {venv} ({', '.join(SDCPP_PACKAGES)}; compiling stable-diffusion.cpp)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SDCPP_PACKAGES], check=True,
                       env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    return python


OPENVINO_PACKAGES = ("onnxruntime-openvino", "numpy", "tokenizers", "pillow", "tqdm")  # pins its own onnxruntime


def openvino_python(venv: Path) -> Path:
    """The OpenVINO environment's Python (onnxruntime-openvino and sdonnx's runtime), created if missing."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"creating {venv} ({', '.join(OPENVINO_PACKAGES)} + this sdonnx)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OPENVINO_PACKAGES], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(Path(__file__).parents[1])],
                       check=True)
    return python


def single_file(model: str, work: Path) -> Path:
    """The model's weights as one original-layout (CompVis) .safetensors file, what stable-diffusion.cpp loads."""
    path = work / "single-file.safetensors"
    if not path.is_file():
        if model != "sd15":
            raise SystemExit("sdcpp systems: only with --model sd15")
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from ldm_checkpoint import write_ldm_checkpoint

        write_ldm_checkpoint(source(model), path.with_suffix(".partial.safetensors"))
        path.with_suffix(".partial.safetensors").rename(path)
    return path


def optimum_export(source: Path, work: Path, python: Path) -> Path:
    out = work / "optimum"
    if not (out / "model_index.json").is_file():
        print(f"optimum-cli export onnx {source} -> {out}", file=sys.stderr)
        cli = python.parent / "optimum-cli"
        subprocess.run([str(cli), "export", "onnx", "--model", str(source), "--task", "text-to-image", str(out)],
                       check=True)
    return out


def write_latents(path: Path, size: int, seed: int) -> Path:
    """Unit noise [1, 4, size/8, size/8]: torch.manual_seed(seed)'s, drawn without torch."""
    from sdonnx.runtime.noise import noise_source

    latent = size // 8
    np.save(path, np.asarray(noise_source(seed, "torch").standard_normal((1, 4, latent, latent)), dtype=np.float32))
    return path


def control_job(model: str, work: Path, size: int) -> dict:
    """The full-size random ControlNet (sd15 only), its sdonnx export and a control image, made once."""
    from PIL import Image, ImageDraw

    from sdonnx.export import export_model
    from sd15_random import build_controlnet

    if model != "sd15":
        raise SystemExit("--control: only with --model sd15")
    net = build_controlnet()
    onnx = work / "controlnet-onnx"
    if not (onnx / "manifest.json").is_file():
        print(f"exporting {net} -> {onnx}", file=sys.stderr)
        export_model(ExportConfig(source=str(net), out=onnx, overwrite=True, quiet=True))
    image = work / f"control-{size}.png"
    picture = Image.new("RGB", (size, size))
    pen = ImageDraw.Draw(picture)
    for i in range(1, 8):  # an edge map: white outlines on black
        pen.rectangle((i * size // 16, i * size // 16, size - i * size // 16, size - i * size // 16), outline="white")
    picture.save(image)
    return {"diffusers": str(net), "onnx": str(onnx), "image": str(image)}


def plan_jobs(args: argparse.Namespace) -> dict[str, tuple[Path, dict]]:
    """system -> (python to run it with, job without its output paths)."""
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    size = args.size or DEFAULT_SIZE[args.model]
    common = {"prompt": PROMPTS[args.model], "size": size, "steps": args.steps, "guidance": args.guidance,
              "threads": args.threads, "latents": str(write_latents(work / f"latents-{size}.npy", size, args.seed))}
    jobs = {}
    for system in args.systems:
        name, *modes = system.split("+")
        if name == "diffusers":
            jobs[system] = (Path(sys.executable), {"system": "diffusers", "model": str(source(args.model))})
        elif name == "optimum":
            python = optimum_python(args.optimum_venv)
            jobs[system] = (python, {"system": "optimum",
                                     "model": str(optimum_export(source(args.model), work, python))})
        elif name.startswith("sdcpp-"):
            jobs[system] = (sdcpp_python(args.sdcpp_venv), {"system": "sdcpp", "model": str(single_file(args.model, work)),
                                                           "wtype": name.removeprefix("sdcpp-"), "seed": args.seed,
                                                           "flash": "flash" in modes,
                                                           "cache_mode": next((m for m in modes if m != "flash"), None)})
        else:
            recipe = name.removeprefix("sdonnx-")
            attention = next((m for m in modes if m in ATTENTION), ExportConfig.attention)
            onnx, variants = export(args.model, work, attention, feature_cache="deepcache" in modes)
            folder = onnx if recipe == "fp32" else make_variant(onnx, variants, recipe)
            cache = str(work / "graph-cache") if "cache" in modes else None
            interval = args.guidance_interval if "interval" in modes else None
            python = openvino_python(args.openvino_venv) if "openvino" in modes else Path(sys.executable)
            jobs[system] = (python, {"system": "sdonnx", "model": str(folder),
                                     "provider": "openvino" if "openvino" in modes else "cpu",
                                     "low_memory": "lowmem" in modes, "graph_cache": cache, "guidance_interval": interval,
                                     "cache_interval": 3 if "deepcache" in modes else 1})
    if args.control:
        common["control"] = control_job(args.model, work, size)
    jobs = {system: (python, job | common) for system, (python, job) in jobs.items()}
    for system, (python, job) in jobs.items():
        if job.get("graph_cache"):
            print(f"{system}: warm-up run to fill the graph cache", file=sys.stderr)
            run_worker([str(python), str(WORKER)], job | {"image": str(work / "warm-up.npy")}, system)
    return jobs


def measure(args: argparse.Namespace) -> list[dict]:
    jobs = plan_jobs(args)
    images = args.work / args.model / "images"
    images.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {system: [] for system in jobs}
    for repeat in range(args.repeats):
        for system, (python, job) in jobs.items():
            result = run_worker([str(python), str(WORKER)], job | {"image": str(images / f"{system}.npy")}, system)
            runs[system].append(result)
            print(f"{system} #{repeat + 1}: {result}", file=sys.stderr)
    reference = np.load(images / "diffusers.npy") if "diffusers" in jobs else None
    own_rng = np.load(images / "sdcpp-f32.npy") if "sdcpp-f32" in jobs else None  # sd.cpp draws other noise
    rows = []
    for system, results in runs.items():
        row = {"system": system} | {key: statistics.median(r[key] for r in results) for key in results[0]}
        image = np.load(images / f"{system}.npy")
        against = own_rng if system.startswith("sdcpp-") else reference
        row["psnr_vs_diffusers_db"] = psnr(against, image) if against is not None else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: list[str]) -> str:
    base = next((r for r in rows if r["system"] == "diffusers"), None)
    lines = header + ["", "| system | ready s | end-to-end s | U-Net s/step | peak RSS GB | vs diffusers e2e "
                      "| PSNR vs diffusers dB (sdcpp: vs sdcpp-f32) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{base['e2e_s'] / r['e2e_s']:.2f}x" if base else "-"
        quality = "-" if r["psnr_vs_diffusers_db"] is None else f"{r['psnr_vs_diffusers_db']:.1f}"
        lines.append(f"| {r['system']} | {r['ready_s']:.1f} | {r['e2e_s']:.1f} | {r['unet_step_s']:.3f} "
                     f"| {r['peak_rss_gb']:.2f} | {speedup} | {quality} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sdonnx.errors import InputError
    from sdonnx.runtime.cli import parse_interval
    from sdonnx.quantize.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="report path without suffix (.md and .json)")
    parser.add_argument("--model", choices=list(PROMPTS), default="sd15")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated; see the module docstring")
    parser.add_argument("--size", type=int, default=None, help="image side (default 256 for sd15, 512 sdxl, 64 embedded)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--guidance-interval", type=parse_interval, default=(0.28, 5.42), metavar="LOW,HIGH",
                        help="sigmas where +interval systems apply guidance (default 0.28,5.42)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every system")
    parser.add_argument("--work", type=Path, default=CACHE / "harness")
    parser.add_argument("--optimum-venv", type=Path, default=CACHE / "optimum-venv")
    parser.add_argument("--sdcpp-venv", type=Path, default=CACHE / "sdcpp-venv")
    parser.add_argument("--openvino-venv", type=Path, default=CACHE / "ov-venv")
    parser.add_argument("--control", action="store_true",
                        help="sd15: every system runs with the full-size random ControlNet (sd15_random.py)")
    parser.add_argument("--prepare", action="store_true", help="only make the exports, variants and venv, then stop")
    args = parser.parse_args(argv)
    args.systems = args.systems.split(",")
    for system in args.systems:
        name, *modes = system.split("+")
        recipe = name.removeprefix("sdonnx-")
        known = name in ("diffusers", "optimum") or (name.startswith("sdonnx-") and recipe in ("fp32", *RECIPES))
        attentions = [m for m in modes if m in ATTENTION]
        sdcpp = (name.startswith("sdcpp-") and name.removeprefix("sdcpp-") in SDCPP_WTYPES
                 and set(modes) <= {"flash", *SDCPP_CACHES} and len(set(modes) & set(SDCPP_CACHES)) <= 1)
        if not sdcpp and (not known or not set(modes) <= {"lowmem", "cache", "interval", "deepcache", "openvino", *ATTENTION}
                          or len(attentions) > 1 or (modes and not name.startswith("sdonnx-"))):
            raise InputError("systems", system, "diffusers, optimum, sdcpp-WTYPE[+flash][+easycache|+ucache] with "
                             f"WTYPE in {', '.join(SDCPP_WTYPES)}, or sdonnx-RECIPE[+lowmem][+cache][+interval][+deepcache][+openvino]"
                             f"[+{'|+'.join(ATTENTION)}] with RECIPE in fp32, {', '.join(RECIPES)}")
    if args.size is not None and (args.size < 64 or args.size % 64):
        raise InputError("size", args.size, "a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> None:
    import onnxruntime

    args = parse_args(argv)
    if args.prepare:
        for system, (python, job) in plan_jobs(args).items():
            print(f"{system}: {python} {job['model']}")
        return
    rows = measure(args)
    command = "python benchmarks/harness.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = [
        f"# Side-by-side benchmark: {args.model}", "", f"- command: `{command}`",
        f"- date: {datetime.date.today()}; machine: {machine()}; Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}",
        f"- one image, prompt {PROMPTS[args.model]!r}, {args.steps} Euler steps, guidance {args.guidance}, "
        f"{args.threads} threads each; medians of {args.repeats} interleaved runs, each a fresh process",
        "- ready: construction until ready to generate (low-memory mode opens its graphs during the run); "
        "peak RSS: the process's, imports included",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
