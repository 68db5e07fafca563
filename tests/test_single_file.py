"""Single-file (original LDM layout) checkpoints and Hub downloads as export sources.

The tiny diffusers pipelines are written in the original layout by tests/ldm_checkpoint.py; loading them
back through diffusers' converters must give every weight back bit for bit. The Hub is never contacted:
snapshot_download is replaced by stubs that raise huggingface_hub's own errors or copy from a local folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from ldm_checkpoint import to_ldm_state_dict, write_ldm_checkpoint  # noqa: E402
from sdonnx.errors import ExportError, InputError  # noqa: E402
from sdonnx.export import hub  # noqa: E402
from sdonnx.export.single_file import bundled_config, detect_family, load_single_file  # noqa: E402

COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def ldm_files(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    """{"sd1": path, "sd2": path}: the tiny pipelines as original-layout .safetensors checkpoints."""
    root = tmp_path_factory.mktemp("ldm")
    return {kind: write_ldm_checkpoint(folder, root / f"{kind}.safetensors", kind) for kind, folder in tiny_sources.items()}


def assert_weights_equal(source, folder: Path, cast=lambda t: t) -> None:
    for name, file in COMPONENT_FILES.items():
        expected = load_file(str(folder / file))
        got = getattr(source, name).state_dict()
        assert set(got) == set(expected), name
        for key, tensor in expected.items():
            assert got[key].dtype == torch.float32, key
            assert torch.equal(got[key], cast(tensor)), key


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_round_trip_gives_back_every_weight(kind, tiny_sources, ldm_files):
    folder = tiny_sources[kind]
    source = load_single_file(ldm_files[kind], allow_pickle=False, config=folder)

    assert_weights_equal(source, folder)
    assert source.scheduler_config == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert source.tokenizer.pad_token == json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"]
    assert ldm_files[kind].name in source.description and str(folder) in source.description
    assert not any(p.requires_grad for p in source.unet.parameters())


def test_fp16_checkpoint_loads_as_fp32(tiny_sources, tmp_path):
    folder = tiny_sources["sd1"]
    path = tmp_path / "half.safetensors"
    save_file({key: tensor.half() for key, tensor in to_ldm_state_dict(folder).items()}, str(path))

    source = load_single_file(path, allow_pickle=False, config=folder)

    assert_weights_equal(source, folder, cast=lambda t: t.half().float())


def test_keys_pick_the_family_and_its_bundled_config(tiny_sources):
    for kind, hidden in (("sd1", 768), ("sd2", 1024)):
        keys = to_ldm_state_dict(tiny_sources[kind], kind).keys()
        assert detect_family(keys, Path("x.safetensors")) == kind
        config = bundled_config(kind)
        assert json.loads((config / "unet" / "config.json").read_text())["cross_attention_dim"] == hidden
        assert json.loads((config / "text_encoder" / "config.json").read_text())["hidden_size"] == hidden


def test_without_config_a_non_standard_size_is_refused_before_conversion(ldm_files):
    with pytest.raises(ExportError, match=r"SD 1\.x key layout.*bundled SD 1\.5 config.*config folder") as error:
        load_single_file(ldm_files["sd1"], allow_pickle=False, config=None)
    assert "input_blocks.0.0.weight has shape (32, 4, 3, 3), expected (320, 4, 3, 3)" in str(error.value)


def test_bundled_sd2_tokenizer_pads_with_exclamation_mark():
    from sdonnx.export.single_file import FAMILIES, _load_tokenizer

    tokenizer = _load_tokenizer(FAMILIES["sd2"], config=None)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("!", 0)
    assert _load_tokenizer(FAMILIES["sd1"], config=None).pad_token_id == 49407


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_is_refused_without_allow_pickle(suffix, tmp_path, monkeypatch):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    monkeypatch.setattr(torch, "load", _forbidden_torch_load)

    with pytest.raises(ExportError, match=r"runs code.*--allow-pickle") as error:
        load_single_file(path, allow_pickle=False, config=None)
    assert str(path) in str(error.value)


def test_safetensors_are_read_without_torch_load(tiny_sources, ldm_files, monkeypatch):
    monkeypatch.setattr(torch, "load", _forbidden_torch_load)
    source = load_single_file(ldm_files["sd1"], allow_pickle=True, config=tiny_sources["sd1"])
    assert source.unet is not None


def test_pickle_with_allow_pickle_unwraps_the_training_state_dict(tiny_sources, tmp_path):
    folder = tiny_sources["sd1"]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(folder), "global_step": 470000}, path)

    assert_weights_equal(load_single_file(path, allow_pickle=True, config=folder), folder)


class TrainerCallback:
    """Stands in for the PyTorch Lightning objects training checkpoints pickle beside the weights."""


def test_allowed_pickle_with_arbitrary_objects_falls_back_to_full_unpickling(tiny_sources, tmp_path):
    folder = tiny_sources["sd1"]
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(folder), "callbacks": TrainerCallback()}, path)

    assert_weights_equal(load_single_file(path, allow_pickle=True, config=folder), folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_error_names_the_file(damage, ldm_files, tmp_path):
    data = ldm_files["sd1"].read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 64, "empty": b""}[damage])

    with pytest.raises(ExportError, match="cannot read it as a safetensors file") as error:
        load_single_file(path, allow_pickle=False, config=None)
    assert str(path) in str(error.value)


def test_corrupt_pickle_error_names_the_file(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")

    with pytest.raises(ExportError, match="cannot read it as a PyTorch checkpoint") as error:
        load_single_file(path, allow_pickle=True, config=None)
    assert str(path) in str(error.value)


def test_non_sd_safetensors_says_which_keys_were_expected(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1), "lora_te_text.weight": torch.ones(2, 2)}, str(path))

    with pytest.raises(ExportError, match=r"not a Stable Diffusion 1\.x/2\.x checkpoint") as error:
        load_single_file(path, allow_pickle=False, config=None)
    for expected in ("model.diffusion_model.*", "first_stage_model.*", "cond_stage_model.transformer.*"):
        assert expected in str(error.value)


def test_sdxl_checkpoint_missing_its_second_text_encoder_is_refused(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]
    save_file({key: torch.zeros(1) for key in keys}, str(path))

    with pytest.raises(ExportError, match="SDXL"):
        load_single_file(path, allow_pickle=False, config=None)


@pytest.mark.parametrize(
    "dropped, expected",
    [
        ("model.diffusion_model.middle_block.1.", r"lacks unet weights"),
        ("cond_stage_model.transformer.text_model.encoder.layers.1.", r"lacks text_encoder weights.*layers\.1\."),
    ],
)
def test_missing_weights_are_reported_not_left_uninitialised(dropped, expected, tiny_sources, tmp_path):
    folder = tiny_sources["sd1"]
    path = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in to_ldm_state_dict(folder).items() if not k.startswith(dropped)}, str(path))

    with pytest.raises(ExportError, match=expected):
        load_single_file(path, allow_pickle=False, config=folder)


def test_config_that_does_not_describe_the_checkpoint(tiny_sources, ldm_files):
    with pytest.raises(ExportError, match="do not fit"):
        load_single_file(ldm_files["sd1"], allow_pickle=False, config=tiny_sources["sd2"])


def test_config_folder_must_hold_the_component_configs(ldm_files, tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")

    with pytest.raises(InputError, match=r"missing: vae/config\.json, text_encoder/config\.json"):
        load_single_file(ldm_files["sd1"], allow_pickle=False, config=tmp_path)


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ExportError, match=r"unsupported checkpoint suffix '\.gguf'"):
        load_single_file(path, allow_pickle=True, config=None)


def test_single_file_exports_end_to_end(tiny_sources, ldm_files, tmp_path):
    from sdonnx.export import ExportConfig, export_model

    manifest = export_model(
        ExportConfig(source=str(ldm_files["sd2"]), out=tmp_path / "out", config=tiny_sources["sd2"], quiet=True)
    )

    assert manifest.prediction_type == "v_prediction"
    assert ldm_files["sd2"].name in manifest.source
    assert (tmp_path / "out" / "unet" / "model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_full_size_checkpoint_converts_with_the_bundled_config(kind, tmp_path):
    """A random-weight SD 1.5 / 2.1 in fp16, the usual civitai form, through auto-detection (~1 min, ~7 GB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / kind
    shutil.copytree(bundled_config(kind), folder)
    torch.manual_seed(0)
    for name, build in (
        ("unet", lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))),
        ("vae", lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))),
    ):
        build().half().save_pretrained(folder / name)
    path = write_ldm_checkpoint(folder, tmp_path / f"{kind}.safetensors", kind)

    source = load_single_file(path, allow_pickle=False, config=None)

    assert_weights_equal(source, folder, cast=lambda t: t.float())
    assert source.scheduler_config["prediction_type"] == {"sd1": "epsilon", "sd2": "v_prediction"}[kind]


def _forbidden_torch_load(*args, **kwargs):
    raise AssertionError("torch.load must not be called")


# ---- Hub -------------------------------------------------------------------------------------------

REPO = "someone/tiny-sd"


def _http_error(cls, status: int):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub >= 1.0 builds its errors from httpx2 responses

    response = httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}"))
    return cls(f"{status} Client Error", response=response)


def _raising(error):
    def snapshot_download(*args, **kwargs):
        raise error

    return snapshot_download


@pytest.mark.parametrize(
    "make_error, expected",
    [
        (lambda e: _http_error(e.RepositoryNotFoundError, 404), r"no such Hub repository"),
        (lambda e: _http_error(e.GatedRepoError, 403), r"gated"),
        (lambda e: _http_error(e.RevisionNotFoundError, 404), r"no revision 'v9'"),
        (lambda e: e.LocalEntryNotFoundError("offline"), r"HF_HUB_OFFLINE"),
        (lambda e: _http_error(e.HfHubHTTPError, 500), r"download from the Hub failed"),
    ],
)
def test_hub_errors_become_export_errors(make_error, expected, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(make_error(errors)))

    with pytest.raises(ExportError, match=expected) as error:
        hub.download(REPO, revision="v9")
    assert REPO in str(error.value)
    if "revision" not in expected:
        assert "local diffusers folder or a single-file checkpoint" in str(error.value)


# A realistic SD repository: what export needs, plus pickles, variants, extra components and checkpoints.
EXTRA_REMOTE_FILES = (
    "README.md",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/model.fp16.safetensors",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
)


def _fake_hub(remote: Path, snapshot: Path):
    """A snapshot_download that copies the remote files selected by the patterns, as the Hub filters them."""
    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        files = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    return snapshot_download


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_hub_download_fetches_only_what_export_reads(tiny_sources, tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(tiny_sources["sd1"], remote)
    needed = _files(remote)
    for name in EXTRA_REMOTE_FILES:
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, tmp_path / "snapshot"))

    folder = hub.download(REPO)

    assert folder == tmp_path / "snapshot"
    assert _files(folder) == needed


def test_hub_download_falls_back_to_fp16_only_where_nothing_else(tiny_sources, tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(tiny_sources["sd1"], remote)
    (remote / "unet" / "diffusion_pytorch_model.safetensors").rename(remote / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (remote / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, tmp_path / "snapshot"))

    folder = hub.download(REPO)

    weights = {name for name in _files(folder) if name.endswith(".safetensors")}
    assert weights == {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }


def test_hub_download_refuses_a_repo_with_only_pickles(tiny_sources, tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(tiny_sources["sd1"], remote)
    (remote / "text_encoder" / "model.safetensors").rename(remote / "text_encoder" / "pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, tmp_path / "snapshot"))

    with pytest.raises(ExportError, match=r"no safetensors weights for text_encoder.*\.bin"):
        hub.download(REPO)
