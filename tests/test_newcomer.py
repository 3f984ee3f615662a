"""What a newcomer meets first: ptxas notes that are not regressions (NVRTC 13.0 vs 13.5), a GPU older than
sm_80, a missing CuPy, out-of-range integers in patterns, bad mask sizes, and the licence metadata. CPU only."""

import builtins
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attngen as ag
from attngen.errors import AttngenError, InputError
from attngen.render import KernelSource

compile_module = importlib.import_module("attngen.nvrtc")
ROOT = Path(__file__).resolve().parents[1]
TOO_OLD = "attngen needs an NVIDIA GPU of compute capability sm_80 or newer (Ampere, Ada, Hopper, Blackwell)"

# ------------------------------------------------------------------------------- ptxas performance notes

ENTRY_LINES = """\
ptxas info    : Compiling entry function 'attngen_fwd' for 'sm_90a'
ptxas info    : Function properties for attngen_fwd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 664 bytes cmem[0]
"""
# Verbatim from NVRTC 13.0.88 compiling attngen's sm_90a forward and backward kernels (NVRTC 13.5 prints none).
INJECTED_ARRIVE = [
    "ptxas info    : (C7519) warpgroup.arrive is injected in around line 708 by compiler to allow use of registers "
    "in GMMA in function 'attngen_fwd'",
    "ptxas info    : (C7519) warpgroup.arrive is injected in around line 2051 by compiler to allow use of registers "
    "in GMMA in function 'attngen_bwd_dkdv'",
]
# Notes that do mean lost performance, as ptxas prints them (codes and wording from published build logs).
LOSSES = [
    "ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are serialized due to wgmma "
    "pipeline crossing function boundary at a function call in the function 'attngen_fwd'",
    "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
    "insufficient register resources for the wgmma pipeline in the function 'attngen_fwd'",
    "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
    "wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in "
    "the function 'attngen_bwd_dq'",
    "ptxas info    : (C7504) Potential Performance Loss: 'setmaxnreg' ignored to maintain compatibility across "
    "compilation units.",
    "ptxas info    : (C7507) Potential Performance Loss: 'setmaxnreg' ignored to maintain minimum register "
    "requirements.",
    "ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at "
    "entry.",
    # The benign wording under another code, and another note under the benign code: both still reported.
    "ptxas info    : (C7520) warpgroup.arrive is injected in around line 7 by compiler to allow use of registers "
    "in GMMA in function 'attngen_fwd'",
    "ptxas info    : (C7519) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the "
    "presence of Extern calls in the function 'attngen_fwd'",
]


def binary_with_log(log: str):
    resources = compile_module.Resources(registers=168, shared_bytes=0, stack_bytes=0, spill_stores=0, spill_loads=0)
    return compile_module.Binary(cubin=b"", arch="sm_90a", resources=(("attngen_fwd", resources),), log=log)


def test_injected_warpgroup_arrive_is_not_a_performance_note():
    log = ENTRY_LINES + "\n".join(INJECTED_ARRIVE) + "\n"
    assert binary_with_log(log).performance_notes == ()


@pytest.mark.parametrize("line", LOSSES, ids=lambda line: re.search(r"C75\d\d", line)[0])
def test_lost_performance_is_a_note(line):
    log = ENTRY_LINES + "\n".join([INJECTED_ARRIVE[0], line, INJECTED_ARRIVE[1]]) + "\n"
    assert binary_with_log(log).performance_notes == (line.split(":", 1)[1].strip(),)


def test_hopper_kernels_have_no_performance_notes_with_this_nvrtc():
    """Whatever NVRTC is installed (13.0 prints the injected-arrive note, 13.5 does not), the sm_90a kernels
    report no performance note, and every C75xx line in their logs is the benign one."""
    kern = ag.compile(ag.causal(), head_dim=64, dtype=torch.float16, arch="sm_90")
    for binary in (kern.forward_binary, kern.backward_binary):
        assert binary.arch == "sm_90a"
        assert binary.performance_notes == (), binary.log
        for line in binary.log.splitlines():
            if re.search(r"\(C75\d\d\)", line):
                assert "(C7519) warpgroup.arrive is injected" in line


# ------------------------------------------------------------------------------------- GPUs older than sm_80


@pytest.mark.parametrize("arch", ["sm_75", "sm_70", "sm_61", "sm_75a"])
def test_arch_older_than_sm80_is_refused(arch):
    with pytest.raises(InputError, match=re.escape(TOO_OLD)):
        compile_module.check_arch(arch)
    with pytest.raises(InputError, match=re.escape(TOO_OLD)):
        compile_module.nvrtc_compile(KernelSource(name="t", code="", entries=("t",), arch=arch))


def test_compile_for_sm75_is_refused_before_nvrtc(monkeypatch):
    from cupy.cuda import nvrtc

    def no_compile(*args):
        raise AssertionError("NVRTC must not compile for sm_75")

    monkeypatch.setattr(nvrtc, "compileProgram", no_compile)
    with pytest.raises(InputError, match=re.escape(TOO_OLD)):
        ag.compile(ag.sliding_window(33), head_dim=64, dtype=torch.float16, arch="sm_75")


@pytest.fixture
def turing(monkeypatch):
    """torch reports CUDA device 0 as a Tesla T4 (sm_75)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")


def test_device_older_than_sm80_is_refused(turing):
    with pytest.raises(InputError, match=re.escape(TOO_OLD) + r".*device 0 \(Tesla T4\) is sm_75"):
        compile_module.device_arch(0)


def test_loading_on_device_older_than_sm80_is_refused(turing):
    # _module is what load_function reaches; __wrapped__ skips its per-process cache.
    with pytest.raises(InputError, match=re.escape(TOO_OLD)):
        compile_module._module.__wrapped__(b"\x7fELF", "sm_80", 0)


@pytest.mark.parametrize(("capability", "arch"), [((8, 0), "sm_80"), ((8, 9), "sm_89"), ((12, 0), "sm_120")])
def test_device_sm80_and_newer_is_accepted(monkeypatch, capability, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert compile_module.device_arch(0) == arch


# ----------------------------------------------------------------------------------------------- no CuPy


@pytest.fixture
def without_cupy(monkeypatch):
    """CuPy as if not installed: every `import cupy...` raises ModuleNotFoundError."""
    for name in [name for name in sys.modules if name == "cupy" or name.startswith("cupy.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cupy", None)


EMPTY = KernelSource(name="t", code="", entries=("t",), arch="sm_80")
CUPY_CALLS = {
    "nvrtc_compile": lambda: compile_module.nvrtc_compile(EMPTY),
}


@pytest.mark.parametrize("call", list(CUPY_CALLS))
def test_missing_cupy_names_the_extra(without_cupy, call):
    with pytest.raises(AttngenError) as caught:
        CUPY_CALLS[call]()
    assert 'pip install "attngen[cuda13]"' in str(caught.value)
    assert '"attngen[cuda12]" for a CUDA 12 driver' in str(caught.value)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_missing_dependency_of_cupy_is_not_disguised(monkeypatch):
    """A module CuPy itself fails to find is not reported as a missing CuPy."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ModuleNotFoundError("No module named 'fastrlock'", name="fastrlock")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match="fastrlock"):
        CUPY_CALLS["nvrtc_compile"]()


# ------------------------------------------------------------------------------------- integers in patterns


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: ag.sliding_window(2**70), "window must be an integer from 1 to 1073741824"),
        (lambda: ag.local(2**64, 0), "left must be an integer from 0 to 1073741824"),
        (lambda: ag.local(0, 2**31), "right must be an integer from 0 to 1073741824"),
        (lambda: ag.prefix_lm(2**40), "n must be an integer from 0 to 1073741824"),
        (lambda: ag.global_tokens(-1), "n must be an integer from 0 to 1073741824"),
        (lambda: ag.sliding_window(10**5000), "an integer of 16610 bits"),
        (lambda: ag.block_layout(torch.ones(2, 2, dtype=torch.bool), 2**62), "block_size must be an integer from 1"),
    ],
)
def test_integers_beyond_int32_positions_are_refused(make, named):
    with pytest.raises(InputError, match=re.escape(named)):
        make()


@pytest.mark.parametrize(
    "text",
    ["k <= q + 99999999999999999999999", "k >= q - 1073741825", "k <= q + 9223372036854775808", "k < 2 * 2147483648"],
)
def test_predicate_integers_beyond_int32_positions_are_refused(text):
    with pytest.raises(InputError, match=r"is too large; integers from 0 to 2\*\*30 = 1073741824 are accepted"):
        ag.predicate(text)


def test_predicate_with_thousands_of_digits_is_refused():
    with pytest.raises(InputError, match="cannot parse predicate"):
        ag.predicate("k <= q + " + "9" * 5000)


def test_largest_accepted_integers_work():
    assert repr(ag.sliding_window(2**30)) == "sliding_window(1073741824)"
    assert torch.equal(ag.local(2**30, 2**30).mask(3, 3), ag.full().mask(3, 3))
    assert torch.equal(ag.predicate("k <= q + 1073741824 - 1073741824").mask(4, 4), ag.causal().mask(4, 4))


# ------------------------------------------------------------------------------------------ mask sizes


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda p: p.mask(-1, 5), "Sq must be an integer from 0"),
        (lambda p: p.mask(5, -2), "Sk must be an integer from 0"),
        (lambda p: p.mask(2.5, 3), "Sq must be an integer"),
        (lambda p: p.mask(3, "4"), "Sk must be an integer"),
        (lambda p: p.mask(True, 3), "Sq must be an integer"),
        (lambda p: p.mask(2**40, 3), "Sq must be an integer from 0 to 1073741824"),
        (lambda p: p.draw(-1, 5), "Sq must be an integer from 1"),
        (lambda p: p.draw(0, 5), "Sq must be an integer from 1"),
        (lambda p: p.draw(5, 0), "Sk must be an integer from 1"),
        (lambda p: p.draw(5, 5, cells=0), "cells must be an integer from 1"),
        (lambda p: p.draw(5, 5, cells=2.0), "cells must be an integer"),
    ],
)
def test_bad_mask_sizes_name_the_argument(call, named):
    with pytest.raises(InputError, match=re.escape(named)):
        call(ag.causal())


def test_empty_mask_is_allowed():
    assert ag.causal().mask(0, 5).shape[-2:] == (0, 5)
    assert ag.causal().draw(2, 2) == "█·\n██"


# --------------------------------------------------------------------------------------------------- licence


def test_license_is_apache_2_and_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_a_cached_kernel_needs_neither_cupy_nor_sympy():
    """A process whose kernels are in the disk cache compiles nothing: it reads NVRTC's version through ctypes (the
    cache key), and launches through the driver (attngen/driver.py), so CuPy (~0.1-0.4 s of import) and sympy
    (~0.4 s) stay out of its first call. The first process fills the cache (or finds it filled)."""
    code = (
        "import sys, torch, attngen as ag\n"
        "ag.compile(ag.causal() & ag.predicate('q // 64 == k // 64'), head_dim=64, dtype=torch.float16, arch='sm_80')\n"
        "print(sorted(m for m in ('cupy', 'sympy') if m in sys.modules))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
