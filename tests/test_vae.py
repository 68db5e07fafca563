"""A VAE of its own (runtime/vae.py, export/vae.py): a tiny random AutoencoderTiny (TAESD) and a
standalone AutoencoderKL exported by `sdonnx export`, used by the pipeline instead of the model's;
images against diffusers' pipeline with the same VAE swapped in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdonnx.errors import InputError  # noqa: E402
from sdonnx.export import ExportConfig, export_model  # noqa: E402
from sdonnx.runtime.metadata import read_parameters  # noqa: E402
from sdonnx.runtime.noise import noise_source  # noqa: E402
from sdonnx.runtime.pipeline import Pipeline  # noqa: E402
from sdonnx.runtime.vae import VaeManifest  # noqa: E402

PROMPT, STEPS, GUIDANCE = "a red cube", 4, 7.5
TOLERANCE = 2 / 255


def tiny_taesd(latent_channels: int = 4):
    torch.manual_seed(0)
    return diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                     num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                                     latent_channels=latent_channels).eval()


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    vae = tiny_taesd()
    vae.save_pretrained(root / "source", safe_serialization=True)
    manifest = export_model(ExportConfig(source=str(root / "source"), out=root / "onnx", quiet=True))
    return vae, root / "onnx", manifest


def test_export_writes_both_graphs_checked(taesd):
    _, folder, manifest = taesd
    assert isinstance(manifest, VaeManifest) and manifest.vae_class == "AutoencoderTiny"
    assert (manifest.latent_channels, manifest.downsample, manifest.scaling_factor) == (4, 8, 1.0)
    assert set(manifest.graphs) == {"vae_decoder", "vae_encoder"}
    assert all(spec.check["psnr_db"] >= 60 for spec in manifest.graphs.values())
    assert VaeManifest.read(folder) == manifest


def test_taesd_images_match_diffusers_with_it_swapped_in(taesd, tiny_sources, tiny_exports):
    vae, folder, _ = taesd
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, vae=folder)
    m = pipe.manifest
    x = noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None,
                                                                  vae=copy.deepcopy(vae))
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(x),
                         output_type="np").images[0]
    got = pipe(PROMPT, latents=x, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=0)[0]
    assert np.abs(np.asarray(got, np.float64) / 255 - expected).max() <= TOLERANCE
    own = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False)(PROMPT, latents=x, steps=STEPS,
                                                                              guidance=GUIDANCE, sampler="euler")[0]
    assert np.abs(np.asarray(got, int) - np.asarray(own, int)).max() > 10  # it is another decoder
    assert got.info["vae"][0] == folder.name


def test_img2img_encodes_with_it(taesd, tiny_exports):
    _, folder, _ = taesd
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, vae=folder)
    made = pipe.img2img(PROMPT, image=Image.new("RGB", (64, 64), "red"), seed=1, steps=4, strength=0.5)
    assert made[0].size == (64, 64)


def test_a_standalone_copy_of_the_models_own_vae_gives_its_images(tiny_sources, tiny_exports, tmp_path):
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_sources["sd1"] / "vae")
    vae.save_pretrained(tmp_path / "kl", safe_serialization=True)
    export_model(ExportConfig(source=str(tmp_path / "kl"), out=tmp_path / "kl-onnx", quiet=True))
    swapped = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, vae=tmp_path / "kl-onnx")
    own = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False)
    a, b = (p(PROMPT, seed=3, steps=3)[0] for p in (swapped, own))
    assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def test_bad_vae_folders_are_named(tiny_exports, tmp_path):
    with pytest.raises(InputError) as error:
        Pipeline.load(tiny_exports["sd1"], vae=tmp_path)
    assert error.value.field == "vae"
    with pytest.raises(InputError, match="kind"):
        Pipeline.load(tiny_exports["sd1"], vae=tiny_exports["sd2"])
    other = tiny_taesd(latent_channels=3)
    other.save_pretrained(tmp_path / "three", safe_serialization=True)
    export_model(ExportConfig(source=str(tmp_path / "three"), out=tmp_path / "three-onnx", quiet=True))
    with pytest.raises(InputError, match="latent_channels"):
        Pipeline.load(tiny_exports["sd1"], vae=tmp_path / "three-onnx")


def test_cli_vae_is_checked_first_and_recorded(taesd, tiny_exports, tmp_path, capsys):
    from sdonnx.cli import main

    _, folder, _ = taesd
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "-m", str(tiny_exports["sd1"]), "--vae", str(folder), "--steps", "2", "-q",
                 "-o", str(out)]) == 0
    assert f"VAE: {folder.name}" in read_parameters(out)
    assert main(["generate", PROMPT, "--vae", str(tmp_path), "-o", str(out)]) == 2
    assert "--vae" in capsys.readouterr().err


def test_the_server_serves_vaes_by_name(taesd, tmp_path):
    pytest.importorskip("uvicorn")
    webuiapi = pytest.importorskip("webuiapi")
    import shutil

    import requests

    from sdonnx.serve.config import ServeConfig
    from test_serve import Running, free_port

    _, folder, _ = taesd
    vaes = tmp_path / "vaes"
    shutil.copytree(folder, vaes / "taesd")
    three = tiny_taesd(latent_channels=3)
    three.save_pretrained(tmp_path / "three", safe_serialization=True)
    export_model(ExportConfig(source=str(tmp_path / "three"), out=vaes / "three", quiet=True))
    running = Running(ServeConfig(port=free_port(), vae_dir=vaes))
    try:
        api = webuiapi.WebUIApi(baseurl=running.url + "/sdapi/v1")
        assert [v["model_name"] for v in api.get_sd_vae()] == ["taesd", "three"]
        body = {"prompt": PROMPT, "seed": 4, "steps": 4, "sampler_name": "Euler", "cfg_scale": 2}
        r = requests.post(running.url + "/sdapi/v1/txt2img", timeout=60,
                          json={**body, "override_settings": {"sd_vae": "taesd"}})
        assert r.status_code == 200, r.text
        import base64
        import io

        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        want = Pipeline.load(progress=False, vae=vaes / "taesd")(PROMPT, seed=4, steps=4, sampler="euler",
                                                                 guidance=2.0)[0]
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert "VAE: taesd" in r.json()["info"]
        for bad, expected in (("nope", "served VAEs"), ("three", "latent_channels")):
            r = requests.post(running.url + "/sdapi/v1/txt2img", timeout=60,
                              json={**body, "override_settings": {"sd_vae": bad}})
            assert r.status_code == 422 and expected in r.text
            assert r.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_vae"]
        api.set_options({"sd_vae": "taesd"})
        assert api.get_options()["sd_vae"] == "taesd"
        r = requests.post(running.url + "/sdapi/v1/txt2img", json=body, timeout=60)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert(
            "RGB")), np.asarray(want))
    finally:
        running.stop()


def test_preview_vae_decodes_only_the_previews(taesd, tiny_exports):
    _, folder, _ = taesd
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, preview_vae=folder)
    own = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False)
    swapped = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, vae=folder)
    shown = []
    image = pipe(PROMPT, seed=2, steps=3, sampler="euler", callback=lambda i, s, x, preview: shown.append(preview()),
                 previews=True)[0]
    assert np.array_equal(np.asarray(image), np.asarray(own(PROMPT, seed=2, steps=3, sampler="euler")[0]))
    final = swapped(PROMPT, seed=2, steps=3, sampler="euler")[0]  # Euler's last x0 estimate, decoded by TAESD
    assert np.array_equal(np.asarray(shown[-1][0]), np.asarray(final))
    with pytest.raises(InputError) as error:
        Pipeline.load(tiny_exports["sd1"], preview_vae=tiny_exports["sd2"])
    assert error.value.field == "preview_vae"
