"""The command line: the pattern parser builds only what the constructor table allows and names what it
refuses; `emit` exits 2 on a refused expression or a pre-sm_80 arch; `cache list` and `cache clear` work on a given
directory; `emit --resources` shows each kernel's planned dynamic shared memory and ptxas's performance notes; a
closed output pipe ends the command quietly (status 141); `--help` and `cache ...` import no torch, sympy, jinja2,
CuPy or numpy of their own."""

import importlib
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attngen import cache, cli
from attngen.errors import InputError
from attngen.render import KernelSource

compile_module = importlib.import_module("attngen.compile")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fake:
    """Stands in for a Pattern: records how it was built so a test can check the evaluation exactly."""

    text: str

    def __and__(self, other):
        return Fake(f"({self.text} & {other.text})")

    def __or__(self, other):
        return Fake(f"({self.text} | {other.text})")

    def __invert__(self):
        return Fake(f"~{self.text}")


def _constructor(name):
    def build(*args, **kwargs):
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return Fake(f"{name}({', '.join(shown)})")

    return build


def _strict_causal():
    return Fake("causal()")


TABLE = {name: _constructor(name) for name in ("sliding_window", "global_tokens", "predicate", "documents")}
TABLE["causal"] = _strict_causal


def parse(text):
    return cli.parse_pattern(text, TABLE)


def test_accepts_combinations_with_python_precedence():
    assert parse("causal() & sliding_window(1024) | global_tokens(16)") == Fake(
        "((causal() & sliding_window(1024)) | global_tokens(16))"
    )
    assert parse("causal() & (sliding_window(1024) | ~global_tokens(16))") == Fake(
        "(causal() & (sliding_window(1024) | ~global_tokens(16)))"
    )


def test_accepts_constants_keywords_and_negative_numbers():
    assert parse("sliding_window(-3, right=2.5)") == Fake("sliding_window(-3, right=2.5)")
    assert parse("predicate('i >= j')") == Fake("predicate('i >= j')")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("__import__('os')", "unknown pattern constructor '__import__'"),
        ("__import__('os').system('true')", "attribute access"),
        ("causal().__class__", "attribute access"),
        ("causal()[0]", "subscripts"),
        ("(lambda: causal())()", "lambda"),
        ("sliding_window(lambda: 1)", "lambda"),
        ("open('x')", "unknown pattern constructor 'open'"),
        ("sliding_window(x)", "unknown name 'x'"),
        ("causal", "uncalled constructor 'causal'"),
        ("predicate('__class__')", "strings containing '__'"),
        ("sliding_window(*[1])", "*arguments"),
        ("sliding_window(**{'w': 1})", "**arguments"),
        ("global_tokens([i for i in (1, 2)])", "comprehensions"),
        ("predicate(f'{1}')", "f-strings"),
        ("causal() and sliding_window(1)", "'and'/'or'"),
        ("causal() + sliding_window(1)", "the operator +"),
        ("causal() ^ sliding_window(1)", "the operator ^"),
        ("not causal()", "'not'"),
        ("-causal()", "unary - on a pattern"),
        ("sliding_window(-causal())", "unary - on anything but a number"),
        ("causal() & 3", "constant 3 where a pattern is expected"),
        ("sliding_window(None)", "constant None"),
        ("causal(1)", "causal(1): "),
        ("causal(", "is not valid"),
        ("~" * 5_000 + "causal()", "nested too deeply"),
        ("~" * 50_000 + "causal()", "nested too deeply"),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else value,
)
def test_refuses_everything_else(text, named):
    with pytest.raises(InputError) as caught:
        parse(text)
    assert named in str(caught.value)


def test_emit_exits_2_on_refused_expression(monkeypatch, capsys):
    # The real constructor table is not needed to refuse an expression; a fake module keeps this test local.
    monkeypatch.setitem(sys.modules, "attngen.pattern", types.SimpleNamespace(CONSTRUCTORS=TABLE))
    status = cli.main(["emit", "causal().__class__", "--head-dim", "64", "--dtype", "bf16", "--arch", "sm_90"])
    assert status == 2
    assert "attribute access" in capsys.readouterr().err


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    code = 'extern "C" __global__ void touch(int* x) { x[threadIdx.x] += 1; }'
    source = KernelSource(name="touch_kernel", code=code, entries=("touch",), arch="sm_80")
    compile_module.compile_cached(source, "a test")

    assert cli.main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"cache: {tmp_path} (1 kernel, " in listed
    (row,) = [line for line in listed.splitlines() if line.startswith("touch_kernel")]
    assert re.fullmatch(r"touch_kernel_sm_80  +\d+(\.\d)? [KM]?B +\d+s  a test", row), row  # name, size, age, note

    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 cached kernel from" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.bin"))
    assert cli.main(["cache", "list"]) == 0
    assert f"cache: {tmp_path} (0 kernels, " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ emit --resources


def _tiles(smem_bytes):
    return types.SimpleNamespace(smem_bytes=smem_bytes)


def _fake_kernel(log, dkdv_name):
    resources = compile_module.Resources(registers=96, shared_bytes=0, stack_bytes=0, spill_stores=0, spill_loads=0)
    forward = compile_module.Binary(cubin=b"", arch="sm_90a", resources=(("attngen_fwd", resources),), log=log)
    entries = ("attngen_bwd_preprocess", "attngen_bwd_dkdv", "attngen_bwd_dq")
    backward = compile_module.Binary(cubin=b"", arch="sm_90a", resources=tuple((e, resources) for e in entries), log="")
    plan = types.SimpleNamespace(fwd=_tiles(73728), dq=_tiles(99400), **{dkdv_name: _tiles(67656)})
    return types.SimpleNamespace(forward_binary=forward, backward_binary=backward, kernel_plan=plan)


@pytest.mark.parametrize("dkdv_name", ["bwd", "dkdv"])
def test_resource_report_shows_dynamic_shared_memory_and_notes(dkdv_name):
    note = (
        "(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient "
        "register resources for the wgmma pipeline in the function 'attngen_fwd'"
    )
    log = f"ptxas info    : {note}\nptxas info    : (C7519) warpgroup.arrive is injected in around line 9 by compiler\n"
    kern = _fake_kernel(log, dkdv_name)
    forward = cli.resource_report(kern).splitlines()
    assert forward[:4] == ["# attngen_fwd", "registers: 96", "shared_bytes: 0", "dynamic_shared_bytes: 73728"]
    assert forward[-2:] == ["performance notes:", f"  {note}"]
    backward = cli.resource_report(kern, backward=True)
    shown = [line.split(": ")[1] for line in backward.splitlines() if line.startswith("dynamic_shared_bytes")]
    assert shown == ["0", "67656", "99400"]  # preprocess, dK/dV, dQ
    assert backward.endswith("\nperformance notes: none")
    assert cli.dynamic_shared_bytes(kern.kernel_plan, "attngen_something_new") == "unknown"


@pytest.mark.parametrize(("arch", "backward"), [("sm_80", False), ("sm_90", False), ("sm_90", True)])
def test_emit_resources_prints_the_planned_dynamic_shared_memory(capsys, arch, backward):
    import attngen as ag

    argv = ["emit", "causal()", "--head-dim", "64", "--dtype", "fp16", "--arch", arch, "--resources"]
    assert cli.main(argv + ["--backward"] * backward) == 0
    out = capsys.readouterr().out
    plan = ag.compile(ag.causal(), head_dim=64, dtype=torch.float16, arch=arch).kernel_plan
    dkdv = next(getattr(plan, name) for name in ("dkdv", "bwd") if hasattr(plan, name))
    expected = [0, dkdv.smem_bytes, plan.dq.smem_bytes] if backward else [plan.fwd.smem_bytes]
    shown = [int(line.split(": ")[1]) for line in out.splitlines() if line.startswith("dynamic_shared_bytes: ")]
    assert shown == expected and all(n > 0 for n in expected[backward:])
    assert out.splitlines().count("shared_bytes: 0") == len(expected)  # ptxas's static shared memory, still shown
    assert out.rstrip().endswith("performance notes: none")


def test_emit_for_a_gpu_older_than_sm80_exits_2(capsys):
    assert cli.main(["emit", "causal()", "--head-dim", "64", "--dtype", "fp16", "--arch", "sm_75"]) == 2
    assert "attngen needs an NVIDIA GPU of compute capability sm_80 or newer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ closed pipe


def _run_into_closed_pipe(argv, tmp_path):
    """Run `attngen argv` with its stdout a pipe whose reader has gone (as after `| head -1` has exited)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout; the cache directory of conftest.py
    child = subprocess.Popen(
        [sys.executable, "-m", "attngen.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    child.stdout.close()  # before the child writes anything: its first write meets a closed pipe
    _, err = child.communicate(timeout=300)
    return child.returncode, err.decode()


@pytest.mark.parametrize(
    "argv",
    [["emit", "causal()", "--head-dim", "64", "--dtype", "fp16", "--arch", "sm_80"], ["cache", "list"]],
    ids=["emit", "cache-list"],
)
def test_closed_pipe_exits_quietly(argv, tmp_path):
    status, err = _run_into_closed_pipe(argv, tmp_path)
    assert err == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert status == 141  # as a process killed by SIGPIPE


# ------------------------------------------------------------------------------------------ light imports


HEAVY = ("torch", "sympy", "jinja2", "cupy", "numpy")
LIGHT_SCRIPT = """
import sys, types
# The attngen package without its __init__.py's eager imports (torch through attngen.launch): what the CLI costs
# once __init__.py loads its names lazily.
package = types.ModuleType("attngen")
package.__path__ = [sys.argv[1]]
sys.modules["attngen"] = package
from attngen import cli
for argv in (["--help"], ["cache", "list"], ["cache", "clear"]):
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status == 0, (argv, status)
print("heavy=" + ",".join(name for name in sys.argv[2:] if name in sys.modules))
"""


def test_help_and_cache_commands_import_nothing_heavy(tmp_path):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_SCRIPT, str(ROOT / "attngen"), *HEAVY],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "heavy="
