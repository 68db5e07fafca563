"""`sdonnx export VAE OUT` for a standalone VAE folder: an AutoencoderKL (sd-vae-ft-mse, say) or an
AutoencoderTiny (TAESD). OUT gets vae_decoder/ and vae_encoder/ graphs with the model's IO names, each
checked against PyTorch at another batch and size than traced, and a manifest (`kind: vae`) that
runtime/vae.py reads for `--vae OUT`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sdonnx.errors import InputError

CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def vae_class(source: str) -> str | None:
    """The VAE class a local folder's config.json names (None: not a standalone VAE folder)."""
    config = Path(source).expanduser() / "config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in CLASSES else None


class _Decoder(torch.nn.Module):
    input_names, output_names = ("latent_sample",), ("sample",)

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return (self.vae.decode(latent_sample, return_dict=False)[0],)


class _Encoder(torch.nn.Module):
    """AutoencoderKL: the Gaussian's parameters (the runtime samples them); AutoencoderTiny: its latents."""

    input_names = ("sample",)

    def __init__(self, vae, tiny: bool):
        super().__init__()
        self.vae, self.tiny = vae, tiny
        self.output_names = ("latent_sample",) if tiny else ("latent_parameters",)

    def forward(self, sample):
        encoded = self.vae.encode(sample)
        return (encoded.latents,) if self.tiny else (encoded.latent_dist.parameters,)


def export_vae(config) -> object:
    """Export, check and atomically write the VAE folder config.source to config.out (an ExportConfig)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sdonnx.export import _Progress, _libraries_quiet, _versions
    from sdonnx.export.check import check_graph
    from sdonnx.export.attention import set_attention
    from sdonnx.export.graphs import Graph, export_graph, io_specs
    from sdonnx.files import staged_files, staged_folder
    from sdonnx.runtime.manifest import MANIFEST_NAME, GraphSpec, sha256_file
    from sdonnx.runtime.vae import DECODER, ENCODER, VaeManifest

    if config.dtype != "fp32" or config.static_shape is not None or config.loras:
        raise InputError("dtype" if config.dtype != "fp32" else "static_shape" if config.static_shape else "lora",
                         "given with a VAE SOURCE", "a plain fp32 export (a VAE takes no --dtype, --static-shape "
                         "or --lora)")
    name = vae_class(config.source)
    tiny = name == "AutoencoderTiny"
    say = _Progress(config.quiet)
    with staged_folder(config.out, overwrite=config.overwrite) as folder:
        say.line(f"loading {config.source}")
        with _libraries_quiet(config.quiet):
            vae = (AutoencoderTiny if tiny else AutoencoderKL).from_pretrained(
                Path(config.source).expanduser(), use_safetensors=True).float().eval().requires_grad_(False)
        down = 2 ** (len(vae.config.encoder_block_out_channels if tiny else vae.config.block_out_channels) - 1)
        channels = int(vae.config.latent_channels)
        generator = torch.Generator().manual_seed(0)
        graphs = {}
        for component, module, sizes in (
            (DECODER, _Decoder(vae), lambda b, h, w: (torch.randn((b, channels, h, w), generator=generator),)),
            (ENCODER, _Encoder(vae, tiny), lambda b, h, w: (torch.rand((b, 3, h * down, w * down),
                                                                       generator=generator) * 2 - 1,)),
        ):
            started = time.perf_counter()
            say.part(f"{component}: exporting…")
            axes = {n: {0: "batch_size", 2: f"{n}_height", 3: f"{n}_width"}
                    for n in (*module.input_names, *module.output_names)}
            set_attention(vae, config.attention)
            graph = Graph(component, module.eval(), module.input_names, module.output_names, axes, sizes(1, 5, 7),
                          sizes(2, 4, 6))
            path = folder / component / "model.onnx"
            cases = graph.cases()
            with torch.no_grad():
                export_graph(graph, path, opset=config.opset)
            say.part(" checking…")
            parity = check_graph(component, path, cases, min_psnr=config.min_psnr)
            say.line(f" max|Δ| {parity.max_abs_diff:.1e} PSNR {parity.psnr_db:.0f} dB "
                     f"({time.perf_counter() - started:.1f} s)")
            inputs, outputs, _ = io_specs(path)
            graphs[component] = GraphSpec(f"{component}/model.onnx", inputs, outputs, check=parity.as_dict())
        vae.save_config(folder / "vae")
        files = {p.relative_to(folder).as_posix(): sha256_file(p)
                 for p in staged_files(folder) if p.name != MANIFEST_NAME}
        manifest = VaeManifest(
            vae_class=name, latent_channels=channels, downsample=down,
            scaling_factor=float(vae.config.scaling_factor),
            shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
            graphs=graphs, versions=_versions(config.opset), files=files,
            source=f"{name} folder {Path(config.source).expanduser().resolve()}",
        )
        manifest.write(folder)
    say.line(f"wrote {config.out}")
    return manifest
