"""Locate the data directories: CUDA templates, the pattern catalogue and the kernel cache.

An installed wheel carries them inside the package as attngen/_templates and attngen/_patterns (the build maps
the top-level folders there); a source checkout or editable install reads the top-level folders directly."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

from attngen.errors import AttngenError, CacheWarning

# Wheels install unzipped, so the package's own files are plain paths that Jinja's loader can read.
_PACKAGE = Path(__file__).resolve().parent


def templates_dir() -> Path:
    """Directory holding the Jinja CUDA templates (*.j2, *.cu, *.cuh)."""
    return _data_dir("_templates", "templates")


def patterns_dir() -> Path:
    """Directory holding the catalogue of named patterns (one *.py file each)."""
    return _data_dir("_patterns", "patterns")


def _data_dir(installed: str, checkout: str) -> Path:
    for candidate in (_PACKAGE / installed, _PACKAGE.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise AttngenError(
        f"attngen data folder not found: neither {_PACKAGE / installed} (installed wheel) nor "
        f"{_PACKAGE.parent / checkout} (source checkout) exists; reinstall attngen"
    )


def cache_dir() -> Path | None:
    """$ATTNGEN_CACHE_DIR or the user cache dir, created if missing; None (after one warning) when it neither
    exists nor can be created. A directory that exists but cannot be written is still returned: it is read."""
    return _existing_dir(os.environ.get("ATTNGEN_CACHE_DIR") or _user_cache_dir())


def _user_cache_dir() -> str:
    import platformdirs  # imported on first use: it is only needed to find the default directory

    return platformdirs.user_cache_dir("attngen")


@functools.cache
def _existing_dir(path: str) -> Path | None:
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not directory.is_dir():
            warnings.warn(
                f"attngen kernel cache {directory} cannot be created ({exc}); compiled kernels are kept in memory "
                "only. Set ATTNGEN_CACHE_DIR to a writable directory to keep them across runs.",
                CacheWarning,
            )
            return None
    return directory
