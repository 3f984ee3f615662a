"""Locate the data directories: CUDA templates and the pattern catalogue.

An installed wheel carries them inside the package as attngen/_templates and attngen/_patterns (the build maps
the top-level folders there); a source checkout or editable install reads the top-level folders directly."""

from __future__ import annotations

from pathlib import Path

from attngen.errors import AttngenError

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
