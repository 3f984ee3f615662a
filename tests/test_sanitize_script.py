"""bench/sanitize.py without a GPU: its cases build, and its verdicts read compute-sanitizer's output as meant."""

import importlib.util
import sys
from pathlib import Path

import pytest

OK = "case {id} (what) on sm_90a: ok\n"
WRONG = "case {id} (what) on sm_90a: WRONG: output error 1.00e+00\n"


def _read(where: str) -> str:
    return (
        "========= Uninitialized __global__ memory read of size 4 bytes\n"
        f"=========     at {where}+0x2b0\n"
        "=========     by thread (0,0,0) in block (0,0,0)\n"
        "=========\n"
    )


TORCH_READ = _read("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, T2, T3)")
OUR_READ = _read("attngen_fwd")


@pytest.fixture(scope="module")
def sanitize():
    path = Path(__file__).resolve().parents[1] / "bench" / "sanitize.py"
    spec = importlib.util.spec_from_file_location("sanitize", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sanitize"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["sanitize"]


@pytest.mark.parametrize(
    ("rc", "log", "want"),
    [
        (0, OK + "========= ERROR SUMMARY: 0 errors\n", (True, "clean")),
        (
            99,
            "========= Invalid __global__ read of size 16 bytes\n========= ERROR SUMMARY: 3 errors\n",
            (False, "3 errors"),
        ),
        (3, WRONG + "========= ERROR SUMMARY: 0 errors\n", (False, "wrong")),
        (-11, "Segmentation fault\n", (False, "crash(-11)")),
        (124, "[timed out]\n", (False, "timeout")),
        (0, OK + "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n", (True, "clean +2w")),
        (99, "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n", (False, "1 errors")),
        # initcheck: reads by torch's kernels of what cuBLAS wrote are counted apart ...
        (99, OK + TORCH_READ * 2 + "========= ERROR SUMMARY: 2 errors\n", (True, "clean +2f")),
        # ... but never when one of attngen's kernels read uninitialised memory, or the child's checks failed
        (99, OK + TORCH_READ + OUR_READ + "========= ERROR SUMMARY: 2 errors\n", (False, "2 errors")),
        (99, WRONG + TORCH_READ + "========= ERROR SUMMARY: 1 error\n", (False, "1 errors")),
        # a report count past what was printed is not explained by the printed ones
        (99, OK + TORCH_READ + "========= ERROR SUMMARY: 5 errors\n", (False, "5 errors")),
    ],
)
def test_verdict(sanitize, rc, log, want):
    assert sanitize.verdict(rc, log.replace("{id}", "threshold")) == want


def test_initcheck_prints_every_report(sanitize):
    """The foreign-read rule needs every report in the log, not the sanitizer's first hundred."""
    cmd = sanitize.sanitizer_command("initcheck", "threshold", [])
    assert cmd[cmd.index("--print-limit") + 1] == "0"
    assert "--print-limit" not in sanitize.sanitizer_command("memcheck", "threshold", [])


def test_every_case_has_its_pattern_and_mods(sanitize):
    patterns = sanitize._patterns()
    for c in sanitize.CASES:
        assert c.pattern in patterns, c.id
        sanitize._mods(c)  # raises on an unknown key
