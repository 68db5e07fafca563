"""Integrity: a model folder's files must be those its manifest.json hashed (runtime/integrity.py).

Each test works on a copy of the embedded model (38 MB, shipped, so no export is needed) and a
HOME of its own, so no cache is written outside tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from sdonnx.errors import ModelError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime import integrity
from sdonnx.runtime.integrity import CACHE_NAME, default_cache_files, file_digests, verify_folder
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.metadata import model_hash
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.providers import RuntimeOptions

UNET = "unet/model.onnx"
TXT2IMG = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A HOME (and no XDG_CACHE_HOME) of the test's own: the fallback cache lands in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "home"


@pytest.fixture
def folder(tmp_path, home) -> Path:
    """A copy of the embedded model; copy2 keeps the old mtimes, so digests are cacheable at once."""
    return Path(shutil.copytree(EMBEDDED_MODEL, tmp_path / "model"))


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files hash_file reads, in order: every full read of a file goes through it."""
    calls: list[str] = []
    real = integrity.hash_file

    def counting(path: Path) -> str:
        calls.append(Path(path).as_posix())
        return real(path)

    monkeypatch.setattr(integrity, "hash_file", counting)
    return calls


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte in place: same size and inode, new content (and a new mtime)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def options(verify: bool) -> RuntimeOptions:
    return RuntimeOptions(provider="cpu", verify_integrity=verify)


def test_embedded_model_verifies_and_the_second_verify_hashes_nothing(folder, home, hashed):
    manifest = Manifest.read(folder)
    first = verify_folder(folder, manifest)
    assert set(first.checked) == set(manifest.files) and set(first.hashed) == set(manifest.files)
    assert len(hashed) == len(manifest.files)
    assert first.cache_file == default_cache_files(folder)[0] and first.cache_file.is_file()
    assert first.cache_file.is_relative_to(home / ".cache" / "sdonnx" / "verified")
    assert not (folder / CACHE_NAME).exists()  # the model folder is never written
    cached = json.loads(first.cache_file.read_text())["files"]
    assert cached[UNET]["sha256"] == manifest.files[UNET]
    assert cached[UNET]["size"] == (folder / UNET).stat().st_size

    hashed.clear()
    mtime = first.cache_file.stat().st_mtime_ns
    second = verify_folder(folder, manifest)
    assert hashed == [] and second.hashed == ()
    assert set(second.checked) == set(manifest.files)
    assert first.cache_file.stat().st_mtime_ns == mtime  # nothing changed: the cache is not rewritten


def test_flipped_byte_of_the_unet_is_named_despite_the_cache(folder, hashed):
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)  # every digest cached
    before = (folder / UNET).stat()
    flip_byte(folder / UNET)
    after = (folder / UNET).stat()
    assert after.st_size == before.st_size and after.st_mtime_ns != before.st_mtime_ns
    hashed.clear()
    with pytest.raises(ModelError) as error:
        verify_folder(folder, manifest)
    message = str(error.value)
    assert str(folder / UNET) in message
    assert manifest.files[UNET][:12] in message and sha256(folder / UNET)[:12] in message
    assert "verify_integrity=False" in message
    assert hashed == [(folder / UNET).as_posix()]  # the one changed file was re-read, no other


def test_full_verify_ignores_a_cache_fooled_by_a_restored_mtime(folder, hashed):
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    st = (folder / UNET).stat()
    flip_byte(folder / UNET)
    os.utime(folder / UNET, ns=(st.st_atime_ns, st.st_mtime_ns))  # size, inode and mtime as cached
    verify_folder(folder, manifest)  # the stat-keyed cache cannot see this edit (documented)
    hashed.clear()
    with pytest.raises(ModelError, match="unet/model.onnx: sha256"):
        verify_folder(folder, manifest, full=True)
    assert len(hashed) >= 1


def test_truncated_file_fails_on_its_size_without_hashing(folder, hashed):
    manifest = Manifest.read(folder)
    verify_folder(folder, manifest)
    path = folder / "vae_decoder/model.onnx"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    hashed.clear()
    with pytest.raises(ModelError, match=rf"vae_decoder/model.onnx: {size // 2} bytes, .*had {size}") as error:
        verify_folder(folder, manifest)
    assert manifest.files["vae_decoder/model.onnx"][:12] in str(error.value)
    assert hashed == []

    default_cache_files(folder)[0].unlink()  # no cache: found by hashing
    with pytest.raises(ModelError, match="vae_decoder/model.onnx: sha256"):
        verify_folder(folder, manifest)


def test_missing_file_is_named_before_anything_is_hashed(folder, hashed):
    manifest = Manifest.read(folder)
    (folder / "tokenizer/vocab.json").unlink()
    with pytest.raises(ModelError, match=r"tokenizer/vocab.json: listed in .*manifest.json but missing"):
        verify_folder(folder, manifest)
    assert hashed == []


def test_graphs_not_loaded_are_not_required(folder):
    manifest = Manifest.read(folder)
    (folder / "vae_encoder/model.onnx").unlink()  # text to image needs no encoder
    result = verify_folder(folder, manifest, components=TXT2IMG)
    assert "vae_encoder/model.onnx" not in result.checked and UNET in result.checked
    assert "tokenizer/vocab.json" in result.checked  # files outside the graph folders always count
    with pytest.raises(ModelError, match="vae_encoder/model.onnx: listed"):
        verify_folder(folder, manifest)


def test_read_only_folder_verifies_and_caches(folder, home, hashed):
    manifest = Manifest.read(folder)
    folder.chmod(0o555)
    try:
        first = verify_folder(folder, manifest)
        assert first.cache_file.is_relative_to(home / ".cache" / "sdonnx" / "verified")
        hashed.clear()
        assert verify_folder(folder, manifest).hashed == () and hashed == []
    finally:
        folder.chmod(0o755)


def test_unwritable_user_cache_still_verifies(folder, tmp_path, monkeypatch, hashed):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("")  # nothing can be created under it
    manifest = Manifest.read(folder)
    assert verify_folder(folder, manifest).cache_file is None
    with pytest.raises(ModelError):
        flip_byte(folder / UNET)
        verify_folder(folder, manifest)


def test_opting_out_or_no_manifest_checks_nothing(folder, hashed):
    manifest = Manifest.read(folder)
    flip_byte(folder / UNET)
    (folder / "tokenizer/vocab.json").unlink()
    result = verify_folder(folder, manifest, verify=False)
    assert result.skipped == "opted out" and result.checked == ()
    assert verify_folder(folder, None).skipped == "no manifest"  # optimum exports record no hashes
    assert hashed == [] and not default_cache_files(folder)[0].exists()
    with pytest.raises(ModelError, match="tokenizer/vocab.json: listed"):  # the same folder, verified
        verify_folder(folder, manifest)


def test_model_hash_without_verification_comes_from_the_files_on_disk(folder, hashed):
    manifest = Manifest.read(folder)
    lines = sorted(f"{path} {digest}" for path, digest in manifest.files.items() if path.startswith("unet/"))
    recorded = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]

    def model(verify: bool) -> ModelFolder:
        return ModelFolder(root=folder, manifest=manifest, sessions={}, derived=False, options=options(verify))

    assert model_hash(model(True)) == recorded and hashed == []  # verified at load: the manifest's hashes
    assert model_hash(model(False)) == recorded  # unchanged files: the same Model hash
    assert sorted(hashed) == sorted((folder / p).as_posix() for p in manifest.files if p.startswith("unet/"))

    hashed.clear()
    model_hash(model(False))
    assert hashed == []  # per image: the verify cache, no re-hashing

    flip_byte(folder / UNET)
    changed = model_hash(model(False))
    assert changed != recorded and hashed == [(folder / UNET).as_posix()]
    assert file_digests(folder, [UNET])[UNET] == sha256(folder / UNET)
