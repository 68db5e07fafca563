"""`sdonnx generate`, `upscale`, `preprocess` and `info`: the runtime's subcommands.

Flags map one to one onto GenerationConfig and RuntimeOptions fields; a flag left out keeps the
field's default. Every argument is checked before the model loads, and images are written to a
temporary file then renamed, so an error or Ctrl-C never leaves a partial PNG behind.
Each PNG carries its A1111-style `parameters` text (`metadata`); `--from-png FILE` reads those
settings back, and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdonnx.config import check_int, config_from_args
from sdonnx.errors import InputError
from sdonnx.files import replace_file
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime.integrity import verify_folder
from sdonnx.runtime.metadata import format_parameters, parse_parameters, read_parameters, write_png
from sdonnx.runtime.model import GRAPH_IO, REQUIRED, ModelFolder, read_facts
from sdonnx.runtime.pipeline import (
    REFINER_SWITCH, RNGS, GenerationConfig, Pipeline, check_before_load, check_hires_mix,
)
from sdonnx.runtime.providers import GRAPH_OPTIMIZATION, PROVIDERS, RuntimeOptions, available_providers
from sdonnx.runtime.memory import UNET_TILE
from sdonnx.runtime.request import DEFAULT_NOISE_LEVEL, check_request, check_upscale
from sdonnx.runtime.sampling import SAMPLERS
from sdonnx.runtime.schedules import SCHEDULES
from sdonnx.runtime.starts import IMG2IMG_STRENGTH, INPAINT_STRENGTH
from sdonnx.runtime.vae import load_vae

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate`, `upscale`, `preprocess` and `info` to the `sdonnx` command."""
    generate = subparsers.add_parser("generate", help="generate images from a prompt", description=_generate.__doc__)
    generate.add_argument("prompt", metavar="PROMPT", nargs="?", help="what to draw (optional with --from-png)")
    generate.add_argument(
        "-m", "--model", type=Path, default=EMBEDDED_MODEL,
        help="model folder, an sdonnx or optimum export (default: the embedded model, no download needed)",
    )
    add_sampling_flags(generate)
    generate.add_argument("--size", metavar="WxH", help="image size, e.g. 512x512 (default: the model's native size)")
    generate.add_argument("--original-size", metavar="WxH", help="SDXL micro-conditioning: the size the image "
                          "claims to come from (default: the image size)")
    generate.add_argument("--target-size", metavar="WxH", help="SDXL micro-conditioning (default: the image size)")
    generate.add_argument("--crop-top-left", metavar="TOP,LEFT", help="SDXL micro-conditioning crop (default 0,0)")
    generate.add_argument("--aesthetic-score", type=float, help="SDXL refiner: aesthetic score (default 6)")
    generate.add_argument("--negative-aesthetic-score", type=float, help="SDXL refiner: the negative half's (default 2.5)")
    generate.add_argument("--refiner", type=Path, metavar="FOLDER",
                          help="a second model (an SDXL refiner) that finishes the image from --refiner-switch on")
    generate.add_argument("--refiner-switch", type=float, metavar="F",
                          help="with --refiner: the share of the steps the base runs, 0..1 (default 0.8)")
    generate.add_argument("--init-image", type=Path, metavar="PATH", help="start from this image (img2img, inpaint)")
    generate.add_argument("--mask", type=Path, metavar="PATH", help="inpaint where this is white (needs --init-image)")
    generate.add_argument(
        "--strength", type=float,
        help=f"with --init-image: the share of the steps that runs, 0..1 (default {IMG2IMG_STRENGTH} for img2img, "
        f"{INPAINT_STRENGTH:g} with --mask)",
    )
    generate.add_argument(
        "--lora", action="append", dest="lora_specs", metavar="FILE:WEIGHT",
        help="apply a LoRA (a file, or a name in --lora-dir) at WEIGHT (default 1); repeatable, and the prompt "
        "may name more as <lora:NAME:WEIGHT>",
    )
    generate.add_argument("--lora-dir", type=Path, metavar="DIR", help="where <lora:NAME:...> and --lora names are found")
    generate.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                          help="textual-inversion files; each is used where its file name is a word of the prompt")
    generate.add_argument("--control", action="append", metavar="FOLDER",
                          help="steer with a ControlNet (an exported folder, or a name in --control-dir); repeatable, "
                          "each with its own --control-image")
    generate.add_argument("--control-image", action="append", type=Path, metavar="IMG",
                          help="the processed control image (edges, depth, pose) for the --control in the same place")
    for flag, what in (("scale", "residual weight (default 1)"),
                       ("start", "fraction of the steps where it starts acting (default 0)"),
                       ("end", "fraction of the steps where it stops (default 1)")):
        generate.add_argument(f"--control-{flag}", action="append", type=float, metavar="X",
                              help=f"per --control, in order: its {what}")
    generate.add_argument("--control-guess-mode", action="append", choices=("on", "off"),
                          help="per --control: guess mode, ControlNet on the conditional half only (default off)")
    generate.add_argument("--control-resize", action="append", choices=("stretch", "crop"),
                          help="per --control: fit the image to the size by stretching or centre-cropping "
                          "(default stretch)")
    generate.add_argument("--control-dir", type=Path, metavar="DIR", help="where --control names are found")
    generate.add_argument(
        "--from-png", type=Path, metavar="FILE",
        help="re-run the settings in FILE's parameters text (sdonnx or A1111); other flags override them",
    )
    generate.add_argument(
        "-o", "--output", default="image.png", help="PNG path; with --batch N: NAME-1.png ... (default image.png)"
    )
    add_runtime_flags(generate)
    generate.add_argument("--hires-scale", type=float, metavar="S",
                          help="hires fix: draw at --size, upscale by S (up to 4), then img2img there (A1111's)")
    generate.add_argument("--hires-strength", type=float,
                          help="hires fix: the second pass's denoising strength (default 0.7)")
    generate.add_argument("--hires-steps", type=int, help="hires fix: the second pass's steps (default: --steps)")
    generate.add_argument("--hires-upscaler", choices=("latent", "latent-nearest", "lanczos"),
                          help="hires fix: upscale the latent (bilinear, nearest) or the image (default latent)")
    generate.add_argument("--only-masked", action="store_true", default=None,
                          help="inpaint only the mask's area at --size, pasted back (A1111's \"Only masked\")")
    generate.add_argument("--only-masked-padding", type=int, metavar="PX",
                          help="with --only-masked: pixels around the mask's box (default 32)")
    generate.add_argument("--vae", type=Path, metavar="FOLDER",
                          help="decode (and encode) with this exported VAE instead of the model's (TAESD: fast)")
    generate.add_argument("--no-safety-checker", dest="safety_checker", action="store_false", default=None,
                          help="do not run the model folder's safety checker (on when the folder has one)")
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_preview_flags(generate)
    generate.set_defaults(func=_generate)

    upscale = subparsers.add_parser("upscale", help="make an image 4x larger with an x4 upscaler model",
                                    description=_upscale.__doc__)
    upscale.add_argument("prompt", metavar="PROMPT", help="what the image shows")
    upscale.add_argument("--image", type=Path, required=True, metavar="IMG", help="the low-res image to upscale")
    upscale.add_argument("-m", "--model", type=Path, required=True,
                         help="an x4 upscaler folder (`sdonnx export` of a StableDiffusionUpscalePipeline folder)")
    upscale.add_argument("--noise-level", type=int, default=DEFAULT_NOISE_LEVEL,
                         help="noise added to the low-res image, 0 to the model's maximum (350): more lets the model "
                         f"invent more detail and keep less of the image (default {DEFAULT_NOISE_LEVEL})")
    upscale.add_argument("--tile", type=int, metavar="PX",
                         help="run the U-Net on blended tiles of PX low-res pixels, for large images "
                         f"(default: whole; {UNET_TILE} with --low-memory)")
    add_sampling_flags(upscale)
    upscale.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                         help="textual-inversion files; each is used where its file name is a word of the prompt")
    upscale.add_argument("--no-safety-checker", dest="safety_checker", action="store_false", default=None,
                         help="do not run the model folder's safety checker (on when the folder has one)")
    upscale.add_argument("-o", "--output", default="upscaled.png",
                         help="PNG path; with --batch N: NAME-1.png ... (default upscaled.png)")
    upscale.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_preview_flags(upscale)
    add_runtime_flags(upscale)
    upscale.set_defaults(func=_upscale)

    preprocess = subparsers.add_parser("preprocess", help="make a control image for --control-image",
                                       description=_preprocess.__doc__)
    preprocess.add_argument("kind", choices=("canny", "onnx"),
                            help="canny edges (OpenCV), or onnx: a depth/normal/line model given as --model")
    preprocess.add_argument("image", type=Path, metavar="IMAGE", help="the picture to process")
    preprocess.add_argument("output", type=Path, metavar="OUT", help="the control image (PNG) to write")
    preprocess.add_argument("--low", type=int, default=100, help="canny's lower threshold, 0..255 (default 100)")
    preprocess.add_argument("--high", type=int, default=200, help="canny's upper threshold, 0..255 (default 200)")
    preprocess.add_argument("--model", type=Path, metavar="FILE.onnx", help="onnx: the preprocessor's graph")
    preprocess.add_argument("--size", type=int, help="onnx: the side to resize to for a dynamic input (default 384)")
    preprocess.add_argument("--mean", default="0.5", metavar="M[,M,M]", help="onnx: input mean (default 0.5)")
    preprocess.add_argument("--std", default="0.5", metavar="S[,S,S]", help="onnx: input std (default 0.5)")
    preprocess.add_argument("--invert", action="store_true", help="onnx: black where the map is largest")
    preprocess.set_defaults(func=_preprocess)

    info = subparsers.add_parser("info", help="show a model folder's facts and graphs", description=_info.__doc__)
    info.add_argument("model", metavar="MODEL", nargs="?", type=Path, default=EMBEDDED_MODEL,
                      help="model folder (default: the embedded model)")
    info.add_argument("--verify", action="store_true", help="re-hash every file against manifest.json, cache or not")
    add_runtime_flags(info)
    info.set_defaults(func=_info)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The flags generate and upscale share: prompts aside, how the sampler runs."""
    parser.add_argument("-n", "--negative-prompt", help="what the image should not show")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's recommended, else 30)")
    parser.add_argument(
        "--guidance", type=float,
        help="guidance scale, 0 to 50; <= 1 turns CFG off (default: the model's recommended, else 7.5)",
    )
    parser.add_argument("--guidance-rescale", type=float, help="guidance rescale in [0, 1] (default 0)")
    parser.add_argument(
        "--guidance-interval", metavar="LOW,HIGH",
        help="apply guidance only for sigmas in [LOW, HIGH]; other steps run the U-Net once, not twice (default: all)",
    )
    parser.add_argument(
        "--sampler",
        help=f"{', '.join(SAMPLERS)}, or A1111's name (\"Euler a\", \"DPM++ 2M\", ...) (default {_DEFAULTS['sampler']})",
    )
    parser.add_argument("--schedule", help=f"{', '.join(SCHEDULES)} sigmas (default {_DEFAULTS['schedule']})")
    parser.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    parser.add_argument("--batch", type=int, help="images to generate; image k uses seed + k (default 1)")
    parser.add_argument(
        "--rng", choices=RNGS,
        help="noise generator: torch (the noise of torch.manual_seed on CPU, as diffusers and A1111's CPU RNG) "
        "or numpy (default torch)",
    )
    parser.add_argument("--clip-skip", type=int, help="text encoder layer from the end, as A1111 counts (default 1)")
    parser.add_argument("--cache-interval", type=int, metavar="N",
                        help="feature caching (DeepCache): the whole U-Net every N steps, its shallow graph between; "
                        "needs a folder exported with --feature-cache (default 1: off)")


def add_preview_flags(parser: argparse.ArgumentParser) -> None:
    """--preview FILE.png and its companions (`preview_writer`)."""
    parser.add_argument("--preview", type=Path, metavar="FILE.png",
                        help="rewrite FILE.png (atomically) with the first image's step preview as steps go")
    parser.add_argument("--preview-every", type=int, default=1, metavar="N",
                        help="with --preview: every N steps (default 1)")
    parser.add_argument("--preview-vae", type=Path, metavar="FOLDER",
                        help="with --preview: decode the previews with this exported VAE (a TAESD: fast)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="auto", help=f"auto, {', '.join(PROVIDERS)} or an ORT provider name")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    parser.add_argument(
        "--graph-optimization", default="all", choices=list(GRAPH_OPTIMIZATION),
        help="onnxruntime graph optimization level (default all)",
    )
    parser.add_argument(
        "--no-memory-arena", dest="memory_arena", action="store_false",
        help="return memory between runs instead of keeping onnxruntime's arena (less RAM, slower)",
    )
    parser.add_argument("--device-id", type=int, default=0, help="GPU index for CUDA, DirectML, TensorRT (default 0)")
    parser.add_argument(
        "--graph-cache", type=Path, metavar="DIR",
        help="keep CPU graphs as onnxruntime optimized them in DIR, so later loads skip that work",
    )
    parser.add_argument(
        "--no-verify", dest="verify_integrity", action="store_false",
        help="load files that differ from the sha256 manifest.json records (default: refuse them)",
    )
    parser.add_argument(
        "--low-memory", action="store_true",
        help="lowest peak memory, slower: one graph open at a time, CFG halves in turn, VAE decoded in tiles",
    )


def _generate(args: argparse.Namespace) -> int:
    """Generate images from a prompt and write them as PNG files."""
    config = _config(args)
    init_image, mask = _checked_image("init_image", args.init_image), _checked_image("mask", args.mask)
    if mask is not None and init_image is None:
        raise InputError("mask", str(mask), "--init-image too (the image to inpaint)")
    outputs = output_paths(args.output, config.batch)
    _check_preview(args)
    options = config_from_args(RuntimeOptions, args)
    root, facts = read_facts(args.model)
    for name in ("lora_dir", "embeddings_dir", "control_dir"):
        if getattr(args, name) is not None and not getattr(args, name).is_dir():
            raise InputError(name, str(getattr(args, name)), "an existing folder")
    config = check_before_load(root, facts, options.memory, config, init_image, mask, lora_dir=args.lora_dir,
                               control_dir=args.control_dir).config
    _check_vaes(args, facts, ("vae", "preview_vae"))
    if args.refiner is not None:
        check_hires_mix(None, refiner=True, config=config)
        config = dataclasses.replace(config, refiner_switch=config.refiner_switch or REFINER_SWITCH)
        try:
            refiner_root, refiner_facts = read_facts(args.refiner)
        except InputError as e:
            raise InputError("refiner", e.received, e.expected) from None
        check_request(refiner_facts, refiner_root, options.memory, config, None, None)
    elif config.refiner_switch is not None:
        raise InputError("refiner_switch", config.refiner_switch, "--refiner too (the model to switch to)")

    pipe = Pipeline.load(root, options, progress=not args.quiet, lora_dir=args.lora_dir,
                         embeddings_dir=args.embeddings_dir, control_dir=args.control_dir,
                         safety_checker=args.safety_checker, vae=args.vae, preview_vae=args.preview_vae)
    _say_safety(args, pipe)
    refiner = Pipeline.load(refiner_root, options, progress=not args.quiet) if args.refiner is not None else None
    # img2img with an image, inpainting with a mask; the refiner finishes what the base began.
    images = pipe.generate(config, image=init_image, mask=mask, refiner=refiner, callback=preview_writer(args),
                           previews=args.preview is not None)
    if config.seed is None:
        print(f"seed: {images[0].info['seed']}")
    _write_images(args, images, outputs, lambda image: format_parameters(
        config, seed=image.info["seed"], size=image.info.get("generation_size", image.size), model=pipe.model,
        refiner=refiner.model if refiner is not None else None, lora_hashes=image.info.get("lora_hashes"),
        controlnets=image.info.get("controlnets"), vae=image.info.get("vae")))
    return 0


def _upscale(args: argparse.Namespace) -> int:
    """Make an image 4x larger after a prompt with an x4 upscaler model folder (SD's
    stable-diffusion-x4-upscaler, exported with `sdonnx export`) and write it as PNG."""
    interval = {} if args.guidance_interval is None else {"guidance_interval": parse_interval(args.guidance_interval)}
    config = config_from_args(GenerationConfig, args, **interval)
    image = _checked_image("image", args.image)
    outputs = output_paths(args.output, config.batch)
    _check_preview(args)
    options = config_from_args(RuntimeOptions, args)
    root, facts = read_facts(args.model)
    if args.embeddings_dir is not None and not args.embeddings_dir.is_dir():
        raise InputError("embeddings_dir", str(args.embeddings_dir), "an existing folder")
    config = check_upscale(facts, root, options.memory, config, image, args.noise_level, args.tile).config
    _check_vaes(args, facts, ("preview_vae",))
    pipe = Pipeline.load(root, options, progress=not args.quiet, embeddings_dir=args.embeddings_dir,
                         safety_checker=args.safety_checker, preview_vae=args.preview_vae)
    _say_safety(args, pipe)
    images = pipe.run_upscale(config, image=image, noise_level=args.noise_level, tile=args.tile,
                              callback=preview_writer(args), previews=args.preview is not None)
    if config.seed is None:
        print(f"seed: {images[0].info['seed']}")
    _write_images(args, images, outputs, lambda image: format_parameters(
        config, seed=image.info["seed"], size=image.size, model=pipe.model, noise_level=args.noise_level))
    return 0


def _check_vaes(args: argparse.Namespace, facts, flags: tuple[str, ...]) -> None:
    """Each VAE folder given among `flags`: its manifest against the model's latent space, before loading."""
    for name in flags:
        if getattr(args, name) is not None:
            try:
                load_vae(getattr(args, name), facts, lambda graph, component: None)
            except InputError as e:
                raise InputError(name, e.received, e.expected) from None


def _write_images(args: argparse.Namespace, images, outputs, parameters_of) -> None:
    """Each image to its PNG path with parameters_of(image) as its parameters text (atomically, write_png)."""
    for image, path in zip(images, outputs):
        write_png(image, path, parameters_of(image))
        if not args.quiet:
            print(f"wrote {path}" + (" (black: the safety checker flagged it)" if image.info.get("nsfw") else ""))


def _check_preview(args: argparse.Namespace) -> None:
    if args.preview is not None:
        check_int("preview_every", args.preview_every, 1)
        if args.preview.suffix.lower() != ".png" or not args.preview.parent.is_dir():
            raise InputError("preview", str(args.preview), "a .png path in an existing folder")


def _say_safety(args: argparse.Namespace, pipe: Pipeline) -> None:
    """The one-line notice of whether the safety checker runs."""
    if not args.quiet:
        print("safety checker: " + ("on (--no-safety-checker turns it off)" if pipe.safety else
                                    "off" if args.safety_checker is False else "none in this model folder"),
              file=sys.stderr)


def preview_writer(args: argparse.Namespace):
    """With --preview: a step callback that rewrites the preview file every --preview-every steps."""
    if args.preview is None:
        return None

    def write(step: int, sigma: float, latents, preview) -> None:
        if (step + 1) % args.preview_every == 0:
            image = preview()[0]
            replace_file(args.preview, lambda f: image.save(f, format="PNG"))

    return write


def _config(args: argparse.Namespace) -> GenerationConfig:
    """The flags as a GenerationConfig, over the settings of --from-png's file when given."""
    saved = parse_parameters(read_parameters(args.from_png)) if args.from_png is not None else {}
    if args.init_image is None:
        if args.strength is not None:
            raise InputError("strength", args.strength, "--init-image too (strength is how far to noise it)")
        saved.pop("strength", None)  # an img2img PNG re-run without its init image is a text-to-image run
    if args.refiner is None:
        saved.pop("refiner_switch", None)  # the refiner is named in the file, but only --refiner loads one
    if args.prompt is None and "prompt" not in saved:
        raise InputError("prompt", None, "a prompt, or --from-png FILE")
    parsed = {}
    if args.size is not None:
        parsed["width"], parsed["height"] = parse_size(args.size)
    if args.guidance_interval is not None:
        parsed["guidance_interval"] = parse_interval(args.guidance_interval)
    for flag, field in (("original_size", "original_size"), ("target_size", "target_size")):
        if getattr(args, flag) is not None:
            width, height = parse_size(getattr(args, flag), field)
            parsed[field] = (height, width)  # diffusers' order
    if args.crop_top_left is not None:
        parsed["crops_coords_top_left"] = parse_pair(args.crop_top_left, "crops_coords_top_left")
    if args.lora_specs:
        parsed["loras"] = tuple(parse_lora(spec) for spec in args.lora_specs)
    parsed["control"] = parse_controls(args)
    return config_from_args(GenerationConfig, args, defaults=saved, **parsed)


def parse_controls(args: argparse.Namespace) -> tuple:
    """--control FOLDER --control-image IMG [--control-scale S ...] (repeatable) -> Controls, paired by
    position; a per-control flag given more often than --control is an error."""
    from sdonnx.runtime.controlnet import Control

    folders, images = args.control or [], args.control_image or []
    if len(images) != len(folders):
        raise InputError("control_image", [str(i) for i in images], f"one image per --control ({len(folders)})")
    per = {name: getattr(args, f"control_{name}") or [] for name in ("scale", "start", "end", "guess_mode", "resize")}
    for name, values in per.items():
        if len(values) > len(folders):
            raise InputError(f"control_{name}", values, f"at most one per --control ({len(folders)})")
    controls = []
    for i, (folder, image) in enumerate(zip(folders, images)):
        given = {name: values[i] for name, values in per.items() if i < len(values)}
        if "guess_mode" in given:
            given["guess_mode"] = given["guess_mode"] == "on"
        controls.append(Control(folder, str(_checked_image("control_image", image)), **given))
    return tuple(controls)


def parse_lora(spec: str) -> tuple[str, float]:
    """--lora FILE:WEIGHT (or FILE, weight 1) -> (FILE, WEIGHT); a colon inside the path stays in it."""
    name, _, weight = spec.rpartition(":")
    try:
        return (name, float(weight)) if name else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def _checked_image(name: str, path: Path | None) -> Path | None:
    """`path` if it is a readable image (checked before the model loads), else InputError."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise InputError(name, str(path), f"a readable image file ({e})") from None
    return path


def _preprocess(args: argparse.Namespace) -> int:
    """Turn a picture into a control image: canny edges (needs `pip install "sdonnx[control]"`), or the
    map an ONNX preprocessor model you supply makes (depth, normals, line art)."""
    from sdonnx.files import output_files, replace_file
    from sdonnx.runtime.preprocess import canny, onnx_map

    (path,) = output_files(args.output, 1)
    image = _checked_image("image", args.image)
    if args.kind == "canny":
        made = canny(image, args.low, args.high)
    else:
        if args.model is None:
            raise InputError("model", None, "--model FILE.onnx: the preprocessor to run")
        made = onnx_map(image, args.model, size=args.size, mean=_numbers("mean", args.mean),
                        std=_numbers("std", args.std), invert=args.invert)
    replace_file(path, lambda f: made.save(f, format="PNG"))
    print(f"wrote {path}")
    return 0


def _numbers(field: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(field, text, "a number, or three joined by commas") from None


def _info(args: argparse.Namespace) -> int:
    """Show what the runtime reads from a model folder: its facts, each graph's IO, the providers."""
    options = config_from_args(RuntimeOptions, args)
    optional = [c for c in GRAPH_IO if c not in REQUIRED]
    model = ModelFolder.load(args.model, options, optional=optional)
    m = model.manifest
    if args.verify:
        checked = verify_folder(model.root, None if model.derived else m, full=True)
        print(f"verified: {checked.skipped or f'{len(checked.hashed)} files match manifest.json'}")
    print(f"model: {model.root}")
    print(f"facts from: {'configs (no manifest.json; derived)' if model.derived else 'manifest.json'}")
    for name in ("family", "prediction_type", "latent_channels", "vae_scaling_factor", "vae_shift_factor",
                 "vae_downsample", "unet_in_channels", "cross_attention_dim", "sample_size", "tokenizer_max_length",
                 "text_hidden_states", "pooled_text_encoder", "time_ids", "force_zeros_for_empty_prompt",
                 "vae_force_upcast", "unet_attention", "recommended"):
        print(f"  {name}: {getattr(m, name)}")
    if m.upscaler is not None:
        print(f"  upscaler: x{m.vae_downsample}, noise levels 0 to {m.upscaler.max_noise_level}")
    print(f"  default image size: {m.default_image_size}x{m.default_image_size}")
    s = m.schedule
    print(
        f"  schedule: {s.beta_schedule}, {s.num_train_timesteps} training steps, "
        f"{s.timestep_spacing} spacing, steps_offset {s.steps_offset}"
    )
    print("graphs:")
    for name, session in model.sessions.items():
        where = session.path.relative_to(model.root)
        print(f"  {name}: {where} ({m.graphs[name].precision}, runs on {session.providers[0]})")
        for kind, specs in (("in ", session.inputs), ("out", session.outputs)):
            for t in specs:
                print(f"    {kind} {t.name}: {t.dtype} [{', '.join(str(d) for d in t.shape)}]")
    print(f"providers available: {', '.join(available_providers())}")
    return 0


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """"512x768" -> (512, 768) as (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise InputError(field, text, "WIDTHxHEIGHT, e.g. 512x512")
    return int(match[1]), int(match[2])


def parse_pair(text: str, field: str) -> tuple[int, int]:
    """"16,32" -> (16, 32)."""
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None:
        raise InputError(field, text, "two integers, e.g. 0,0")
    return int(match[1]), int(match[2])


def parse_interval(text: str) -> tuple[float, float]:
    """"0.3,5" -> (0.3, 5.0); GenerationConfig checks the order."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError("guidance_interval", text, "LOW,HIGH sigmas, e.g. 0.3,5") from None
    return low, high


def output_paths(path: str | Path, batch: int) -> list[Path]:
    """The PNG path(s) to write; InputError now, before any work, if they cannot be written (`output_files`)."""
    from sdonnx.files import output_files

    return output_files(path, batch)
