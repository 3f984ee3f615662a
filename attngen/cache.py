"""Content-addressed memory + disk cache of Binary: a hit returns the Binary without any NVRTC compile.

Key = sha256 of the source text, entries, options, arch, base NVRTC options, NVRTC and attngen versions. Disk
entries are checksummed, published atomically (temp file, fsync, rename) under a per-key file lock so racing
processes compile once; a corrupt entry is deleted and rebuilt. An unwritable directory means memory only."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import platformdirs

from attngen._version import __version__
from attngen.compile import BASE_OPTIONS, Binary, Resources, check_arch, nvrtc_version
from attngen.render import KernelSource

FORMAT = 1  # bump when the entry layout below changes
MAGIC = b"ATTNGEN\x00"
# Entry = header (magic, format, payload length, sha256 of payload) + payload.
# Payload = 4-byte length of a JSON header (key, arch, resources, log) + that JSON + the cubin.
_HEADER = struct.Struct("<8sIQ32s")
_JSON_LENGTH = struct.Struct("<I")
_ENTRY_NAME = re.compile(r"(?P<name>.+)_(?P<arch>sm_\d+a?)-(?P<key>[0-9a-f]{20})\.bin")

# The one piece of mutable module state: key -> Binary for everything fetched in this process.
_memory: dict[str, Binary] = {}


class CacheWarning(UserWarning):
    """The disk cache could not be used as intended (unwritable, corrupt entry); attngen carried on."""


@dataclass(frozen=True)
class CacheEntry:
    """One kernel on disk, as `attngen cache list` shows it."""

    path: Path
    name: str
    arch: str
    size: int
    mtime: float


class _Corrupt(Exception):
    pass


@functools.cache
def attngen_version() -> str:
    """Installed distribution version, or the source tree's when attngen runs uninstalled."""
    try:
        return importlib.metadata.version("attngen")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def cache_key(source: KernelSource) -> str:
    """Hex sha256 naming the Binary that `source` compiles to with this NVRTC and this attngen."""
    parts = [
        FORMAT,
        source.code,
        list(source.entries),
        list(source.options),
        source.arch,
        list(BASE_OPTIONS),
        list(nvrtc_version()),
        attngen_version(),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_dir() -> Path | None:
    """$ATTNGEN_CACHE_DIR or the user cache dir; None (after one warning) when it cannot be written."""
    return _usable_dir(os.environ.get("ATTNGEN_CACHE_DIR") or platformdirs.user_cache_dir("attngen"))


@functools.cache
def _usable_dir(path: str) -> Path | None:
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Really writing a file is the only test that holds for read-only mounts, ACLs and root alike.
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        warnings.warn(
            f"attngen kernel cache {directory} is not writable ({exc}); compiled kernels are kept in memory "
            "only. Set ATTNGEN_CACHE_DIR to a writable directory to keep them across runs.",
            CacheWarning,
        )
        return None
    return directory


def fetch(source: KernelSource, build: Callable[[KernelSource], Binary]) -> Binary:
    """The Binary of `source`: from memory, else from disk, else `build(source)` published to disk."""
    check_arch(source.arch)  # the arch becomes part of a file name
    key = cache_key(source)
    binary = _memory.get(key)
    if binary is not None:
        return binary
    directory = cache_dir()
    if directory is None:
        binary = build(source)
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", source.name)
        path = directory / f"{name}_{source.arch}-{key[:20]}.bin"
        binary = _read(path, key, repair=False)
        if binary is None:
            binary = _build_locked(source, build, path, key)
    return _memory.setdefault(key, binary)


def _build_locked(source: KernelSource, build: Callable[[KernelSource], Binary], path: Path, key: str) -> Binary:
    from filelock import FileLock  # only a miss needs the lock, and importing filelock costs ~35 ms

    with FileLock(f"{path}.lock"):
        # Another process may have published while this one waited for the lock.
        binary = _read(path, key, repair=True)
        if binary is None:
            binary = build(source)
            _publish(path, _encode(key, binary))
    return binary


def _read(path: Path, key: str, repair: bool) -> Binary | None:
    """The entry at `path`, or None if absent or corrupt; with `repair`, a corrupt entry is warned about and
    deleted (only done while holding the lock, so a concurrent publish cannot be deleted by mistake)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if repair:
            warnings.warn(f"attngen cache entry {path} is unreadable ({exc}); rebuilding it", CacheWarning)
        return None
    try:
        return _decode(data, key)
    except _Corrupt as exc:
        if repair:
            warnings.warn(f"attngen cache entry {path} is corrupt ({exc}); deleting and rebuilding it", CacheWarning)
            path.unlink(missing_ok=True)
        return None


def _encode(key: str, binary: Binary) -> bytes:
    header = {
        "key": key,
        "arch": binary.arch,
        "resources": [[entry, {f.name: getattr(r, f.name) for f in fields(r)}] for entry, r in binary.resources],
        "log": binary.log,
    }
    text = json.dumps(header).encode()
    payload = _JSON_LENGTH.pack(len(text)) + text + binary.cubin
    return _HEADER.pack(MAGIC, FORMAT, len(payload), hashlib.sha256(payload).digest()) + payload


def _decode(data: bytes, key: str) -> Binary:
    if len(data) < _HEADER.size:
        raise _Corrupt(f"{len(data)} bytes, shorter than the entry header")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _Corrupt("not an attngen cache entry")
    if version != FORMAT:
        raise _Corrupt(f"entry format {version}, this attngen writes {FORMAT}")
    payload = memoryview(data)[_HEADER.size :]
    if len(payload) != length:
        raise _Corrupt(f"payload has {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise _Corrupt("checksum mismatch")
    try:
        (text_length,) = _JSON_LENGTH.unpack_from(payload)
        end = _JSON_LENGTH.size + text_length
        header = json.loads(bytes(payload[_JSON_LENGTH.size : end]))
        if header["key"] != key:
            raise _Corrupt("entry was written for another key")
        resources = tuple((entry, Resources(**values)) for entry, values in header["resources"])
        return Binary(cubin=bytes(payload[end:]), arch=header["arch"], resources=resources, log=header["log"])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise _Corrupt(f"bad JSON header: {exc}") from None


def _publish(path: Path, data: bytes) -> None:
    """Make `data` appear at `path` all at once: readers see the old entry, no entry, or all of the new one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"could not write attngen cache entry {path} ({exc}); keeping it in memory only", CacheWarning)


def list_entries() -> list[CacheEntry]:
    """Every kernel in the disk cache, sorted by file name; [] when the cache is memory only."""
    directory = cache_dir()
    if directory is None:
        return []
    entries = []
    for path in sorted(directory.glob("*.bin")):
        match = _ENTRY_NAME.fullmatch(path.name)
        if match is None:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by another process since the listing
            continue
        entries.append(CacheEntry(path, match["name"], match["arch"], stat.st_size, stat.st_mtime))
    return entries


def clear() -> int:
    """Delete every disk entry (and leftover lock and temp files) and forget memory; returns entries removed."""
    _memory.clear()
    directory = cache_dir()
    if directory is None:
        return 0
    removed = 0
    for entry in list_entries():
        entry.path.unlink(missing_ok=True)
        removed += 1
    # A lock file is only a name to lock on and a temp file is a dead writer's leftover (a live writer whose
    # temp file vanishes just warns), so deleting them cannot corrupt an entry. Compiled templates (render.py) are
    # rebuilt from the templates on the next render.
    for leftover in [*directory.glob("*.bin.lock"), *directory.glob(".*.bin.*.tmp"), *directory.glob("jinja-*.cache")]:
        leftover.unlink(missing_ok=True)
    return removed
