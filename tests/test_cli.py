"""The command line: the pattern parser builds only what the constructor table allows and names what it
refuses; `emit` exits 2 on a refused expression; `cache list` and `cache clear` work on a given directory."""

import importlib
import sys
import types
from dataclasses import dataclass

import pytest

from attngen import cache, cli
from attngen.errors import InputError
from attngen.render import KernelSource

compile_module = importlib.import_module("attngen.compile")


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
    compile_module.compile_cached(KernelSource(name="touch_kernel", code=code, entries=("touch",), arch="sm_80"))

    assert cli.main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"cache: {tmp_path} (1 kernel, " in listed
    (row,) = [line for line in listed.splitlines() if line.startswith("touch_kernel")]
    assert row.split()[1] == "sm_80" and row.split()[-1].endswith("s")

    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 cached kernel from" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.bin"))
    assert cli.main(["cache", "list"]) == 0
    assert f"cache: {tmp_path} (0 kernels, " in capsys.readouterr().out
