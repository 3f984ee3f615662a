"""Launch without a GPU: argument binding agrees with every rendered kernel signature (count and C types),
grids and shared memory follow the plan, and bad input raises clear errors before anything is launched."""

import itertools
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import attngen as ag
from attngen import bind, launch, prepare, tensormap
from attngen.driver import ByValue
from attngen.errors import InputError

C_TYPES = {np.uint64: r"\*", np.int64: r"long long", np.int32: r"int", np.float32: r"float", ByValue: r"TensorMap"}


def _signature(code: str, entry: str) -> list[str]:
    params = code[code.index(f"{entry}(") + len(entry) + 1 :]  # parameter lists hold no parentheses
    return [p.strip() for p in params[: params.index(")")].split(",")]


@pytest.fixture
def launches(monkeypatch):
    calls = []
    monkeypatch.setattr(bind, "launch", lambda binary, entry, *rest: calls.append((binary, entry, *rest)))
    # Encoding a tensor map needs the CUDA driver; here it is enough to see which tensors and boxes are mapped.
    monkeypatch.setattr(tensormap, "tensor_map", lambda spec: SimpleNamespace(arg=ByValue(0), spec=spec))
    monkeypatch.setattr(bind, "sm_count", lambda device_index: SMS)
    return calls


SMS = 132


PATTERNS = [
    ag.causal(),
    ag.block_layout(torch.rand(2, 4, 4) < 0.5, 64) & ag.documents() & ag.key_padding(),
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # mma.sync and TMA + wgmma forward kernels
@pytest.mark.parametrize("pat", PATTERNS, ids=["causal", "layout_docs_padding"])
def test_arguments_match_kernel_signatures(pat, arch, launches):
    kern = ag.compile(pat, head_dim=64, dtype=torch.float16, arch=arch)
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 200, 150, 64
    q, k, v = torch.randn(B, Hq, Sq, D).half(), torch.randn(B, Hkv, Sk, D).half(), torch.randn(B, Hkv, Sk, D).half()
    rt = {"document_ids": None, "key_lengths": None}
    if pat.runtime_inputs:
        rt = {
            "document_ids": (torch.zeros(B, Sq, dtype=torch.int32), torch.zeros(B, Sk, dtype=torch.int32)),
            "key_lengths": torch.tensor([100, 150], dtype=torch.int32),
        }
    prep = prepare.prepare(pat, q, k, rt)
    # The list the custom op carries round-trips to the same run-time tensors.
    again = prepare.Prepared.from_tensors(kern.kernel_plan, prep.tensors())
    assert [t.data_ptr() for t in again.tensors()] == [t.data_ptr() for t in prep.tensors()]
    assert len(prep.tensors()) == len(pat.layouts()) + 3 * bool(pat.runtime_inputs)
    out, lse = bind.forward(kern.compiled, q, k, v, 0.125, again)
    bind.backward(kern.compiled, torch.randn_like(out), q, k, v, out, lse, None, 0.125, again)
    plan = kern.kernel_plan
    q_tiles = -(-Sq // plan.fwd.block_m)
    fwd_grid = (min(q_tiles * Hq * B, SMS), 1, 1) if plan.fwd.wgmma else (q_tiles, Hq, B)  # persistent on sm_90
    expect = {
        "attngen_fwd": (fwd_grid, 32 * plan.fwd.warps, plan.fwd.smem_bytes),
        "attngen_bwd_dkdv": ((-(-Sk // plan.dkdv.block_n), Hkv, B), 32 * plan.dkdv.warps, plan.dkdv.smem_bytes),
        "attngen_bwd_dq": ((-(-Sq // plan.dq.block_m), Hq, B), 32 * plan.dq.warps, plan.dq.smem_bytes),
    }
    assert [c[1] for c in launches] == ["attngen_fwd", "attngen_bwd_preprocess", "attngen_bwd_dkdv", "attngen_bwd_dq"]
    for _binary, entry, grid, threads, smem, args, _device in launches:
        code = kern.source if entry == "attngen_fwd" else kern.backward_source
        params = _signature(code, entry)
        assert len(args) == len(params), f"{entry}: {len(args)} arguments for {len(params)} parameters"
        for arg, param in zip(args, params):
            assert re.search(C_TYPES[type(arg)], param), f"{entry}: {type(arg).__name__} bound to `{param}`"
        if entry in expect:
            assert (grid, threads, smem) == expect[entry]


def test_dkdv_splits_rule():
    """How many blocks share a key tile's dK/dV list: none sums more than SPLIT_ROWS query rows, idle SMs are filled
    with shares of at least SPLIT_MIN_STEPS tiles, the partials stay within their budget, never more shares than
    steps; one block per key tile whenever the key tiles fill the GPU and the rows are few."""
    big, part = 1 << 40, 1 << 20
    assert bind.dkdv_splits(4 * 132, 4096, 64, 132, part, big) == 1  # the GPU is full, the rows few
    assert bind.dkdv_splits(4 * 132, 1 << 20, 64, 132, part, big) == 16  # accuracy: 2**20 rows in shares of 2**16
    assert bind.dkdv_splits(4 * 132, 1 << 20, 64, 132, part, 4 * part) == 4  # ... as far as the budget allows
    assert bind.dkdv_splits(4 * 132, 1 << 20, 64, 132, part, part // 2) == 1
    assert bind.dkdv_splits(1, 4 * 3001, 64, 132, part, big) == 11  # one block: 188 steps in shares of >= 16
    assert bind.dkdv_splits(40, 4 * 3001, 64, 132, part, big) == 4  # 4 shares fill 132 SMs
    assert bind.dkdv_splits(1, 512, 64, 132, part, big) == 1  # too little work to share
    assert bind.dkdv_splits(1, 1 << 22, 128, 132, part, big) == 132  # fill the SMs (64 shares are enough for accuracy)
    assert bind.dkdv_splits(1, 3 << 16, 1 << 16, 132, part, big) == 3  # never more shares than steps


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_split_dkdv_launch(arch, launches):
    """Long queries over few keys: the dK/dV grid is key tiles x shares, and the partials' pointer and count are
    bound where the kernel takes them."""
    pat = ag.causal(align="bottom_right")
    kern = ag.compile(pat, head_dim=64, dtype=torch.float16, arch=arch)
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 1, 3001, 77, 64
    q, k, v = torch.randn(B, Hq, Sq, D).half(), torch.randn(B, Hkv, Sk, D).half(), torch.randn(B, Hkv, Sk, D).half()
    prep = prepare.prepare(pat, q, k, {"document_ids": None, "key_lengths": None})
    out, lse = torch.randn_like(q), torch.randn(B, Hq, Sq)
    bind.backward(kern.compiled, torch.randn_like(out), q, k, v, out, lse, None, 0.125, prep)
    (_binary, _entry, grid, *_rest, args, _device) = next(c for c in launches if c[1] == "attngen_bwd_dkdv")
    t = kern.compiled.plan.dkdv
    splits = bind.dkdv_splits(-(-Sk // t.block_n) * Hkv * B, Hq // Hkv * Sq, t.block_m, SMS, 1, 1 << 40)
    assert splits > 1 and grid == (-(-Sk // t.block_n), Hkv * splits, B)
    params = _signature(kern.backward_source, "attngen_bwd_dkdv")
    at = params.index("int splits")
    assert params[at - 1] == "float* __restrict__ part" and args[at] == splits and args[at - 1] != 0


def test_split_partials_sum_to_dk_dv():
    """The host's sum of a split dK/dV's partials puts every block's slab where the kernels' formula says: block
    (kt, split · Hkv + hk, b) of grid (key tiles, Hkv · splits, B) writes slab (b · gridDim.y + blockIdx.y) ·
    gridDim.x + kt, rows kt · block_n + r; rows past Sk are dropped whatever they hold."""
    B, Hkv, Sk, D, block_n, splits = 2, 3, 200, 8, 64, 4
    key_tiles = -(-Sk // block_n)
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(2, B, Hkv, Sk, D, generator=gen, dtype=torch.float64)
    shares = torch.rand(splits, *want.shape, generator=gen, dtype=torch.float64)
    shares = shares / shares.sum(0) * want  # splits shares summing to want
    part = torch.full((B * splits * Hkv * key_tiles * 2 * block_n * D,), float("nan"), dtype=torch.float64)
    grid_y, grid_x = Hkv * splits, key_tiles
    for b, split, hk, kt in itertools.product(range(B), range(splits), range(Hkv), range(key_tiles)):
        slab = (b * grid_y + split * Hkv + hk) * grid_x + kt
        for which in range(2):
            rows = shares[split, which, b, hk, kt * block_n : (kt + 1) * block_n]
            at = (2 * slab + which) * block_n * D
            part[at : at + block_n * D] = 7.0  # rows past Sk: anything
            part[at : at + rows.numel()] = rows.flatten()
    got = bind.summed_partials(part.view(B, splits, Hkv, key_tiles, 2, block_n, D), Sk)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(InputError, match="CUDA"):
        ag.attention(q, q, q, ag.causal())
    with pytest.raises(InputError, match="4-d"):
        launch._check(q[0], q, q)
    with pytest.raises(InputError, match="dtype"):
        launch._check(q.float(), q.float(), q.float())
    with pytest.raises(InputError, match="one dtype"):
        launch._check(q, q.bfloat16(), q)
    with pytest.raises(InputError, match="multiple"):
        launch._check(torch.randn(1, 3, 8, 64).half(), q, q)
    with pytest.raises(InputError, match="last"):
        launch._check(q.transpose(-1, -2), q, q)

    def prep(pat, **inputs):
        return prepare.prepare(pat, q, q, {"document_ids": None, "key_lengths": None, **inputs})

    with pytest.raises(InputError, match="needs document_ids"):
        prep(ag.documents())
    with pytest.raises(InputError, match="does not use it"):
        prep(ag.causal(), key_lengths=torch.tensor([3]))
    with pytest.raises(InputError, match="key_lengths"):
        prep(ag.key_padding(), key_lengths=torch.tensor([3.0, 1.0]))
    with pytest.raises(InputError, match="does not use it"):
        prep(ag.causal(), bias=torch.zeros(3))  # an unknown call-time input is named, never ignored
    with pytest.raises(InputError, match="does not cover"):
        prep(ag.block_layout(torch.ones(1, 1, dtype=torch.bool), 4))  # 8 rows need 2 blocks of 4
    with pytest.raises(InputError, match="heads"):
        prep(ag.block_layout(torch.ones(3, 2, 2, dtype=torch.bool), 4))  # 3 layout heads for 2 query heads
    with pytest.raises(InputError, match="head_dim"):
        ag.compile(ag.causal(), head_dim=80, arch="sm_90")
    with pytest.raises(InputError, match="dtype"):
        ag.compile(ag.causal(), head_dim=64, dtype=torch.float32, arch="sm_90")


def test_misaligned_rows_are_copied_aligned_views_are_not():
    base = torch.randn(2, 16, 3, 72, dtype=torch.float16)
    view = base[..., :64].transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D']: strides multiple of 8
    assert bind.aligned(view) is view
    odd = torch.randn(2, 3, 16, 65, dtype=torch.float16)[..., 1:]  # rows start 2 bytes in
    fixed = bind.aligned(odd)
    assert fixed is not odd and torch.equal(fixed, odd) and fixed.data_ptr() % 16 == 0


def test_custom_op_fake_implementations():
    """What torch.compile sees: output shapes and dtypes from the fake (meta) implementations."""
    pat = ag.causal() & ag.sliding_window(64)
    q = torch.empty(2, 8, 100, 64, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(2, 2, 70, 64, dtype=torch.bfloat16, device="meta")
    name = pat.key
    out, lse = torch.ops.attngen.attention(q, k, v, name, "", 0.125, [])
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (2, 8, 100), torch.float32)
    dq, dk, dv, ds = torch.ops.attngen.attention_backward(out, lse, q, k, v, out, lse, name, "", 0.125, [], "")
    assert (dq.shape, dk.shape, dv.shape, ds.numel()) == (q.shape, k.shape, v.shape, 0)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    # with a bias that needs its gradient: dL/ds [B, Hq, Sq, Sk] in the bias's dtype (or fp32 for a T5 table)
    for kind, dtype in (("input", torch.bfloat16), ("float32", torch.float32)):
        *_, ds = torch.ops.attngen.attention_backward(out, lse, q, k, v, out, lse, name, "bias()", 0.125, [], kind)
        assert (ds.shape, ds.dtype) == ((2, 8, 100, 70), dtype)


def test_tensor_map_describes_strided_views():
    """[B, H, S, D] tensors map innermost first with byte strides; [B, S, H, D] storage needs no copy."""
    t = torch.empty(2, 3, 100, 64, dtype=torch.bfloat16)
    s = tensormap.spec(t, 128)
    assert (s.dims, s.strides, s.box, s.dtype) == (
        (64, 100, 3, 2),
        (128, 100 * 128, 3 * 100 * 128),
        (64, 128, 1, 1),
        t.dtype,
    )
    view = torch.empty(2, 100, 3, 64, dtype=torch.float16).transpose(1, 2)
    assert bind.aligned(view) is view
    assert tensormap.spec(view, 64).strides == (3 * 128, 128, 100 * 3 * 128)
    one = torch.empty(1, 1, 5, 64, dtype=torch.float16)  # extent-1 dimensions still get a valid stride
    assert all(st % 16 == 0 and st > 0 for st in tensormap.spec(one, 64).strides)
    broadcast = torch.empty(2, 1, 10, 64, dtype=torch.float16).expand(2, 4, 10, 64)
    assert bind.aligned(broadcast) is not broadcast  # a stride-0 head dimension is materialised


def test_key_groups_map_addresses_the_permuted_key_order():
    """The sparse P·V forward's 5-d key map: element (d, r, t, h, bh) is key 16 h + 4 t + r of head bh, and a box at
    r = 2 j copies, in order, the keys 16 h + 4 t + 2 j + e (h, then t, then e): what the kernel's fragments want."""
    t = torch.arange(2 * 3 * 48 * 64, dtype=torch.float16).view(2, 3, 48, 64)
    s = tensormap.key_groups_spec(t, 128)
    assert s.dims == (64, 4, 4, 3, 6) and s.box == (64, 2, 4, 8, 1)
    row = 64 * 2
    assert s.strides == (row, 4 * row, 16 * row, 48 * row)
    flat = t.view(-1, 64)
    for bh, h, tt, r in ((0, 0, 0, 0), (4, 2, 3, 3), (5, 1, 2, 1)):
        offset = r * s.strides[0] + tt * s.strides[1] + h * s.strides[2] + bh * s.strides[3]
        assert torch.equal(flat[offset // row], t[bh // 3, bh % 3, 16 * h + 4 * tt + r])
    with pytest.raises(Exception, match="multiple of 16"):
        tensormap.key_groups_spec(torch.empty(1, 1, 40, 64, dtype=torch.float16), 128)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The custom op with its kernels replaced by the reference (forward) and a recognisable stand-in (backward),
    so that the op's plumbing runs on the CPU. Records the run-time tensors each direction received."""
    from attngen import op, reference

    seen = {}

    def forward(kern, q, k, v, scale, prep):
        seen["forward"] = [t.data_ptr() for t in prep.tensors()]
        # The kernels read the grids and ids from `prep`; the reference needs the user's pattern, set by the test.
        return reference.attention(q, k, v, seen["pattern"], scale=scale, dtype=torch.float32, **seen["inputs"])

    def backward(kern, dout, q, k, v, out, lse, dlse, scale, prep, score_grad=None):
        seen["backward"] = [t.data_ptr() for t in prep.tensors()]
        return tuple(g * 2 for g in (q, k, v))  # what the kernels would return, here easy to recognise

    compiled = lambda name, q, mods="": ag.compile(seen["pattern"], head_dim=64, arch="sm_80").compiled
    monkeypatch.setattr(op, "_compiled_for", compiled)
    monkeypatch.setattr(op, "forward", forward)
    monkeypatch.setattr(op, "backward", backward)
    return seen


LAYOUT_DOCS = ag.block_layout(torch.tensor([[True, False], [True, True]]), 4) & ag.documents()


@pytest.mark.parametrize("form", ["custom_op", "eager"])
@pytest.mark.parametrize("uses", ["out", "lse", "both"])
def test_autograd_carries_the_tensor_list(cpu_kernels, form, uses):
    """Gradients reach q, k, v through both forms of the op (the custom op torch.compile traces, the autograd
    function eager calls take), also when only the LSE or only the output is used, and the backward gets the same
    run-time tensors the forward did."""
    from attngen import op

    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    cpu_kernels.update(pattern=LAYOUT_DOCS, inputs={"document_ids": ids})
    q, k, v = (torch.randn(1, 2, 8, 64, requires_grad=True) for _ in range(3))
    prep = prepare.prepare(LAYOUT_DOCS, q, k, {"document_ids": ids, "key_lengths": None})
    assert len(prep.tensors()) == 3  # the layout grid, query ids, key ids
    run = op.attention_op if form == "custom_op" else lambda *a: op._Attention.apply(*a[:6], *a[6])
    out, lse = run(q, k, v, LAYOUT_DOCS.key, "", 0.125, prep.tensors())
    loss = {"out": out.sum(), "lse": lse.sum(), "both": out.sum() + lse.sum()}[uses]
    grads = torch.autograd.grad(loss, (q, k, v))
    assert all(torch.equal(g, 2 * t) for g, t in zip(grads, (q, k, v)))
    assert cpu_kernels["forward"] == cpu_kernels["backward"] == [t.data_ptr() for t in prep.tensors()]


def test_attention_traces_as_one_graph(cpu_kernels):
    """Under torch.compile(fullgraph=True) the call-time half (checks, run-time tensors) traces without a break: no
    planning or compiling at trace time, the pattern enters the graph as its key and its grids as constants."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    cpu_kernels.update(pattern=LAYOUT_DOCS, inputs={"document_ids": ids})
    q, k, v = (torch.randn(1, 2, 8, 64) for _ in range(3))

    def fn(q, k, v, ids):
        inputs = {"document_ids": ids, "key_lengths": None}
        return launch._call(LAYOUT_DOCS, q, k, v, None, False, inputs, (), {"bias": None, "rel_table": None})

    eager = fn(q, k, v, ids)
    traced = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, ids)
    assert torch.allclose(traced, eager)


def test_an_eager_call_does_not_import_dynamo():
    """An eager call of a pattern without lsh, top-k or a graph break of its own never imports torch._dynamo (~0.7 s
    of a process's first call): run in a fresh interpreter, with the kernels replaced by the reference."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        import attngen as ag
        from attngen import launch, op, reference

        launch._check = lambda q, k, v: None  # CPU tensors
        op._compiled_for = lambda name, q, mods="": ag.compile(pat, head_dim=64, arch="sm_80").compiled
        op.forward = lambda kern, q, k, v, scale, prep: reference.attention(q, k, v, pat, scale=scale)
        pat = ag.causal() & ag.sliding_window(8) | ag.global_tokens(2)
        q, k, v = (torch.randn(1, 2, 16, 64, dtype=torch.float16) for _ in range(3))
        assert ag.attention(q, k, v, pat, score_mod=ag.softcap(5.0)).shape == q.shape
        print("torch._dynamo" in sys.modules, ag.lsh_buckets.__module__, "torch._dynamo" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "attngen.hashing", "True"]  # lsh_buckets loads when asked for
