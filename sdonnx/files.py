"""Atomic folders and files: staged folders that appear whole or not at all, output files written by rename.

Shared plumbing below export/, quantize/, models/ and runtime/; standard library only, so the lean
runtime imports it without any extra.

Folders. `staged_folder(OUT)` builds a model folder in a hidden sibling `.OUT.<hex>.partial` and renames
it into place when complete (same filesystem, so the rename is atomic); an existing OUT is moved aside
to `.OUT.<hex>.old` first and deleted once replaced. Every such folder carries a marker file,
`.sdonnx-staging` (JSON: the pid and host name of the process that made it), from its creation until
it is published (the marker never reaches OUT) or, for `.old`, from the moment it is garbage. A
`kill -9` can still leave one behind, so staging for OUT first removes sibling `.OUT.<hex>.partial`
and `.OUT.<hex>.old` folders whose marker names this host and a pid that is no longer alive. A folder
without the marker, or whose owner is alive or on another host, is never touched.

Destinations. `check_destination(OUT, sources=...)` is what export and quantize call before loading
anything: OUT may not be a source, lie inside one or hold one (symlinks resolved), and `--overwrite`
replaces only a previous model folder (`model_folder_kind`), never an arbitrary non-empty folder.

Files. `output_files` checks output paths before any work; `replace_file` writes a file through a
temporary sibling and a rename, with the permissions a plain `open(path, "wb")` would give: 0666 less
the umask for a new file, the existing file's mode for a replaced one, and a symlink at the path is
written through to its target (as `cp` and PIL's `Image.save` do), not replaced by a file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

from sdonnx.errors import InputError

STAGING_MARKER = ".sdonnx-staging"
_ROLES = ("partial", "old")


# --- staged folders ---------------------------------------------------------------------------------


@contextmanager
def staged_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside `out` (holding only the marker); it becomes `out` only if the block completes.

    Checks `out` first (so that a bad destination fails before any heavy work): an existing file or
    a non-empty folder without overwrite, or a parent that is missing or not writable, is an InputError.
    Stale staging folders of dead processes beside `out` are removed (module docstring). Which folders
    overwrite may replace is `check_destination`'s concern; this only builds and publishes.
    """
    out = Path(out)
    if out.is_file():
        raise InputError("out", str(out), "a folder path (a file is there)")
    if out.is_dir() and _contents(out) and not overwrite:
        raise InputError("out", str(out), "a new or empty folder (pass --overwrite to replace it)")
    remove_stale_staging(out)
    staging = _sibling(out, "partial")
    try:
        staging.mkdir()
        _mark(staging)
    except OSError as e:
        _remove_tree(staging)
        raise InputError("out", str(out), f"a path in an existing, writable folder ({e.strerror})") from None
    try:
        yield staging
        # The block may have replaced `staging` with a folder of its own (export --dtype quantizes into it).
        (staging / STAGING_MARKER).unlink(missing_ok=True)
        _publish(staging, out)
    finally:
        _remove_tree(staging)


@contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """A marked hidden folder beside `beside` for intermediate results, removed on exit.

    Named like a staging folder, so a `kill -9` leaves nothing that the next staging does not clean.
    """
    beside = Path(beside)
    folder = _sibling(beside, "partial")
    folder.mkdir()
    try:
        _mark(folder)
        yield folder
    finally:
        _remove_tree(folder)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove `.OUT.<hex>.partial` / `.OUT.<hex>.old` siblings of `out` left by dead sdonnx processes.

    Only folders carrying the marker, naming this host and a pid that is not alive, are removed;
    returns the folders removed. Never raises: a folder that cannot be read or removed stays.
    """
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{8}}\.(?:{'|'.join(_ROLES)})")
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    removed = []
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = staging_owner(folder)
        if owner is None or owner[1] != socket.gethostname() or _pid_alive(owner[0]):
            continue
        _remove_tree(folder)
        removed.append(folder)
    return removed


def staged_files(folder: Path) -> list[Path]:
    """The files under a staging folder, sorted, less its marker: what the published folder will hold."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != STAGING_MARKER)


def staging_owner(folder: Path) -> tuple[int, str] | None:
    """(pid, host) from the folder's marker; None when it has none or it cannot be read."""
    try:
        record = json.loads((Path(folder) / STAGING_MARKER).read_text(encoding="utf-8"))
        pid, host = record["pid"], record["host"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or not isinstance(host, str):
        return None
    return pid, host


def _mark(folder: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname()}
    (folder / STAGING_MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here; True when that cannot be told (keep the folder)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _sibling(out: Path, role: str) -> Path:
    return out.parent / f".{out.name}.{secrets.token_hex(4)}.{role}"


def _publish(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out is moved aside first and deleted only once replaced."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    # Marked only now that it is garbage: interrupted before this, the previous OUT is kept whole.
    with suppress(OSError):
        _mark(old)
    _remove_tree(old)


def _remove_tree(folder: Path) -> None:
    """rmtree, the marker last, so that a folder interrupted mid-removal is still recognisably ours."""
    try:
        children = list(folder.iterdir())
    except FileNotFoundError:
        return
    except OSError:
        children = []
    for child in children:
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with suppress(OSError):
                child.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _contents(folder: Path) -> list[Path]:
    """The folder's entries, less a staging marker (a folder holding only that counts as empty)."""
    return sorted(p for p in folder.iterdir() if p.name != STAGING_MARKER)


# --- destinations -----------------------------------------------------------------------------------


def model_folder_kind(folder: Path) -> str | None:
    """What `--overwrite` may replace: "an sdonnx export", "an ONNX export" (optimum, diffusers) or None."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return "an sdonnx export"
    if (folder / "model_index.json").is_file() and (folder / "unet" / "model.onnx").is_file():
        return "an ONNX export"
    return None


def check_destination(
    out: str | os.PathLike,
    *,
    sources: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite: bool,
    field: str = "out",
) -> Path:
    """Refuse (InputError naming `field`) an OUT that writing a model folder there would make lose data.

    sources: {label: path} of what the command reads ("SOURCE", "MODEL"); None or a path that does not
    exist (a hub id) is skipped. OUT may not be a source, lie inside a source folder or hold a source
    (a single-file source's folder counts only when OUT would be it or hold it), symlinks resolved.
    An existing non-empty OUT needs overwrite, and overwrite replaces only `model_folder_kind` folders.
    OUT's parent must be an existing, writable folder. Reads no more than a few directory entries.
    """
    text = os.fspath(out)
    out = Path(text)
    real = Path(os.path.realpath(out))
    for label, source in (sources or {}).items():
        if source is None:
            continue
        path = Path(source).expanduser()
        if not os.path.lexists(path):
            continue
        source_real = Path(os.path.realpath(path))
        if real == source_real:
            relation = "it is"
        elif source_real.is_dir() and source_real in real.parents:
            relation = "it is inside"
        elif real in source_real.parents:
            relation = "it holds"
        else:
            continue
        raise InputError(
            field, text, f"a folder that is not {label}, not inside it and not holding it "
            f"({relation} {label} {source_real})"
        )
    if os.path.islink(out) and not out.exists():
        raise InputError(field, text, "a folder path (a broken symbolic link is there)")
    if out.exists() and not out.is_dir():
        raise InputError(field, text, "a folder path (a file is there)")
    if out.is_dir():
        contents = _contents(out)
        if contents and not overwrite:
            raise InputError(field, text, "a new or empty folder (pass --overwrite to replace it)")
        if contents and model_folder_kind(out) is None:
            raise InputError(
                field, text, "a model folder to replace: --overwrite replaces only a previous sdonnx export "
                "(manifest.json) or ONNX export (model_index.json and unet/model.onnx), and this folder "
                f"is neither; it holds {_describe(contents)}"
            )
    parent = out.parent
    if not parent.is_dir():
        why = "does not exist" if not parent.exists() else "is not a folder"
        raise InputError(field, text, f"a path in an existing folder ({parent} {why})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(field, text, f"a path in a writable folder ({parent} is not writable)")
    return out


def _describe(entries: list[Path], shown: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    listed = ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'}: {listed}"


# --- output files -----------------------------------------------------------------------------------


def output_files(output: str | os.PathLike, count: int = 1, *, suffix: str = ".png", field: str = "output") -> list[Path]:
    """The file path(s) to write: `output`, or NAME-1.png ... NAME-count.png; InputError now, before any work.

    Refused: a path not ending in `suffix` ('' is reported as ''), an existing folder or other non-file
    at a path, and a path (for a symlink, its target's) whose folder is missing or not writable.
    """
    text = os.fspath(output)
    path = Path(text)
    if not text or path.suffix.lower() != suffix:
        raise InputError(field, text, f"a path ending in {suffix}")
    if count == 1:
        paths = [path]
    else:
        paths = [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]
    for file in paths:
        if file.is_dir():
            raise InputError(field, str(file), "a file path (a folder is there)")
        if file.exists() and not file.is_file():
            raise InputError(field, str(file), "a regular file path (something other than a file is there)")
        parent = _target(file).parent
        if not parent.is_dir():
            raise InputError(field, str(file), f"a path in an existing directory ({parent} does not exist)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(field, str(file), f"a path in a writable directory ({parent} is not writable)")
    return paths


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: `write(f)` fills a temporary sibling, which is then renamed over the file.

    Permissions are those of a plain open(path, "wb"): a new file gets 0666 less the umask, a replaced
    file keeps its mode. A symlink at `path` is written through: its target is replaced and the link
    stays (as `cp` and PIL's save do). On any exception or Ctrl-C the temporary file is removed and the
    file is as it was. Returns the path written (the symlink's target for a symlink).
    """
    target = _target(Path(path))
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None
    fd, temp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    return target


def _target(path: Path) -> Path:
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new file beside target, created with mode 0666 so that the kernel applies the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")
