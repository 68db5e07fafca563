"""Feature caching (DeepCache, Ma et al. 2024): the shallow U-Net graph and `cache_interval`.

`sdonnx export --feature-cache` writes unet_shallow/ beside unet/, and the U-Net returns deep_feature:
the features entering its last up block's last layer. On cached steps the pipeline runs only the shallow graph on
the deep_feature of the last full step. Asserted here: the split is exact (the shallow path on the
same step's deep_feature is the U-Net's output, in PyTorch and in ONNX), interval 1 is the uncached
image bit for bit, larger intervals run the full U-Net only every N steps and stay near the
uncached image, LoRAs reach the shallow graph, and requests it cannot serve fail by name.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import Pipeline
from sdonnx.runtime.manifest import Manifest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

PROMPT = "a red cube on a table"


def _psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))


def _shallow_matches_full(folder, **extra) -> None:
    from diffusers import UNet2DConditionModel

    from sdonnx.export.graphs import _UNet, _UNetShallow
    from sdonnx.export.source import SourceModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    source = SourceModel.__new__(SourceModel)  # only what the wrappers read
    source.unet, source.scheduler_config, source.text_time, source.upscaler = unet, {}, extra.pop("text_time", None), None
    full, shallow = _UNet(source, controlnet=False, deep_feature=True).eval(), _UNetShallow(source).eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn((2, unet.config.in_channels, 8, 6), generator=g)
    context = torch.randn((2, 5, unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        out, deep = full(sample, torch.tensor(321.0), context, **extra)
        again = shallow(sample, torch.tensor(321.0), context, **extra, deep_feature=deep)[0]
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_shallow_path_on_the_same_step_is_the_unet(kind, tiny_sources):
    _shallow_matches_full(tiny_sources[kind])


def test_shallow_path_with_sdxl_conditioning(tiny_sdxl_sources):
    from diffusers import UNet2DConditionModel

    from sdonnx.export.source import TextTime

    folder = tiny_sdxl_sources["sdxl"]
    config = UNet2DConditionModel.load_config(folder / "unet")
    g = torch.Generator().manual_seed(1)
    _shallow_matches_full(folder, text_time=TextTime(32, ("original_size", "crops_coords_top_left", "target_size"), 6),
                          text_embeds=torch.randn((2, 32), generator=g), time_ids=torch.rand((2, 6), generator=g) * 512)
    assert config["addition_embed_type"] == "text_time"


@pytest.fixture(scope="module")
def cached_export(tiny_sources, tmp_path_factory):
    from sdonnx.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("feature-cache") / "sd1"
    export_model(ExportConfig(source=str(tiny_sources["sd1"]), out=out, feature_cache=True, quiet=True))
    return out


def test_export_writes_the_shallow_graph_when_asked(cached_export, tiny_exports):
    m = Manifest.read(cached_export)
    assert m.graphs["unet"].output("deep_feature") is not None
    shallow = m.graphs["unet_shallow"]
    assert [t.name for t in shallow.inputs] == ["sample", "timestep", "encoder_hidden_states", "deep_feature"]
    plain = Manifest.read(tiny_exports["sd1"])  # the default keeps optimum's layout and IO exactly
    assert "unet_shallow" not in plain.graphs and [t.name for t in plain.graphs["unet"].outputs] == ["out_sample"]


@pytest.fixture(scope="module")
def pipe(cached_export):
    return Pipeline.load(cached_export, provider="cpu", progress=False)


def _count_runs(pipe, monkeypatch) -> dict[str, int]:
    """Runs per graph from now on (the sessions are opened lazily, so their class is patched)."""
    from sdonnx.runtime.session import Session

    counts: dict[str, int] = {}
    run = Session.run

    def counted(self, *args, **kwargs):
        counts[self.name] = counts.get(self.name, 0) + 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Session, "run", counted)
    return counts


def test_interval_one_is_the_uncached_image(pipe):
    (plain,) = pipe(PROMPT, steps=6, seed=3)
    (cached,) = pipe(PROMPT, steps=6, seed=3, cache_interval=1)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(cached))


@pytest.mark.parametrize(("interval", "full_runs"), [(2, 4), (3, 3)])
def test_interval_runs_the_full_unet_every_n_steps(pipe, monkeypatch, interval, full_runs):
    (plain,) = pipe(PROMPT, steps=8, seed=3)
    counts = _count_runs(pipe, monkeypatch)
    (cached,) = pipe(PROMPT, steps=8, seed=3, cache_interval=interval)
    assert counts.get("unet") == full_runs and counts.get("unet_shallow") == 8 - full_runs
    psnr = _psnr(plain, cached)
    assert 15 < psnr < 100, psnr  # near the uncached image, and not it


def test_multistep_evaluations_share_the_cache(pipe, monkeypatch):
    """Heun evaluates twice per step: the second evaluation of a cached step is shallow too."""
    counts = _count_runs(pipe, monkeypatch)
    pipe(PROMPT, steps=4, seed=3, sampler="heun", cache_interval=2)
    assert counts["unet"] + counts["unet_shallow"] == 7  # Heun: 2 per step, 1 on the last
    assert counts["unet_shallow"] >= 3


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_bad_interval_names_the_field(pipe, value):
    with pytest.raises(InputError) as e:
        pipe(PROMPT, steps=2, cache_interval=value)
    assert e.value.field == "cache_interval"


@pytest.mark.parametrize("folder", ["default-export", "optimum"])
def test_folder_without_shallow_graph_refuses_caching(folder, tiny_exports, optimum_fixture):
    pipe = Pipeline.load(tiny_exports["sd1"] if folder == "default-export" else optimum_fixture, provider="cpu",
                         progress=False)
    with pytest.raises(InputError, match="unet_shallow") as e:
        pipe(PROMPT, steps=2, cache_interval=2)
    assert e.value.field == "cache_interval"
    (image,) = pipe(PROMPT, steps=2, seed=1, cache_interval=1)  # interval 1 needs nothing new
    assert image.size[0] > 0


def test_loras_reach_the_shallow_graph(cached_export, tiny_sources, tmp_path):
    """A LoRA applied at load changes the shallow graph's share of the U-Net's weights too: with caching,
    the image is the one of an export with the LoRA baked in (which bakes it into both graphs)."""
    import diffusers
    import lora_files

    from sdonnx.export import ExportConfig, export_model

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    lora = lora_files.write_kohya(tmp_path / "style.safetensors", reference, text=False, conv=True, scale=0.3)
    baked_folder = tmp_path / "baked"
    export_model(ExportConfig(source=str(tiny_sources["sd1"]), out=baked_folder, feature_cache=True, quiet=True,
                              loras=((str(lora), 0.8),)))
    baked = Pipeline.load(baked_folder, provider="cpu", progress=False)
    pipe = Pipeline.load(cached_export, provider="cpu", progress=False)
    settings = dict(steps=6, seed=4, cache_interval=2)
    (applied,) = pipe(PROMPT, loras={str(lora): 0.8}, **settings)
    (expected,) = baked(PROMPT, **settings)
    (without,) = pipe(PROMPT, **settings)
    delta = np.abs(np.asarray(applied, np.int16) - np.asarray(expected, np.int16))
    assert delta.max() <= 2, delta.max()
    assert np.abs(np.asarray(without, np.int16) - np.asarray(expected, np.int16)).mean() > 1


def test_quantized_folder_keeps_the_shallow_graph(cached_export, tmp_path):
    """`sdonnx quantize` converts the shallow graph with the U-Net (dynamic int8 here) and caching still runs."""
    from sdonnx.quantize import QuantizeConfig, quantize_model

    out = tmp_path / "int8"
    manifest = quantize_model(QuantizeConfig(model=str(cached_export), out=out, recipe="int8", quiet=True))
    assert manifest.graphs["unet_shallow"].precision == "int8"
    pipe = Pipeline.load(out, provider="cpu", progress=False)
    (plain,) = pipe(PROMPT, steps=4, seed=2)
    (cached,) = pipe(PROMPT, steps=4, seed=2, cache_interval=2)
    assert 15 < _psnr(plain, cached) < 100
    with pytest.raises(InputError, match="int8 shallow") as e:  # LoRAs reach float shallow graphs only
        pipe(PROMPT, steps=2, cache_interval=2, loras={"style": 1.0})
    assert e.value.field == "cache_interval"


def test_cli_cache_interval_round_trips_through_the_png(cached_export, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "cached.png"
    run = subprocess.run([sys.executable, "-m", "sdonnx", "generate", PROMPT, "-m", str(cached_export), "--steps", "4",
                          "--seed", "5", "--cache-interval", "2", "-o", str(out), "-q"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    with Image.open(out) as written:
        assert "Cache interval: 2" in written.info["parameters"]
    again = tmp_path / "again.png"
    run = subprocess.run([sys.executable, "-m", "sdonnx", "generate", "--from-png", str(out), "-m", str(cached_export),
                          "-o", str(again), "-q"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
