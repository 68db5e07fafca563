"""Integrity: the files of a model folder must be the ones its manifest.json recorded.

`sdonnx export` (and `sdonnx quantize`) record the sha256 of every file of the folder in the
manifest's `files`. `verify_folder` checks them at load, so a changed or corrupt graph is an error
that names the file instead of running silently under the original "Model hash".

Hashing reads every byte (an SD 1.5 fp32 folder is 5 GB; about a second per GB), so it runs once
per file version: each digest is cached with the file's (size, mtime_ns, inode), and a later load
whose stat matches reuses it, leaving one stat per file. A file whose stat differs is hashed again.
The manifest records no sizes, so the stat-only check is against the last verified version: a file
whose size differs from the version that matched the manifest fails at once, without hashing.
An edit that keeps size, inode and mtime (mtime set back by hand) is not seen; `full=True`
ignores the cache and hashes everything. A digest is not cached while the file's mtime is under
`RACY_S` old (an edit within the same timestamp tick would keep the stat), nor if the file changed
while it was read.

The cache is a small JSON file, `.sdonnx-verified.json` beside manifest.json when the folder is
writable, else `$XDG_CACHE_HOME/sdonnx/verified/<hash of the folder's path>.json` (~/.cache by
default); both are read, written atomically, and only when an entry changed. Deleting either only
costs one re-hash. Folders without manifest.json (optimum exports) record no hashes: nothing to
verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from sdonnx.errors import ModelError
from sdonnx.runtime.manifest import MANIFEST_NAME, Manifest

CACHE_NAME = ".sdonnx-verified.json"
CACHE_VERSION = 1
CHUNK = 1 << 20  # 1 MiB reads: graphs are GBs
RACY_S = 2.0  # a digest is cached only once the file's mtime is this old
OPT_OUT = "to load it anyway, turn verification off: --no-verify (RuntimeOptions(verify_integrity=False))"
_KEY = ("size", "mtime_ns", "inode")


@dataclass(frozen=True)
class Verification:
    """What `verify_folder` did.

    checked: the manifest's files compared with their recorded sha256 (all matched).
    hashed: those read in full this time; the others matched the cache by stat alone.
    cache_file: where digests are cached (None when nowhere is writable, or nothing was checked).
    skipped: why nothing was checked ("opted out", "no manifest", "no files recorded"), else None.
    """

    root: Path
    checked: tuple[str, ...] = ()
    hashed: tuple[str, ...] = ()
    cache_file: Path | None = None
    skipped: str | None = None


def verify_folder(
    root: Path,
    manifest: Manifest | None,
    *,
    verify: bool = True,
    full: bool = False,
    components: Iterable[str] | None = None,
    cache: Path | None = None,
) -> Verification:
    """Check that every file `manifest` lists exists under `root` with its recorded sha256.

    verify: False skips everything (RuntimeOptions.verify_integrity); manifest None (a folder
    without manifest.json) has nothing to check. components: the graphs being loaded; the files in
    the folders of the manifest's other graphs are not checked (a text-to-image load needs no
    vae_encoder/), None checks all. full: hash every file, ignoring (and refreshing) the cache.
    cache: the cache file to use; None for the default (see the module docstring).

    Every file is stat'ed before any is hashed, so a missing file or a size that differs from the
    verified version fails at once. ModelError names the file, the expected and found sha256 (first
    12 hex digits) and how to opt out.
    """
    root = Path(root)
    if not verify:
        return Verification(root, skipped="opted out")
    if manifest is None:
        return Verification(root, skipped="no manifest")
    files = _selected(manifest, components)
    if not files:
        return Verification(root, skipped="no files recorded")
    store = _Cache(root, cache)
    stats = {rel: _stat(root, rel) for rel in files}  # missing files fail before any hashing
    pending = []
    for rel, expected in files.items():
        entry, st = store.entries.get(rel), stats[rel]
        if full or entry is None:
            pending.append(rel)
        elif _matches(entry, st):
            if entry["sha256"] != expected:
                store.save()
                raise _mismatch(root, rel, expected, entry["sha256"])
        elif entry["sha256"] == expected and entry["size"] != st.st_size:
            raise ModelError(
                f"{root / rel}: {st.st_size} bytes, but the version whose sha256 matched the manifest's "
                f"{expected[:12]} had {entry['size']} (truncated or replaced; not hashed); {OPT_OUT}"
            )
        else:
            pending.append(rel)
    for rel in pending:
        found = store.hash(rel)
        if found != files[rel]:
            store.save()
            raise _mismatch(root, rel, files[rel], found)
    cache_file = store.save()
    return Verification(root, checked=tuple(files), hashed=tuple(pending), cache_file=cache_file)


def file_digests(root: Path, paths: Iterable[str], *, cache: Path | None = None) -> dict[str, str]:
    """{path: sha256} of the files at `paths` (relative to `root`) as they are on disk now.

    Through the same cache as `verify_folder`: a file whose stat matches its cached entry is not
    read again, so calling this once per image costs one stat per file after the first call.
    """
    root = Path(root)
    store = _Cache(root, cache)
    digests = {}
    for rel in paths:
        st, entry = _stat(root, rel), store.entries.get(rel)
        digests[rel] = entry["sha256"] if entry is not None and _matches(entry, st) else store.hash(rel)
    store.save()
    return digests


def hash_file(path: Path) -> str:
    """The sha256 of the file at `path`, read in CHUNK-sized blocks into one reused buffer."""
    h = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def default_cache_files(root: Path) -> tuple[Path, ...]:
    """Where `root`'s digests are cached: under the user's cache folder, never in the model folder
    (it may be read-only, shared, or inside site-packages for the embedded model)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return (base / "sdonnx" / "verified" / f"{name}.json",)


def _selected(manifest: Manifest, components: Iterable[str] | None) -> dict[str, str]:
    """The manifest's files, less those in the folders of graphs that are not being loaded."""
    files = dict(manifest.files)
    if components is None:
        return files
    wanted = set(components)
    dirs = {c: PurePosixPath(spec.path).parent for c, spec in manifest.graphs.items()}
    loaded = {d for c, d in dirs.items() if c in wanted}
    unloaded = {d for c, d in dirs.items() if c not in wanted} - loaded - {PurePosixPath(".")}
    return {rel: digest for rel, digest in files.items() if PurePosixPath(rel).parent not in unloaded}


def _stat(root: Path, rel: str) -> os.stat_result:
    path = root / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"{path}: listed in {root / MANIFEST_NAME} but missing; {OPT_OUT}") from None
    except OSError as e:
        raise ModelError(f"{path}: listed in {root / MANIFEST_NAME} but unreadable: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{path}: listed in {root / MANIFEST_NAME} as a file, but it is not a regular file")
    return st


def _key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _matches(entry: Mapping[str, Any], st: os.stat_result) -> bool:
    return all(entry.get(k) == v for k, v in _key(st).items())


def _mismatch(root: Path, rel: str, expected: str, found: str) -> ModelError:
    return ModelError(
        f"{root / rel}: sha256 {found[:12]} differs from the {expected[:12]} that {MANIFEST_NAME} records "
        f"(the file changed or is corrupt; restore or re-export it); {OPT_OUT}"
    )


class _Cache:
    """The cached digests of one folder's files: {relative path: {size, mtime_ns, inode, sha256}}."""

    def __init__(self, root: Path, path: Path | None):
        self.root = root
        self.files = (Path(path),) if path is not None else default_cache_files(root)
        self.entries: dict[str, dict[str, Any]] = {}
        for file in reversed(self.files):  # the first file's entries win
            self.entries |= _read_entries(file)
        self.changed = False

    def hash(self, rel: str) -> str:
        """Hash one file and cache its digest, unless it changed while read or is too fresh to trust."""
        path = self.root / rel
        started = time.time_ns()
        before = _stat(self.root, rel)
        try:
            digest = hash_file(path)
        except OSError as e:
            raise ModelError(f"{path}: unreadable: {e}") from None
        after = _stat(self.root, rel)
        if _key(before) == _key(after) and after.st_mtime_ns < started - RACY_S * 1e9:
            self.entries[rel] = {**_key(after), "sha256": digest}
            self.changed = True
        elif self.entries.pop(rel, None) is not None:
            self.changed = True
        return digest

    def save(self) -> Path | None:
        """Write the entries (only if one changed) to the first cache file that can be written."""
        if not self.changed:
            return next((f for f in self.files if f.is_file()), None)
        data = {"version": CACHE_VERSION, "root": str(self.root.resolve()), "files": self.entries}
        for file in self.files:
            try:
                _write_atomic(file, json.dumps(data, indent=1, sort_keys=True) + "\n")
            except OSError:
                continue
            self.changed = False
            return file
        return None


def _read_entries(file: Path) -> dict[str, dict[str, Any]]:
    """A cache file's valid entries; {} when it is absent, unreadable or of another version."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    ok = {}
    for rel, entry in data["files"].items():
        if (
            isinstance(entry, dict)
            and all(isinstance(entry.get(k), int) for k in _KEY)
            and isinstance(entry.get("sha256"), str)
        ):
            ok[rel] = entry
    return ok


def _write_atomic(file: Path, text: str) -> None:
    """Write `text` to `file` through a temporary file and a rename, so readers never see half."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{file.name}-", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, file)
    except BaseException:
        os.unlink(temp)
        raise
