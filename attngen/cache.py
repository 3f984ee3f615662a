"""A content-addressed byte store on disk and in memory: `fetch(name, key, build)` returns the bytes stored under
`key`, building and publishing them on a miss. It knows nothing of what the bytes are (nvrtc.py encodes and
decodes compiled kernels), the way Triton's runtime cache stores opaque files by key.

Disk entries carry a header (magic, format, their full key, a short note, payload length, sha256 of the payload),
are published atomically (temp file, fsync, rename) under a per-key file lock so racing processes build once, and
a corrupt entry is deleted and rebuilt. A read-only directory is still read (a prewarmed cache in a container image
or on a shared file system); what is built then stays in memory. No usable directory means memory only."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attngen._resources import cache_dir
from attngen.errors import CacheWarning

FORMAT = 2  # bump when the entry layout below changes
MAGIC = b"ATTNGEN\x00"
# Entry = header (magic, format, key as 32 raw bytes, note length, payload length, sha256 of payload), then the
# note (utf-8, what made the entry, for `attngen cache list`), then the payload.
_HEADER = struct.Struct("<8sI32sIQ32s")
_ENTRY_NAME = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{20})\.bin")

# The one piece of mutable module state: key -> bytes for everything fetched in this process.
_memory: dict[str, bytes] = {}


@dataclass(frozen=True)
class CacheEntry:
    """One entry on disk, as `attngen cache list` shows it."""

    path: Path
    name: str
    note: str
    size: int
    mtime: float


class _Corrupt(Exception):
    pass


def fetch(name: str, key: str, build: Callable[[], bytes], note: str = "") -> bytes:
    """The bytes stored under `key` (64 hex digits): from memory, else from disk, else `build()`, published to disk
    when the directory is writable. `name` (letters, digits, `_.-`) prefixes the file name; `note` is kept beside
    the bytes to say what made them."""
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"cache keys are 64 lowercase hex digits, got {key!r}")
    data = _memory.get(key)
    if data is not None:
        return data
    directory = cache_dir()
    if directory is None:
        data = build()
    else:
        path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:20]}.bin"
        data = _read(path, key, repair=False)
        if data is None:
            data = _build_locked(build, path, key, note) if writable(directory) else build()
    return _memory.setdefault(key, data)


@functools.cache
def writable(directory: Path) -> bool:
    """Whether entries can be published in `directory` (warns once when they cannot)."""
    try:
        # Really writing a file is the only test that holds for read-only mounts, ACLs and root alike.
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        warnings.warn(
            f"attngen kernel cache {directory} is not writable ({exc}); kernels found there are used, new ones are "
            "kept in memory only. Set ATTNGEN_CACHE_DIR to a writable directory to keep them across runs.",
            CacheWarning,
        )
        return False
    return True


def _build_locked(build: Callable[[], bytes], path: Path, key: str, note: str) -> bytes:
    from filelock import FileLock  # only a miss needs the lock, and importing filelock costs ~35 ms

    with FileLock(f"{path}.lock"):
        # Another process may have published while this one waited for the lock.
        data = _read(path, key, repair=True)
        if data is None:
            data = build()
            _publish(path, _encode(key, note, data))
    return data


def _read(path: Path, key: str, repair: bool) -> bytes | None:
    """The payload at `path`, or None if absent or corrupt; with `repair`, a corrupt entry is warned about and
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
        return _decode(data, key)[1]
    except _Corrupt as exc:
        if repair:
            warnings.warn(f"attngen cache entry {path} is corrupt ({exc}); deleting and rebuilding it", CacheWarning)
            path.unlink(missing_ok=True)
        return None


def _encode(key: str, note: str, payload: bytes) -> bytes:
    text = note.encode()
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, FORMAT, bytes.fromhex(key), len(text), len(payload), digest) + text + payload


def _decode(data: bytes, key: str | None) -> tuple[str, bytes]:
    """(note, payload) of an entry; `key` None skips the key check (listing)."""
    if len(data) < _HEADER.size:
        raise _Corrupt(f"{len(data)} bytes, shorter than the entry header")
    magic, version, raw_key, note_length, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _Corrupt("not an attngen cache entry")
    if version != FORMAT:
        raise _Corrupt(f"entry format {version}, this attngen writes {FORMAT}")
    if key is not None and raw_key != bytes.fromhex(key):
        raise _Corrupt("entry was written for another key")
    payload = data[_HEADER.size + note_length :]
    if len(payload) != length:
        raise _Corrupt(f"payload has {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise _Corrupt("checksum mismatch")
    note = data[_HEADER.size : _HEADER.size + note_length].decode(errors="replace")
    return note, payload


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
    """Every entry in the disk cache, sorted by file name; [] when the cache is memory only."""
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
            with path.open("rb") as file:
                head = file.read(_HEADER.size + 4096)
            note = _decode_note(head)
        except FileNotFoundError:  # removed by another process since the listing
            continue
        except OSError:
            note = "(unreadable)"
        entries.append(CacheEntry(path, match["name"], note, stat.st_size, stat.st_mtime))
    return entries


def _decode_note(head: bytes) -> str:
    if len(head) < _HEADER.size:
        return "(corrupt)"
    magic, version, _key, note_length, _length, _digest = _HEADER.unpack_from(head)
    if magic != MAGIC or version != FORMAT:
        return "(other format)"
    return head[_HEADER.size : _HEADER.size + note_length].decode(errors="replace")


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
