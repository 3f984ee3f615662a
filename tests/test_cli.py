"""The command line: the pattern parser builds only what the constructor table allows and names what it
refuses; `emit` exits 2 on a refused expression or a pre-sm_80 arch; `cache list` and `cache clear` work on a given
directory; `emit --resources` shows each kernel's planned dynamic shared memory and ptxas's performance notes; a
closed output pipe ends the command quietly (status 141); `--help` and `cache ...` import no torch, sympy, jinja2,
CuPy, numpy, tqdm or matplotlib of their own. `draw` prints the text drawing or saves a picture; `prewarm` fills
the cache (in this process or a pool of processes), finds it full on a second run, reports compile failures with
status 1 and refuses bad input with status 2 before compiling anything."""

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

compile_module = importlib.import_module("attngen.nvrtc")
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
    # The real constructor table is not needed to refuse an expression; a fake module keeps this test local. The
    # rule constructors the parser adds to the table are loaded first (their module imports the real one).
    importlib.import_module("attngen.select.nm")
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


# ------------------------------------------------------------------------------------------------------ draw


def test_draw_prints_the_text_drawing(capsys):
    import attngen as ag

    assert cli.main(["draw", "causal() & sliding_window(8) | global_tokens(2)", "--sq", "24", "--sk", "30"]) == 0
    expected = (ag.causal() & ag.sliding_window(8) | ag.global_tokens(2)).draw(24, 30)
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main(["draw", "causal()", "--sq", "1000", "--cells", "10"]) == 0
    assert capsys.readouterr().out == ag.causal().draw(1000, 1000, cells=10) + "\n"


def test_draw_takes_document_lengths_and_key_lengths(capsys):
    import attngen as ag

    assert cli.main(["draw", "documents() & causal()", "--sq", "12", "--documents", "5", "7"]) == 0
    ids = torch.tensor([0] * 5 + [1] * 7)
    assert capsys.readouterr().out == (ag.documents() & ag.causal()).draw(12, 12, document_ids=ids) + "\n"
    assert cli.main(["draw", "key_padding()", "--sq", "4", "--sk", "9", "--key-length", "6"]) == 0
    assert capsys.readouterr().out == "██████···\n" * 4


def test_draw_lists_random_keys_and_scores_random_blocks(capsys):
    import attngen as ag

    assert cli.main(["draw", "key_indices()", "--sq", "5", "--sk", "40", "--key-indices", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 5 and all(len(r) == 40 and r.count("█") == 1 and r.count("·") == 39 for r in rows)
    assert cli.main(["draw", "causal() & topk_blocks(1)", "--sq", "256", "--cells", "4", "--seed", "3"]) == 0
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 1, 256, 64, generator=gen) for _ in range(2))
    assert capsys.readouterr().out == (ag.causal() & ag.topk_blocks(1)).draw(256, 256, cells=4, q=q, k=k) + "\n"


def test_draw_and_plan_top_k_by_token(capsys):
    """topk and threshold parse with their scorers; draw chooses from random q, k and scorer inputs of --seed (one key
    per row with topk(1)); the plan says the schedule comes from the call's lists."""
    assert cli.main(["draw", "causal() & topk(1, scorer=indexer())", "--sq", "12", "--seed", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 12 and all(r.count("█") == 1 for r in rows)
    assert cli.main(["draw", "causal() & threshold(0.5, scorer=lowrank())", "--sq", "9"]) == 0
    assert all(r.count("█") >= 1 for r in capsys.readouterr().out.splitlines())
    argv = ["emit", "causal() & threshold(0.1)", "--head-dim", "64", "--dtype", "bf16", "--arch", "sm_90", "--plan"]
    assert cli.main(argv) == 0
    assert "top-k by token's key lists" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["key_indices()", "--sq", "12"], "--key-indices 8"),
        (["causal()", "--sq", "12", "--key-indices", "3"], "--key-indices given, but causal() does not use it"),
        (["documents()", "--sq", "12"], "give the document lengths, e.g. --documents"),
        (["documents()", "--sq", "12", "--documents", "5", "6"], "adding up to the sequence length"),
        (["key_padding()", "--sq", "12"], "--key-length"),
        (["causal()", "--sq", "12", "--key-length", "3"], "--key-length given, but causal() does not use it"),
        (["causal()", "--sq", "0"], "Sq"),
        (["causal() & 3", "--sq", "12"], "constant 3 where a pattern is expected"),
        (["causal()", "--sq", "12", "--cells", "0"], "cells"),
    ],
)
def test_draw_refuses_bad_input_with_status_2(argv, message, capsys):
    assert cli.main(["draw", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attngen: error: ") and message in err


def test_draw_out_saves_a_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "mask.png"
    assert cli.main(["draw", "causal() & sliding_window(256)", "--sq", "1024", "--out", str(path)]) == 0
    assert capsys.readouterr().out == f"wrote {path}: the 1024 x 1024 mask of causal() & sliding_window(256)\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (520, 620)  # plot.py's figure for a square mask, at 100 dpi


def test_draw_out_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["draw", "causal()", "--sq", "8", "--out", str(tmp_path / "mask.png")]) == 2
    assert 'pip install "attngen[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "mask.png").exists()


# --------------------------------------------------------------------------------------------------- prewarm


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh cache directory, and nothing compiled in this process's memory (kernels are cached per process by
    structure too), so that a compile really happens."""
    from attngen import kernel

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    kernel.compiled.cache_clear()
    return tmp_path


PREWARM = ["prewarm", "local(1, 2)", "--head-dim", "32", "--dtype", "fp16", "bf16", "--arch", "sm_80"]


@pytest.mark.slow
def test_prewarm_fills_the_cache_and_then_finds_it(empty_cache, capsys):
    assert cli.main([*PREWARM, "--backward", "--jobs", "1"]) == 0  # in this process
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"prewarm: 2 kernel sets \(forward \+ backward\): 2 compiled, 0 already cached, in \d+\.\d s "
        rf"\(cache: {re.escape(str(empty_cache))}\)\n",
        out,
    ), out
    names = {e.name for e in cache.list_entries()}
    for dtype in ("fp16", "bf16"):  # a forward and a backward kernel file per dtype
        assert any(n.startswith("fwd_") and f"_{dtype}_hd32_sm_80" in n for n in names), names
        assert any(n.startswith("bwd_") and f"_{dtype}_hd32_sm_80" in n for n in names), names
    listed = {e.note for e in cache.list_entries()}
    assert "local(1, 2) | fp16 head_dim 32 sm_80" in listed

    # Two spawned processes, which start with empty memory: everything comes from the disk cache.
    assert cli.main([*PREWARM, "--backward", "--jobs", "2"]) == 0
    assert ": 0 compiled, 2 already cached, in " in capsys.readouterr().out
    assert {e.name for e in cache.list_entries()} == names


def test_prewarm_reports_compile_failures_with_status_1(empty_cache, monkeypatch, capsys):
    def fail(source):
        raise compile_module.CompileError("NVRTC refused it", "error: made up for the test", None)

    monkeypatch.setattr(compile_module, "nvrtc_compile", fail)
    assert cli.main([*PREWARM, "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert ": 0 compiled, 0 already cached, 2 failed, in " in captured.out
    assert "attngen: error: local(1, 2) (head dim 32, fp16, sm_80): NVRTC refused it" in captured.err
    assert compile_module.nvrtc_compile is fail  # prewarm's counting wrapper is gone again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["causal()", "causal().__class__", "--head-dim", "64"], "attribute access"),
        (["causal(", "--head-dim", "64"], "is not valid"),
        (["causal()", "--head-dim", "64", "48"], "head dim 48 is not supported"),
        (["causal()", "--head-dim", "64", "--jobs", "0"], "--jobs must be at least 1"),
        (["causal()", "--head-dim", "64", "--arch", "sm_80", "sm_75"], "sm_80 or newer"),
        (["causal()", "--head-dim", "64", "--arch", "hopper"], "arch must look like"),
    ],
)
def test_prewarm_refuses_bad_input_with_status_2(argv, message, empty_cache, capsys):
    argv = [*argv, "--dtype", "fp16"] + ([] if "--arch" in argv else ["--arch", "sm_80"])
    assert cli.main(["prewarm", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("attngen: error: ") and message in captured.err
    assert captured.out == ""
    assert not cache.list_entries()  # nothing was compiled


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


def test_emit_with_score_modifications(capsys):
    """--score-mod, repeatable and in order: the plan names them and the source holds their code; anything else
    is refused."""
    argv = ["emit", "causal()", "--head-dim", "64", "--dtype", "bf16", "--arch", "sm_80"]
    mods = ["--score-mod", "alibi(align='bottom_right')", "--score-mod", "softcap(30)"]
    assert cli.main([*argv, *mods, "--plan"]) == 0
    assert "score mod alibi(align='bottom_right'), softcap(30.0)" in capsys.readouterr().out
    assert cli.main([*argv, *mods, "--backward"]) == 0
    source = capsys.readouterr().out
    assert "struct ScoreMod" in source and "mod.grad(" in source
    assert cli.main([*argv, "--score-mod", "softcap(-1)"]) == 2
    assert "positive finite" in capsys.readouterr().err


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


HEAVY = ("torch", "sympy", "jinja2", "cupy", "numpy", "tqdm", "matplotlib")
LIGHT_SCRIPT = """
import sys, types
# The attngen package without its __init__.py's eager imports (torch through attngen.launch): what the CLI costs
# once __init__.py loads its names lazily.
package = types.ModuleType("attngen")
package.__path__ = [sys.argv[1]]
sys.modules["attngen"] = package
from attngen import cli
for argv in (["--help"], ["draw", "--help"], ["prewarm", "--help"], ["cache", "list"], ["cache", "clear"]):
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
