"""What sdonnx writes never costs the user data: `sdonnx.files` and the commands that use it.

Export and quantize refuse an OUT that is, lies in or holds what they read, and --overwrite replaces
only a previous model folder; both are checked before anything loads (loading is patched to fail the
test), so those cases need no real export. Staging folders carry a marker, and the next staging
removes those of dead processes only. PNGs get the permissions and symlink behaviour of a plain
open(path, "wb").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdonnx import files
from sdonnx.cli import main
from sdonnx.errors import InputError
from sdonnx.export import ExportConfig, export_model
from sdonnx.files import STAGING_MARKER, check_destination, output_files, staged_folder

posix_only = pytest.mark.skipif(os.name != "posix", reason="pids, signals and modes as POSIX has them")


def _diffusers_folder(path: Path) -> Path:
    """What a user's diffusers source looks like on disk (its contents are never read here)."""
    (path / "unet").mkdir(parents=True)
    (path / "vae").mkdir()
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (path / "unet" / "config.json").write_text("{}")
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights" * 100)
    (path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae" * 100)
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch):
    """Loading SOURCE or reading MODEL fails the test: every refusal here must come before either."""
    import sdonnx.export.source
    import sdonnx.quantize.quantizer

    def fail(*args, **kwargs):
        pytest.fail("loaded before OUT was checked")

    monkeypatch.setattr(sdonnx.export.source, "load_source", fail)
    monkeypatch.setattr(sdonnx.quantize.quantizer, "_fp32_manifest", fail)


def _refused(call, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as e:
        call()
    assert e.value.field == "out", e.value
    return e.value


def _export(source: Path, out: Path, **kwargs) -> None:
    export_model(ExportConfig(str(source), out, quiet=True, **kwargs))


# --- export: OUT against SOURCE ---------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
def test_export_onto_its_source_is_refused(tmp_path, no_loading, overwrite):
    source = _diffusers_folder(tmp_path / "sd")
    before = _snapshot(source)
    error = _refused(lambda: _export(source, source, overwrite=overwrite), "it is SOURCE")
    assert error.received == str(source)
    assert _snapshot(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_cli_export_onto_its_source_with_overwrite_is_refused(tmp_path, no_loading, capsys):
    source = _diffusers_folder(tmp_path / "sd")
    before = _snapshot(source)
    assert main(["export", str(source), str(source), "--overwrite", "--quiet"]) == 2
    assert f"got {str(source)!r}, expected a folder that is not SOURCE" in capsys.readouterr().err
    assert _snapshot(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_export_into_its_source_is_refused(tmp_path, no_loading):
    source = _diffusers_folder(tmp_path / "sd")
    before = _snapshot(source)
    _refused(lambda: _export(source, source / "onnx"), "it is inside SOURCE")
    assert _snapshot(source) == before


def test_export_onto_a_folder_holding_its_source_is_refused(tmp_path, no_loading):
    source = _diffusers_folder(tmp_path / "models" / "sd")
    (tmp_path / "models" / "manifest.json").write_text("{}")  # even one that looks like an export
    before = _snapshot(tmp_path / "models")
    _refused(lambda: _export(source, tmp_path / "models", overwrite=True), "it holds SOURCE")
    assert _snapshot(tmp_path / "models") == before


@posix_only
def test_export_onto_a_symlink_to_its_source_is_refused(tmp_path, no_loading):
    source = _diffusers_folder(tmp_path / "sd")
    link = tmp_path / "sd-onnx"
    link.symlink_to(source, target_is_directory=True)
    before = _snapshot(source)
    _refused(lambda: _export(source, link, overwrite=True), "it is SOURCE")
    assert _snapshot(source) == before and link.is_symlink()
    _refused(lambda: _export(link, source, overwrite=True), "it is SOURCE")  # and the other way round
    assert _snapshot(source) == before


def test_single_file_source_counts_its_folder_only_around_out(tmp_path, no_loading):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    checkpoint = folder / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    (folder / "manifest.json").write_text("{}")
    _refused(lambda: _export(checkpoint, folder, overwrite=True), "it holds SOURCE")
    _refused(lambda: _export(checkpoint, tmp_path, overwrite=True), "it holds SOURCE")
    _refused(lambda: _export(checkpoint, checkpoint, overwrite=True), "it is SOURCE")
    assert checkpoint.read_bytes() == b"weights"
    # Beside the checkpoint, in its folder, is where such an export usually goes.
    assert check_destination(folder / "model-onnx", sources={"SOURCE": checkpoint}, overwrite=False)


def test_export_into_its_config_folder_is_refused(tmp_path, no_loading):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    config = _diffusers_folder(tmp_path / "config")
    _refused(lambda: _export(checkpoint, config / "onnx", config=config), "it is inside CONFIG")


def test_hub_id_source_has_no_local_path_to_guard(tmp_path):
    out = tmp_path / "out"
    assert check_destination(out, sources={"SOURCE": "org/model"}, overwrite=False) == out


# --- export: what --overwrite may replace -----------------------------------------------------------


def test_overwrite_refuses_an_arbitrary_folder_and_says_what_is_there(tmp_path, no_loading):
    source = _diffusers_folder(tmp_path / "sd")
    out = tmp_path / "documents"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "photos" / "cat.jpg").write_bytes(b"jpeg")
    before = _snapshot(out)
    error = _refused(lambda: _export(source, out, overwrite=True), "neither")
    assert "2 entries: notes.txt, photos/" in str(error)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["documents", "sd"]


def test_overwrite_refuses_a_diffusers_folder(tmp_path, no_loading):
    """model_index.json alone is a PyTorch source, not an ONNX export."""
    source = _diffusers_folder(tmp_path / "sd")
    other = _diffusers_folder(tmp_path / "other-sd")
    before = _snapshot(other)
    _refused(lambda: _export(source, other, overwrite=True), "neither")
    assert _snapshot(other) == before


def test_overwrite_accepts_sdonnx_and_optimum_exports(tmp_path):
    sdonnx_export, optimum_export, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sdonnx_export.mkdir()
    (sdonnx_export / "manifest.json").write_text("{}")
    (optimum_export / "unet").mkdir(parents=True)
    (optimum_export / "model_index.json").write_text("{}")
    (optimum_export / "unet" / "model.onnx").write_bytes(b"onnx")
    empty.mkdir()
    for out in (sdonnx_export, optimum_export):
        assert check_destination(out, overwrite=True) == out
        with pytest.raises(InputError, match="--overwrite"):
            check_destination(out, overwrite=False)
    assert check_destination(empty, overwrite=False) == empty


@posix_only
def test_overwrite_replaces_a_previous_export_and_cleans_stale_staging(tiny_sources, tiny_exports, tmp_path):
    """The one real export here: onto a copy of an earlier export, beside a kill -9's leftovers."""
    from sdonnx.runtime.manifest import Manifest

    out = tmp_path / "out"
    shutil.copytree(tiny_exports["sd1"], out)
    (out / "stale.txt").write_text("from the earlier export")
    dead = _stale(tmp_path, "out", "0badc0de", "partial", pid=_dead_pid())
    unmarked = _stale(tmp_path, "out", "12345678", "partial", pid=None)
    _export(tiny_sources["sd1"], out, overwrite=True)
    Manifest.read(out).verify_files(out)
    assert not (out / "stale.txt").exists() and not (out / STAGING_MARKER).exists()
    assert not dead.exists() and unmarked.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", unmarked.name])


# --- quantize: OUT against MODEL --------------------------------------------------------------------


def _model_folder(path: Path) -> Path:
    """Looks like an export to the destination check (it is never read: no_loading)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    (path / "unet").mkdir()
    (path / "unet" / "model.onnx").write_bytes(b"onnx")
    return path


def test_quantize_onto_its_model_is_refused(tmp_path, no_loading, capsys):
    from sdonnx.quantize import QuantizeConfig, quantize_model

    model = _model_folder(tmp_path / "fp32")
    before = _snapshot(model)
    for out, overwrite, match in [(model, True, "it is MODEL"), (model / "int8", False, "it is inside MODEL"),
                                  (tmp_path, True, "it holds MODEL")]:
        _refused(lambda: quantize_model(QuantizeConfig(model=str(model), out=out, overwrite=overwrite, quiet=True)),
                 match)
    assert main(["quantize", str(model), str(model), "--overwrite", "--quiet"]) == 2
    assert f"got {str(model)!r}, expected a folder that is not MODEL" in capsys.readouterr().err
    assert _snapshot(model) == before and sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]


def test_quantize_overwrite_refuses_an_arbitrary_folder(tmp_path, no_loading):
    from sdonnx.quantize import QuantizeConfig, quantize_model

    model = _model_folder(tmp_path / "fp32")
    out = tmp_path / "documents"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    _refused(lambda: quantize_model(QuantizeConfig(model=str(model), out=out, overwrite=True, quiet=True)),
             "notes.txt")
    assert _snapshot(out) == {"notes.txt": b"my notes"}


# --- stale staging folders --------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale(parent: Path, name: str, hex8: str, role: str, *, pid: int | None, host: str | None = None) -> Path:
    folder = parent / f".{name}.{hex8}.{role}"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.onnx").write_bytes(b"half an export")
    if pid is not None:
        record = {"pid": pid, "host": host or socket.gethostname()}
        (folder / STAGING_MARKER).write_text(json.dumps(record))
    return folder


@posix_only
def test_staging_removes_only_marked_folders_of_dead_processes(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "out"
    removed = [_stale(tmp_path, "out", "deadbeef", "partial", pid=dead),
               _stale(tmp_path, "out", "0ddba11a", "old", pid=dead)]
    kept = [
        _stale(tmp_path, "out", "12345678", "partial", pid=None),  # no marker: not provably ours
        _stale(tmp_path, "out", "abcdef01", "partial", pid=os.getpid()),  # its owner is alive
        _stale(tmp_path, "out", "abcdef02", "partial", pid=dead, host="another-host"),  # cannot be told
        _stale(tmp_path, "out.v2", "deadbeef", "partial", pid=dead),  # another OUT's
        _stale(tmp_path, "other", "deadbeef", "partial", pid=dead),
    ]
    with staged_folder(out, overwrite=False) as stage:
        assert files.staging_owner(stage) == (os.getpid(), socket.gethostname())
        (stage / "model_index.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]  # the marker stays behind
    assert not any(p.exists() for p in removed)
    assert all((p / "unet" / "model.onnx").is_file() for p in kept)


@posix_only
def test_a_killed_staging_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom sdonnx.files import staged_folder\n"
        "with staged_folder(Path(sys.argv[1]), overwrite=False) as stage:\n"
        "    (stage / 'unet').mkdir()\n    print(stage, flush=True)\n    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(child.stdout.readline().strip())
        assert left.is_dir() and files.staging_owner(left)[0] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert left.is_dir()  # nothing ran on the way out
    with staged_folder(out, overwrite=False) as stage:
        (stage / "manifest.json").write_text("{}")
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_previous_out_is_marked_only_once_replaced(tmp_path, monkeypatch):
    """Interrupted while deleting the replaced OUT, `.OUT.*.old` is garbage the next staging may clean."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    seen = {}
    real_remove = files._remove_tree

    def remove(folder):
        if folder.name.endswith(".old"):
            seen["marked"] = files.staging_owner(folder)
            seen["out"] = sorted(p.name for p in out.iterdir())
        real_remove(folder)

    monkeypatch.setattr(files, "_remove_tree", remove)
    with staged_folder(out, overwrite=True) as stage:
        (stage / "new.json").write_text("{}")
    assert seen == {"marked": (os.getpid(), socket.gethostname()), "out": ["new.json"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_previous_out_back_unmarked(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # OUT is aside as .out.<hex>.old; the staging folder was about to take its place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), staged_folder(out, overwrite=True) as stage:
        (stage / "new.json").write_text("{}")
    monkeypatch.undo()
    assert calls[0] == "out" and calls[1].endswith(".partial")
    assert _snapshot(out) == {"manifest.json": b"{}"}  # no marker came back with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- output images ----------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    try:
        yield os.umask
    finally:
        os.umask(saved)


def _write_png(path: Path, color: str = "red") -> None:
    from sdonnx.runtime.metadata import write_png

    write_png(Image.new("RGB", (8, 8), color), path, "a cube\nSteps: 1, Sampler: Euler, Seed: 1")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
def test_new_png_honours_the_umask(tmp_path, umask):
    for mask, expected in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]:
        umask(mask)
        path = tmp_path / f"image-{mask:03o}.png"
        _write_png(path)
        assert _mode(path) == expected, (oct(mask), oct(_mode(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-002.png", "image-022.png", "image-077.png"]


@posix_only
def test_replaced_png_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "image.png"
    for mode in (0o644, 0o640):
        path.write_bytes(b"old")
        path.chmod(mode)
        _write_png(path)
        assert _mode(path) == mode and Image.open(path).size == (8, 8)


@posix_only
def test_png_through_a_symlink_writes_its_target(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "gallery" / "real.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    _write_png(link, "blue")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _mode(target) == 0o640
    with Image.open(target) as image:
        assert image.getpixel((0, 0)) == (0, 0, 255) and "parameters" in image.text
    dangling = tmp_path / "next.png"
    dangling.symlink_to(tmp_path / "gallery" / "next-real.png")
    _write_png(dangling)
    assert dangling.is_symlink() and _mode(tmp_path / "gallery" / "next-real.png") == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["next-real.png", "real.png"]


def test_a_folder_at_the_output_path_is_refused_before_any_work(tmp_path, capsys):
    nowhere = tmp_path / "no-such-model"  # loading it would fail with a different error
    (tmp_path / "x.png").mkdir()
    assert main(["generate", "a cat", "-m", str(nowhere), "-o", str(tmp_path / "x.png"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"got {str(tmp_path / 'x.png')!r}, expected a file path (a folder is there)" in err, err
    assert "no-such-model" not in err, err
    (tmp_path / "y-2.png").mkdir()
    assert main(["generate", "a cat", "-m", str(nowhere), "--batch", "2", "-o", str(tmp_path / "y.png"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "y-2.png" in err and "no-such-model" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y-2.png"]


def test_output_paths_checks_every_file_and_reports_an_empty_path_as_given(tmp_path):
    from sdonnx.runtime.cli import output_paths

    with pytest.raises(InputError) as e:
        output_paths("", 1)
    assert (e.value.field, e.value.received, e.value.expected) == ("output", "", "a path ending in .png")
    if os.name == "posix":
        (tmp_path / "folder").mkdir()
        (tmp_path / "to-folder.png").symlink_to(tmp_path / "folder")
        with pytest.raises(InputError, match="folder") as e:
            output_paths(tmp_path / "to-folder.png", 1)
        assert e.value.field == "output"
    assert output_files(tmp_path / "a.png", 2) == [tmp_path / "a-1.png", tmp_path / "a-2.png"]
