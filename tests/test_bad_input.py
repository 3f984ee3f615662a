"""Bad input, property-based (hypothesis): each property puts one defect into otherwise valid input and expects
attngen.InputError (a ValueError; TypeError only where Python's own operator protocol raises it) whose message
names the offending argument, raised before any kernel is compiled for the call or launched.

Without a GPU `attngen.attention` refuses CPU tensors, as the last of its tensor checks (`launch._check`): defects
of q, k, v themselves go through `attngen.attention` as it is; defects checked after that (pattern, head dim,
scale, run-time tensors) go through `attention` with only that CUDA refusal lifted (`_past_device_check`), with the
kernel entry replaced by a failure. Constructors and `attngen.compile(..., arch=...)` are called directly. Known
gaps it found are regression tests at the end, each with a minimal repro."""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import attngen as ag
from attngen import bind, launch, prepare
from attngen.errors import InputError
from attngen.tiling import HEAD_DIMS

# Hypothesis's files (example database, caches of constants, patches) go to a temporary folder, not into the
# checkout; set when this module is imported, before any example runs, and removed at exit.
_HOME = tempfile.mkdtemp(prefix="attngen-hypothesis-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
set_hypothesis_home_dir(_HOME)

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,  # nothing written into the checkout
    derandomize=True,  # the same examples on every run: CI stays deterministic
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TENSORS = ("q", "k", "v")
CUDA_REFUSAL = "attngen kernels run on CUDA tensors"


class ReachedKernel(AssertionError):
    """Bad input got past every check to the kernels."""


@pytest.fixture(autouse=True, scope="module")
def _no_kernels():
    """Nothing here may reach a kernel: the op's entry and the launcher fail the test if called."""

    def reached(*args, **kwargs):
        raise ReachedKernel("validation let the call through to the kernels")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "attention_fn", reached)
        mp.setattr(bind, "launch", reached)
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The tensors here are small: torch's thread pool only adds overhead (see conftest.py)."""


def _past_device_check(q, k, v, pattern=None, **kwargs):
    """attngen.attention with only its CUDA refusal lifted (launch._require_cuda, the last of launch._check's
    checks): what a call on a GPU would check, on CPU tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_require_cuda", lambda q: None)
        return ag.attention(q, k, v, pattern, **kwargs)


def _raises(fn, *keywords: str, types=(InputError,)) -> str:
    """Call fn; it must raise one of `types` whose message contains one of `keywords`."""
    with pytest.raises(types) as info:
        fn()
    message = str(info.value)
    assert any(word in message for word in keywords), f"message names none of {keywords}: {message}"
    return message


# ---------------------------------------------------------------------------------------------- strategies


@st.composite
def problems(draw, head_dims=HEAD_DIMS):
    """Valid q, k, v (CPU, tiny) as a dict with their sizes."""
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Sq, Sk, D = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.sampled_from(head_dims))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    q = torch.zeros(B, Hkv * group, Sq, D, dtype=dtype)
    k, v = torch.zeros(B, Hkv, Sk, D, dtype=dtype), torch.zeros(B, Hkv, Sk, D, dtype=dtype)
    return {"q": q, "k": k, "v": v, "B": B, "Hq": Hkv * group, "Hkv": Hkv, "Sq": Sq, "Sk": Sk, "D": D}


def _qkv(p: dict, **replace) -> tuple:
    return tuple(replace.get(name, p[name]) for name in TENSORS)


BAD_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]
BAD_DTYPES += [torch.complex64, torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [torch.complex64]


# ------------------------------------------------------------------------------------------- q, k, v themselves


@SETTINGS
@given(p=problems(), which=st.sets(st.sampled_from(TENSORS), min_size=1), dtype=st.sampled_from(BAD_DTYPES))
def test_wrong_dtype(p, which, dtype):
    bad = {name: p[name].to(dtype) for name in which}
    first = next(name for name in TENSORS if name in which)
    _raises(lambda: ag.attention(*_qkv(p, **bad), ag.causal()), f"{first} has dtype")


@SETTINGS
@given(p=problems(), which=st.sampled_from(TENSORS))
def test_mixed_dtypes(p, which):
    t = p[which]
    other = torch.bfloat16 if t.dtype == torch.float16 else torch.float16
    _raises(lambda: ag.attention(*_qkv(p, **{which: t.to(other)})), "one dtype")


@SETTINGS
@given(p=problems(), which=st.sampled_from(TENSORS), ndim=st.sampled_from([0, 1, 2, 3, 5, 6]))
def test_wrong_number_of_dims(p, which, ndim):
    t = p[which]
    bad = {
        0: lambda: t.reshape(-1)[0],
        1: lambda: t.reshape(-1),
        2: lambda: t.reshape(t.shape[0], -1),
        3: lambda: t.reshape(t.shape[0], t.shape[1], -1),
        5: lambda: t[None],
        6: lambda: t[None, None],
    }[ndim]()
    assert bad.dim() == ndim
    _raises(lambda: ag.attention(*_qkv(p, **{which: bad})), f"{which} must be 4-d")


@SETTINGS
@given(p=problems(), which=st.sampled_from(TENSORS), how=st.sampled_from(["transpose", "step", "expand"]))
def test_last_dim_not_contiguous(p, which, how):
    t = p[which]
    if how == "transpose":
        bad = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif how == "step":
        bad = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    else:
        bad = torch.zeros(*t.shape[:-1], 1, dtype=t.dtype).expand(t.shape)
    if t.shape[-1] == 1 or bad.stride(-1) == 1:  # a stride of one element is contiguous after all
        return
    _raises(lambda: ag.attention(*_qkv(p, **{which: bad})), f"{which} must be contiguous in its last")


@SETTINGS
@given(p=problems(), kind=st.sampled_from(["batch", "head_dim", "heads", "kv_len", "kv_heads", "zero_kv_heads"]))
def test_mismatched_shapes(p, kind):
    B, Hq, Hkv, Sk, D = p["B"], p["Hq"], p["Hkv"], p["Sk"], p["D"]
    z = lambda *shape: torch.zeros(*shape, dtype=p["q"].dtype)
    if kind == "batch":
        args, words = _qkv(p, k=z(B + 1, Hkv, Sk, D), v=z(B + 1, Hkv, Sk, D)), ("batch",)
    elif kind == "head_dim":
        other = 64 if D != 64 else 128
        args, words = _qkv(p, k=z(B, Hkv, Sk, other), v=z(B, Hkv, Sk, other)), ("head_dim",)
    elif kind == "heads":  # Hq not a multiple of Hkv
        bad = Hq + 1 if Hq + 1 != Hkv else Hq + 2
        args, words = _qkv(p, k=z(B, bad, Sk, D), v=z(B, bad, Sk, D)), ("heads",)
        if Hq % bad == 0:
            return
    elif kind == "kv_len":
        args, words = _qkv(p, v=z(B, Hkv, Sk + 1, D)), ("k and v",)
    elif kind == "kv_heads":
        args, words = _qkv(p, v=z(B, Hkv + 1, Sk, D)), ("k and v",)
    else:
        args, words = _qkv(p, k=z(B, 0, Sk, D), v=z(B, 0, Sk, D)), ("heads",)
    _raises(lambda: ag.attention(*args), *words)


@SETTINGS
@given(p=problems(), which=st.sets(st.sampled_from(TENSORS), min_size=1))
def test_devices(p, which):
    moved = {name: p[name].to("meta") for name in which}
    words = ("on meta", CUDA_REFUSAL) if len(which) == 3 else ("one device",)
    _raises(lambda: ag.attention(*_qkv(p, **moved)), *words)
    _raises(lambda: ag.attention(*_qkv(p)), CUDA_REFUSAL)  # CPU tensors: refused, naming the devices
    assert "cpu" in _raises(lambda: ag.attention(*_qkv(p)), CUDA_REFUSAL)


@SETTINGS
@given(p=problems(), which=st.sampled_from(TENSORS), value=st.sampled_from([None, 1.0, [[1.0]], "q", np.zeros(4)]))
def test_not_a_tensor(p, which, value):
    _raises(lambda: ag.attention(*_qkv(p, **{which: value})), f"{which} must be a torch.Tensor")


# ------------------------------------------------------------------------------------ checked after q, k, v


@SETTINGS
@given(p=problems(), pattern=st.sampled_from(["causal", 3, torch.ones(2, 2, dtype=torch.bool), ag.causal]))
def test_pattern_not_a_pattern(p, pattern):
    _raises(lambda: _past_device_check(*_qkv(p), pattern), "pattern")
    _raises(lambda: ag.compile(pattern, head_dim=64, arch="sm_90"), "pattern")


@SETTINGS
@given(p=problems(head_dims=[1, 8, 16, 48, 80, 112, 160, 192, 512]))
def test_unsupported_head_dim(p):
    _raises(lambda: _past_device_check(*_qkv(p), ag.causal()), "head_dim")
    _raises(lambda: ag.compile(ag.causal(), head_dim=p["D"], arch="sm_90"), "head_dim")


@SETTINGS
@given(p=problems(), scale=st.sampled_from([0, 0.0, -0.0, -1e-3, -1, float("nan"), float("inf"), -float("inf")]))
def test_bad_scale(p, scale):
    _raises(lambda: _past_device_check(*_qkv(p), ag.causal(), scale=scale), "scale")


# ---------------------------------------------------------------------------------------- run-time tensors


def _ids(n: int, rows: int | None = None, dtype=torch.int64) -> torch.Tensor:
    return torch.zeros((rows, n) if rows else (n,), dtype=dtype)


@SETTINGS
@given(
    p=problems(),
    defect=st.sampled_from(
        ["missing", "float", "bool", "complex", "q_len", "k_len", "batch", "3d", "0d", "list", "triple", "single"]
    ),
)
def test_bad_document_ids(p, defect):
    B, Sq, Sk = p["B"], p["Sq"], p["Sk"]
    pair = (_ids(Sq), _ids(Sk))
    ids = {
        "missing": None,
        "float": (_ids(Sq, dtype=torch.float32), _ids(Sk)),
        "bool": (_ids(Sq), _ids(Sk, dtype=torch.bool)),
        "complex": (_ids(Sq, dtype=torch.complex64), _ids(Sk)),
        "q_len": (_ids(Sq + 1), _ids(Sk)),
        "k_len": (_ids(Sq), _ids(Sk + 2)),
        "batch": (_ids(Sq, B + 1), _ids(Sk)),
        "3d": (_ids(Sq)[None, None], _ids(Sk)),
        "0d": (torch.tensor(0), _ids(Sk)),
        "list": ([0] * Sq, _ids(Sk)),
        "triple": (*pair, _ids(Sk)),
        "single": _ids(Sq) if Sq != Sk else None,  # one tensor for Sq != Sk: a pair is needed
    }[defect]
    if defect == "single" and Sq == Sk:
        return
    pattern = ag.documents() & ag.causal()
    _raises(lambda: _past_device_check(*_qkv(p), pattern, document_ids=ids), "document_ids", "document ids")


@SETTINGS
@given(
    p=problems(),
    defect=st.sampled_from(["pair without", "float", "bool", "q_len", "k_len", "batch", "3d", "list", "triple"]),
)
def test_bad_document_positions(p, defect):
    """in_document() with a (query, key) pair of ids needs `document_positions=`, checked like the ids."""
    B, Sq, Sk = p["B"], p["Sq"], p["Sk"]
    ids, pos = (_ids(Sq), _ids(Sk)), (_ids(Sq), _ids(Sk))
    positions = {
        "pair without": None,
        "float": (_ids(Sq, dtype=torch.float32), _ids(Sk)),
        "bool": (_ids(Sq), _ids(Sk, dtype=torch.bool)),
        "q_len": (_ids(Sq + 1), _ids(Sk)),
        "k_len": (_ids(Sq), _ids(Sk + 2)),
        "batch": (_ids(Sq, B + 1), _ids(Sk)),
        "3d": (_ids(Sq)[None, None], _ids(Sk)),
        "list": ([0] * Sq, _ids(Sk)),
        "triple": (*pos, _ids(Sk)),
    }[defect]
    call = lambda: _past_device_check(
        *_qkv(p), ag.in_document(ag.causal()), document_ids=ids, document_positions=positions
    )
    _raises(call, "document_positions")


@SETTINGS
@given(p=problems(), defect=st.sampled_from(["heads", "2d", "ints", "device", "after softcap", "not a tensor"]))
def test_bad_head_scale(p, defect):
    """What `head_scale` refuses, before any kernel, with a message naming it."""
    Hq = p["Hq"]
    make = {
        "heads": lambda: ag.head_scale(torch.ones(Hq + 1)),
        "2d": lambda: ag.head_scale(torch.ones(Hq, 1)),
        "ints": lambda: ag.head_scale(torch.ones(Hq, dtype=torch.int64)),
        "device": lambda: ag.head_scale(torch.ones(Hq, device="meta")),
        "after softcap": lambda: (ag.softcap(2.0), ag.head_scale(torch.ones(Hq))),
        "not a tensor": lambda: ag.head_scale([1.0] * Hq),
    }[defect]
    _raises(lambda: _past_device_check(*_qkv(p), ag.causal(), score_mod=make()), "head_scale")


@SETTINGS
@given(p=problems(), defect=st.sampled_from(["missing", "float", "bool", "2d", "0d", "short", "long", "list"]))
def test_bad_key_lengths(p, defect):
    B, Sk = p["B"], p["Sk"]
    lengths = {
        "missing": None,
        "float": torch.full((B,), float(Sk)),
        "bool": torch.ones(B, dtype=torch.bool),
        "2d": torch.full((B, 1), Sk),
        "0d": torch.tensor(Sk),
        "short": torch.full((B - 1,), Sk) if B > 1 else torch.zeros(0, dtype=torch.int64),
        "long": torch.full((B + 1,), Sk),
        "list": [Sk] * B,
    }[defect]
    _raises(lambda: _past_device_check(*_qkv(p), ag.key_padding(), key_lengths=lengths), "key_lengths")


@SETTINGS
@given(
    p=problems(),
    pattern=st.sampled_from([ag.causal(), ag.full(), ag.sliding_window(3)]),
    extra=st.sampled_from(["document_ids", "key_lengths", "lengths", "alibi", "rel_tables"]),
)
def test_unused_inputs_are_named(p, pattern, extra):
    value = torch.zeros(p["B"], dtype=torch.int64)
    message = _raises(lambda: _past_device_check(*_qkv(p), pattern, **{extra: value}), extra)
    assert "does not use" in message


@SETTINGS
@given(
    p=problems(),
    defect=st.sampled_from(
        ["string", "function", "number", "pattern", "two softcaps", "slopes", "meta slopes", "alibi with buckets"]
    ),
)
def test_bad_score_mod(p, defect):
    """What `score_mod=` refuses, always before any kernel, with a message naming the modification."""
    pattern = ag.causal() & ag.buckets() if defect == "alibi with buckets" else ag.causal()
    mod = {
        "string": "softcap",
        "function": torch.tanh,
        "number": 30.0,
        "pattern": ag.causal(),
        "two softcaps": (ag.softcap(1.0), ag.softcap(2.0)),
        "slopes": ag.alibi(torch.ones(p["Hq"] + 1)),  # one slope per query head
        "meta slopes": ag.alibi(torch.ones(p["Hq"], device="meta")),
        "alibi with buckets": ag.alibi(torch.ones(p["Hq"])),  # positions the sorted tokens' kernels do not give
    }[defect]
    _raises(lambda: _past_device_check(*_qkv(p), pattern, score_mod=mod), "score_mod", "alibi", "softcap")


@SETTINGS
@given(
    p=problems(),
    defect=st.sampled_from(
        ["bias without bias()", "bias() without bias", "shape", "ints", "device", "table without", "table shape"]
    ),
)
def test_bad_bias_and_table(p, defect):
    """What `bias=` and `rel_table=` refuse, before any kernel, with a message naming the argument."""
    B, Hq, Sq, Sk = p["B"], p["Hq"], p["Sq"], p["Sk"]
    mods, tensors = {
        "bias without bias()": ((ag.softcap(2.0),), {"bias": torch.zeros(Sq, Sk)}),
        "bias() without bias": ((ag.bias(),), {}),
        "shape": ((ag.bias(),), {"bias": torch.zeros(B, Hq + 1, Sq, Sk)}),
        "ints": ((ag.bias(),), {"bias": torch.zeros(Sq, Sk, dtype=torch.int32)}),
        "device": ((ag.bias(),), {"bias": torch.zeros(Sq, Sk, device="meta")}),
        "table without": ((ag.rel_bias(8, 20),), {}),
        "table shape": ((ag.rel_bias(8, 20),), {"rel_table": torch.zeros(Hq, 9)}),
    }[defect]
    call = lambda: _past_device_check(*_qkv(p), ag.causal(), score_mod=mods, **tensors)
    _raises(call, "bias", "rel_table")


@SETTINGS
@given(p=problems(), defect=st.sampled_from(["heads", "rows", "cols"]), bs=st.sampled_from([1, 2, 4]))
def test_layout_that_does_not_fit_the_call(p, defect, bs):
    Hq, Sq, Sk = p["Hq"], p["Sq"], p["Sk"]
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    shape = {"heads": (Hq + 1, nq, nk), "rows": (nq - 1, nk), "cols": (nq, nk - 1)}[defect]
    if 0 in shape:
        return
    pattern = ag.block_layout(torch.ones(shape, dtype=torch.bool), bs)
    _raises(lambda: _past_device_check(*_qkv(p), pattern), "layout")


# ------------------------------------------------------------------------------------------ pattern arguments

BAD_INTS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**30 + 1),
    st.floats(allow_nan=True),
    st.sampled_from([None, "3", True, False, np.int64(3), torch.tensor(3), 2.0, [3]]),
)
CONSTRUCTORS = {
    "window": lambda x: ag.sliding_window(x),
    "left": lambda x: ag.local(x, 3),
    "right": lambda x: ag.local(3, x),
    "n": lambda x: ag.prefix_lm(x),
    "block_size": lambda x: ag.block_layout(torch.ones(2, 2, dtype=torch.bool), x),
}


@SETTINGS
@given(arg=st.sampled_from(list(CONSTRUCTORS)), value=BAD_INTS)
def test_bad_integer_arguments(arg, value):
    message = _raises(lambda: CONSTRUCTORS[arg](value), f"{arg} must be")
    assert message.startswith(f"{arg} must be")
    if arg == "n":
        _raises(lambda: ag.global_tokens(value), "n must be")
    if arg == "window":
        _raises(lambda: ag.sliding_window(0), "window must be")  # a window holds at least one key


@SETTINGS
@given(
    align=st.one_of(st.text(max_size=12), st.sampled_from([None, 1, ["top_left"], "TOP_LEFT", "bottom-right"])),
    which=st.sampled_from(["causal", "sliding_window"]),
)
def test_bad_align(align, which):
    if align in ("top_left", "bottom_right"):
        return
    build = (lambda: ag.causal(align=align)) if which == "causal" else (lambda: ag.sliding_window(4, align=align))
    _raises(build, "align")


@SETTINGS
@given(
    defect=st.sampled_from(["float", "int", "uint8", "1d", "5d", "empty", "no_heads", "meta", "list", "numpy"]),
    bs=st.sampled_from([16, 32, 64, 96, 128]),
)
def test_bad_layouts(defect, bs):
    layout = {
        "float": torch.ones(2, 2),
        "int": torch.ones(2, 2, dtype=torch.int64),
        "uint8": torch.ones(2, 2, dtype=torch.uint8),
        "1d": torch.ones(4, dtype=torch.bool),
        "5d": torch.ones(1, 1, 2, 2, 2, dtype=torch.bool),  # 4-d is a grid per batch element
        "empty": torch.ones(0, 2, dtype=torch.bool),
        "no_heads": torch.ones(0, 2, 2, dtype=torch.bool),
        "meta": torch.ones(2, 2, dtype=torch.bool, device="meta"),
        "list": [[True, False], [False, True]],
        "numpy": np.ones((2, 2), dtype=bool),
    }[defect]
    _raises(lambda: ag.block_layout(layout, bs), "layout")


BAD_PREDICATES = [
    "q*k < 3", "k*k >= q", "k < 1.5", "k / 2 < q", "k // 0 < q", "k % q == 0", "x < 3", "k < n", "abs(k) < q",
    "k**2 < q", "k <", "", "k", "3", "k + 1", "k < 99999999999", "k in (1, 2)", "k is q", "lambda: 1",
    "k < q if q else k", "[k < q]", "k < 'a'", "k < None", "f(k) < q", "q.real < k", "k < q; q < k",
]  # fmt: skip


@SETTINGS
@given(text=st.sampled_from(BAD_PREDICATES), wrap=st.sampled_from(["{}", "({}) and (k <= q)", "not ({})", "~({})"]))
def test_bad_predicates(text, wrap):
    if wrap != "{}" and text in ("", "3", "k + 1"):  # numbers under & | ~: see test_predicate_refuses_numbers_as_truth
        return
    _raises(lambda: ag.predicate(wrap.format(text)), "predicate")


@SETTINGS
@given(
    value=st.sampled_from(
        [None, 3, 1.5, "causal", True, sp.Symbol("x") < 3, sp.Symbol("q") * sp.Symbol("k") < 2, ag.k + 1]
    )
)
def test_bad_predicate_objects(value):
    _raises(lambda: ag.predicate(value), "predicate")


@SETTINGS
@given(other=st.sampled_from([3, True, None, "causal()", torch.ones(2, 2, dtype=torch.bool), ag.k < ag.q]))
def test_patterns_combine_only_with_patterns(other):
    pat = ag.causal()
    for combine in (lambda: pat & other, lambda: pat | other):
        with pytest.raises((TypeError, InputError)) as info:
            combine()
        if isinstance(info.value, InputError) or "patterns combine" in str(info.value):
            assert "pattern" in str(info.value)
    with pytest.raises(TypeError):  # Python's operator protocol: the other operand does not know patterns
        _ = 3 & pat


@SETTINGS
@given(
    arch=st.one_of(
        st.sampled_from(["bogus", "", "sm", "sm_", "sm_70", "sm_75", "sm_8", "SM_90", "sm90", "compute_90", 90, None]),
        st.text(max_size=8).filter(lambda s: not (s.startswith("sm_") and s[3:].rstrip("a").isdigit())),
    ),
)
def test_compile_bad_arch(arch):
    if arch is None:  # no arch and no GPU
        _raises(lambda: ag.compile(ag.causal(), head_dim=64), "arch")
        return
    _raises(lambda: ag.compile(ag.causal(), head_dim=64, arch=arch), "arch", "sm_80")


@SETTINGS
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.int8, "float32", "half", "fp32", None, 16]))
def test_compile_bad_dtype(dtype):
    _raises(lambda: ag.compile(ag.causal(), head_dim=64, dtype=dtype, arch="sm_90"), "dtype")


# ------------------------------------------------------------------------------------ the harness is not vacuous


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_fuzz_cases_pass_every_check(seed):
    """Valid input (the fuzz generator's cases, on the CPU) passes every check and reaches the kernel entry."""
    from fuzzing import case

    c = case(seed)
    if c.scores > 1 << 20:
        return
    q, k, v, _, _ = c.inputs("cpu")
    with pytest.raises(ReachedKernel):
        _past_device_check(q, k, v, c.pattern, scale=c.scale, return_lse=c.return_lse, **c.runtime())


# ----------------------------------------------------------------------------- regressions (found by this fuzzing)


def _prep(pattern, Sq: int = 4, Sk: int = 4, B: int = 1, **inputs):
    q = torch.zeros(B, 1, Sq, 64, dtype=torch.float16)
    k = torch.zeros(B, 1, Sk, 64, dtype=torch.float16)
    return prepare.prepare(pattern, q, k, {"document_ids": None, "key_lengths": None, **inputs})


def test_document_ids_beyond_int32_are_refused():
    ids = torch.tensor([0, 2**32, 5, 5])
    assert not ag.documents().mask(4, 4, document_ids=ids)[0, 0, 0, 1]  # the reference: different documents
    _raises(lambda: _prep(ag.documents(), document_ids=ids), "document")


def test_key_lengths_beyond_int32_are_refused():
    _raises(lambda: _prep(ag.key_padding(), key_lengths=torch.tensor([2**32 + 1])), "key_lengths")


@pytest.mark.filterwarnings("ignore:Casting complex values")
def test_complex_key_lengths_are_refused():
    _raises(lambda: _prep(ag.key_padding(), key_lengths=torch.tensor([3 + 0j])), "key_lengths")


@pytest.mark.parametrize("name", ["document_ids", "key_lengths"])
def test_meta_run_time_tensors_are_refused(name):
    pattern = ag.documents() if name == "document_ids" else ag.key_padding()
    value = torch.zeros(1 if name == "key_lengths" else 4, dtype=torch.int64, device="meta")
    _raises(lambda: _prep(pattern, **{name: value}), name.replace("_", " "), name)


@pytest.mark.parametrize(
    "expr",
    [
        lambda: ag.k < 1.5 * ag.q,
        lambda: ag.k < sp.Float(0.1) * ag.q + 3,
        lambda: ag.k < sp.pi * ag.q,
        lambda: ag.k < sp.sqrt(2) * ag.q,
        lambda: ag.k < 10**40,
        lambda: ag.k * ag.q < 2,
        lambda: (ag.k < ag.q) & 3,
    ],
    ids=["float", "float-0.1", "pi", "sqrt2", "huge", "product", "and-number"],
)
def test_predicate_refuses_non_rational_coefficients(expr):
    """Built with Python operators from attngen.q, .k, .Sq, .Sk (sympy numbers mixed in): refused as it is built or
    when given to predicate()."""
    _raises(lambda: ag.predicate(expr()), "predicate")


@pytest.mark.parametrize("text", ["2*(k < q) < 1", "(k < q) + 1 < 2", "-(k < q)", "~k < q"])
def test_predicate_refuses_comparisons_as_numbers(text):
    _raises(lambda: ag.predicate(text), "predicate")


# A number as an operand of and / or / | raised sympy's TypeError; under not / ~ it was silently taken as a truth
# value (predicate('not (3)') kept nothing) while predicate('3') was refused.
@pytest.mark.parametrize("text", ["(3) and (k <= q)", "(k + 1) | (k < q)", "not (3)", "~(0)"])
def test_predicate_refuses_numbers_as_truth(text):
    _raises(lambda: ag.predicate(text), "predicate")


def test_large_coefficients_do_not_overflow_32_bit_positions():
    from attngen.plan import make_plan

    pattern = ag.predicate("k <= 1073741824*q - 5")
    plan = make_plan(pattern, head_dim=64, dtype="fp16", arch="sm_90")
    reference = pattern.mask(4, 1)[0, 0, :, 0].tolist()
    # C semantics: int arithmetic is 32-bit and wraps, unless an LL literal widens the expression to 64 bits.
    width = np.int64 if "LL" in plan.mask_c else np.int32
    with np.errstate(over="ignore"):
        emitted = [bool(eval(plan.mask_c.replace("LL", ""), {"q": width(i), "k": width(0)})) for i in range(4)]
    assert emitted == reference, f"C {plan.mask_c!r} keeps {emitted}, the reference {reference}"


@pytest.mark.parametrize(
    "scale", ["abc", 1j, [0.5], 10**400, torch.ones(2)], ids=["str", "complex", "list", "huge", "2"]
)
def test_non_numeric_scale_is_refused(scale):
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    _raises(lambda: _past_device_check(q, q, q, ag.causal(), scale=scale), "scale")


def test_compile_float_head_dim_is_refused():
    _raises(lambda: ag.compile(ag.causal(), head_dim=64.0, arch="sm_90"), "head_dim")


def test_compile_unhashable_dtype_is_refused():
    _raises(lambda: ag.compile(ag.causal(), head_dim=64, dtype=[torch.float16], arch="sm_90"), "dtype")
