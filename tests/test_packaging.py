"""A wheel built from this tree and installed non-editable finds its templates and patterns inside the install,
not in the source checkout: proves the build maps templates/ and patterns/ into the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_SUFFIXES = (".j2", ".cu", ".cuh")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build a wheel from a copy of the tree and `pip install --target` it; returns the target directory."""
    work = tmp_path_factory.mktemp("wheel")
    # A copy keeps build/ and *.egg-info out of the checkout and lets concurrent runs build side by side.
    tree = work / "tree"
    tree.mkdir()
    for optional in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / optional).exists():
            shutil.copy(ROOT / optional, tree)
    for folder in ("attngen", "templates", "patterns"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = [
        sys.executable,
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "--outdir",
        str(work / "dist"),
        str(tree),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=120)
    (wheel,) = (work / "dist").glob("attngen-*.whl")
    target = work / "site"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    return target


def locate(target: Path, function: str) -> tuple[Path, Path]:
    """(module file, directory) that attngen._resources.<function>() reports in a fresh interpreter that can
    only see the install: cwd outside the checkout, the target first on the path."""
    script = f"import attngen._resources as r; print(r.__file__); print(r.{function}())"
    outside = target.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,  # a failure is asserted below, with the child's stderr
        cwd=outside,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    module, directory = result.stdout.strip().splitlines()[-2:]
    return Path(module), Path(directory)


@pytest.mark.slow
def test_installed_wheel_ships_templates(installed):
    module, templates = locate(installed, "templates_dir")
    assert module.is_relative_to(installed)
    assert templates == installed / "attngen" / "_templates"
    shipped = sorted(p.relative_to(templates) for p in templates.rglob("*") if p.suffix in TEMPLATE_SUFFIXES)
    source = ROOT / "templates"
    expected = sorted(p.relative_to(source) for p in source.rglob("*") if p.suffix in TEMPLATE_SUFFIXES)
    assert shipped and shipped == expected


@pytest.mark.slow
@pytest.mark.skipif(not any((ROOT / "patterns").glob("*.py")), reason="patterns/ holds no pattern file yet")
def test_installed_wheel_ships_patterns(installed):
    module, patterns = locate(installed, "patterns_dir")
    assert module.is_relative_to(installed)
    assert patterns == installed / "attngen" / "_patterns"
    assert sorted(p.name for p in patterns.glob("*.py")) == sorted(p.name for p in (ROOT / "patterns").glob("*.py"))
