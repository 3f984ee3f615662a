"""GPU: every static pattern's forward and backward kernels against reference.py on fresh random inputs.

Outputs are poisoned (ATTNGEN_POISON_OUTPUTS=1: every output and gradient is filled with NaN before the kernels
run), so an element a kernel forgets to write fails the comparison. Skipped cleanly without a CUDA GPU."""

import math
import zlib

import pytest
import torch

import attngen as ag
from attngen import reference

# Every GPU test module's marks: needs a CUDA GPU (skipped cleanly without one), outputs poisoned (conftest.py).
GPU_TESTS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("poison_outputs"),
]
pytestmark = GPU_TESTS


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# ||out - ref|| / ||ref||: fp16 keeps 11 significant bits, bf16 8; P is rounded to the input dtype before P V.
FWD_TOL = {"fp16": 2e-3, "bf16": 1.2e-2}
BWD_TOL = {"fp16": 5e-3, "bf16": 2.5e-2}
LENGTHS = [(1, 1), (17, 17), (127, 127), (128, 128), (1000, 1000), (4097, 4097)]
UNEVEN = [(17, 1000), (1000, 17), (128, 4097), (1, 1000), (4097, 127)]
MAX_LEN = 4097


def _layout(block: int, heads: int | None, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(MAX_LEN / block)
    shape = (heads, nb, nb) if heads else (nb, nb)
    return torch.rand(shape, generator=g) < density


PATTERNS = {
    "full": ag.full(),
    "causal": ag.causal(),
    "causal_bottom_right": ag.causal(align="bottom_right"),
    "sliding_window": ag.sliding_window(100),
    "local": ag.local(64, 32),
    "prefix_lm": ag.prefix_lm(50),
    "window_or_global": ag.causal() & ag.sliding_window(1024) | ag.global_tokens(16),
    "not_causal": ~ag.causal(),  # the last query row has no key: output 0, LSE -inf
    "predicate": ag.predicate("2*k <= q + 5 or k >= Sk - 3"),
    "layout_per_head": ag.block_layout(_layout(64, 8, 0.3, 0), 64),
    "layout_and_causal": ag.block_layout(_layout(128, None, 0.4, 1), 128) & ag.causal(),
    "documents_causal": ag.documents() & ag.causal(),
    "key_padding": ag.key_padding(),
}


def _runtime(pat: ag.Pattern, B: int, Sq: int, Sk: int, gen: torch.Generator) -> dict:
    rt = {}
    if "document_ids" in pat.runtime_inputs:
        # Sorted random segments; with Sq != Sk the query ids run over the same documents.
        def ids(n):
            cuts = torch.rand(B, n, generator=gen) < 4.0 / max(n, 1)
            return cuts.cumsum(-1).to(torch.int32).cuda()

        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    if "key_lengths" in pat.runtime_inputs:
        lens = torch.randint(0, Sk + 1, (B,), generator=gen)
        lens[0] = 0  # a batch with no keys at all: every row empty
        rt["key_lengths"] = lens.to(torch.int32).cuda()
    return rt


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, gen, requires_grad=False):
    mk = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype).requires_grad_(requires_grad)
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _gen(*key) -> torch.Generator:
    """A CPU generator seeded from `key` (any repr-able values): each case draws its own inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _check_forward(out, lse, ref, ref_lse, dtype: str, where: str) -> None:
    """Rows the reference leaves empty are 0 with LSE -inf exactly there; LSE and output elsewhere within
    tolerance."""
    assert torch.isfinite(out).all(), f"non-finite output: {where}"
    empty = torch.isinf(ref_lse)
    assert (out[empty] == 0).all(), f"rows with no kept key must be 0: {where}"
    assert torch.equal(torch.isinf(lse), empty), f"LSE -inf exactly on empty rows: {where}"
    assert torch.allclose(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-4), f"LSE: {where}"
    if not empty.all():
        assert _rel(out, ref) < FWD_TOL[dtype], f"output error {_rel(out, ref):.2e}: {where}"


def _check_call(q, k, v, got, want, dtype: str, where: str) -> None:
    """A call's (out, lse) `got` against the reference's `want`, both differentiable in q, k, v: the forward
    (`_check_forward`), then the gradients for one random dout."""
    (out, lse), (ref, ref_lse) = got, want
    _check_forward(out, lse, ref, ref_lse, dtype, where)
    dout = torch.randn_like(out)
    _check_grads(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout), dtype, where)


def _mma_sync_kernels(pat: ag.Pattern, D: int, dtype: str, arch: str = "sm_90"):
    """`kernel.Compiled` of `pat`'s plan with the mma.sync tilings, compiled for `arch`: on sm_90, the kernels GPUs
    other than Hopper run, verified on a Hopper GPU."""
    from dataclasses import replace

    from attngen import kernel, plan, tiling

    p = plan.make_plan(pat, head_dim=D, dtype=dtype, arch=arch)
    kern = kernel.Compiled(replace(p, fwd=tiling.forward_tiles(D), dkdv=tiling.dkdv_tiles(D), dq=tiling.dq_tiles(D)))
    assert not kern.forward_binary.arch.endswith("a") and "mma.sync" in kern.backward_source.code
    return kern


def _reference(q, k, v, pat, rt):
    # float64 where it fits easily, float32 for the longest sequences
    dtype = torch.float64 if q.shape[2] * k.shape[2] <= 1 << 21 else torch.float32
    return reference.attention(q, k, v, pat, dtype=dtype, **rt)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward(name, dtype, D):
    pat, gen = PATTERNS[name], torch.Generator().manual_seed(zlib.crc32(f"{name}{dtype}{D}".encode()))
    B, Hq, Hkv = 2, 8, 2
    for Sq, Sk in LENGTHS + UNEVEN:
        q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen)
        rt = _runtime(pat, B, Sq, Sk, gen)
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        ref, ref_lse = _reference(q, k, v, pat, rt)
        where = f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}"
        assert torch.isfinite(out).all(), f"non-finite output: {where}"
        empty = torch.isinf(ref_lse)
        assert (out[empty] == 0).all(), f"rows with no allowed key must be 0: {where}"
        assert torch.equal(torch.isinf(lse), empty), f"LSE -inf exactly on empty rows: {where}"
        assert torch.allclose(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-4), f"LSE: {where}"
        if not empty.all():
            assert _rel(out, ref) < FWD_TOL[dtype], f"output error {_rel(out, ref):.2e}: {where}"


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 1), (8, 2)])
def test_forward_head_layouts_and_strides(Hq, Hkv):
    """MHA / MQA / GQA on non-contiguous views ([B, S, H, D] storage viewed as [B, H, S, D])."""
    gen = torch.Generator().manual_seed(Hq * 10 + Hkv)
    B, Sq, Sk, D = 2, 300, 517, 64
    q = torch.randn(B, Sq, Hq, D, generator=gen).cuda().half().transpose(1, 2)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).cuda().half().transpose(1, 2)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).cuda().half().transpose(1, 2)
    pat = ag.causal(align="bottom_right")
    out = ag.attention(q, k, v, pat, scale=0.3)
    ref, _ = reference.attention(q, k, v, pat, scale=0.3)
    assert _rel(out, ref) < FWD_TOL["fp16"]


def _grads(out_fn, q, k, v, dout):
    out = out_fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)


def _check_grads(got, ref, dtype: str, where: str) -> None:
    for label, g, r in zip("qkv", got, ref):
        assert torch.isfinite(g).all(), f"d{label} not finite: {where}"
        if r.abs().max() == 0:  # e.g. one key per row: dS = P (dP - delta) is 0 up to rounding
            assert g.abs().max() < 1e-4, f"d{label} must vanish: {where}"
        else:
            assert _rel(g, r) < BWD_TOL[dtype], f"d{label} error {_rel(g, r):.2e}: {where}"


BWD_LENGTHS = [(1, 1), (17, 17), (128, 128), (127, 1000), (1000, 127), (1000, 1000), (2049, 2049)]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_backward(name, dtype, D):
    pat, gen = PATTERNS[name], torch.Generator().manual_seed(zlib.crc32(f"bwd{name}{dtype}{D}".encode()))
    B, Hq, Hkv = 2, 8, 2
    for Sq, Sk in BWD_LENGTHS:
        q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        rt = _runtime(pat, B, Sq, Sk, gen)
        dout = torch.randn(B, Hq, Sq, D, generator=gen).to("cuda", q.dtype)
        got = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
        ref = _grads(lambda q, k, v: reference.attention(q, k, v, pat, dtype=torch.float32, **rt)[0], q, k, v, dout)
        _check_grads(got, ref, dtype, f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}")


def test_backward_deterministic():
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 64, torch.bfloat16, gen, requires_grad=True)
    dout = torch.randn(2, 8, 1000, 64, generator=gen).to("cuda", torch.bfloat16)
    pat = ag.causal() & ag.sliding_window(300)
    first = _grads(lambda q, k, v: ag.attention(q, k, v, pat), q, k, v, dout)
    second = _grads(lambda q, k, v: ag.attention(q, k, v, pat), q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_lse_gradient():
    """The LSE output is differentiable too: its gradient folds into the row statistics."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(1, 4, 4, 200, 300, 64, torch.float16, gen, requires_grad=True)
    pat = ag.causal(align="bottom_right")
    w = torch.randn(1, 4, 200, generator=gen).cuda()

    def loss(fn):
        out, lse = fn()
        return out.float().square().sum() + (lse.float() * w).sum()

    got = torch.autograd.grad(loss(lambda: ag.attention(q, k, v, pat, return_lse=True)), (q, k, v))
    ref = torch.autograd.grad(loss(lambda: reference.attention(q, k, v, pat, dtype=torch.float32)), (q, k, v))
    for g, r in zip(got, ref):
        assert _rel(g, r) < BWD_TOL["fp16"]


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(11)
    pat = ag.causal() & ag.sliding_window(256)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, q, k, v):
            return self.proj(ag.attention(q, k, v, pat).float())

    model = Block().cuda()
    compiled = torch.compile(model, fullgraph=True)
    q, k, v = _inputs(2, 4, 2, 333, 333, 64, torch.bfloat16, gen, requires_grad=True)
    eager_out = model(q, k, v)
    eager = torch.autograd.grad(eager_out.sum(), (q, k, v))
    comp_out = compiled(q, k, v)
    comp = torch.autograd.grad(comp_out.sum(), (q, k, v))
    assert torch.allclose(eager_out, comp_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, comp))


def test_checkpointing():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(1, 4, 4, 257, 257, 64, torch.float16, gen, requires_grad=True)
    pat = ag.causal()
    fn = lambda q, k, v: ag.attention(q, k, v, pat)
    ck = torch.utils.checkpoint.checkpoint(fn, q, k, v, use_reentrant=False)
    plain = fn(q, k, v)
    d = torch.randn_like(plain)
    assert torch.equal(ck, plain)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(ck, (q, k, v), d), torch.autograd.grad(plain, (q, k, v), d))
    )


SOME_PATTERNS = ["causal", "window_or_global", "layout_per_head", "documents_causal", "key_padding"]
SOME_LENGTHS = [(1, 1), (127, 1000), (1000, 127), (777, 777)]


@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_other_head_dims(dtype, D):
    """Head dims beyond 64 and 128: forward and backward (on sm_90, 256 is TMA + wgmma forward, mma.sync backward)."""
    gen = torch.Generator().manual_seed(D)
    B, Hq, Hkv = 1, 8, 2  # the per-head layout has 8 heads
    for name in SOME_PATTERNS:
        pat = PATTERNS[name]
        for Sq, Sk in SOME_LENGTHS:
            q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
            rt = _runtime(pat, B, Sq, Sk, gen)
            dout = torch.randn(B, Hq, Sq, D, generator=gen).to("cuda", q.dtype)
            where = f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}"
            out = ag.attention(q, k, v, pat, **rt)
            ref = reference.attention(q, k, v, pat, dtype=torch.float32, **rt)[0]
            assert torch.isfinite(out).all() and _rel(out, ref) < FWD_TOL[dtype], f"output: {where}"
            got = torch.autograd.grad(out, (q, k, v), dout)
            _check_grads(got, torch.autograd.grad(ref, (q, k, v), dout), dtype, where)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU"
)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mma_sync_family_on_hopper(dtype, D):
    """The mma.sync kernels (what GPUs other than Hopper run) stay verified on a Hopper GPU: the same plan with the
    mma.sync tilings, compiled for sm_90 and launched directly."""
    from attngen import bind, prepare

    gen = torch.Generator().manual_seed(D + len(dtype))
    B, Hq, Hkv = 2, 8, 2  # the per-head layout has 8 heads
    for name in SOME_PATTERNS:
        pat = PATTERNS[name]
        kern = _mma_sync_kernels(pat, D, dtype)
        for Sq, Sk in SOME_LENGTHS:
            q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
            rt = _runtime(pat, B, Sq, Sk, gen)
            prep = prepare.prepare(pat, q, k, {"document_ids": None, "key_lengths": None, **rt})
            dout = torch.randn(B, Hq, Sq, D, generator=gen).to("cuda", q.dtype)
            where = f"mma.sync {name} {dtype} D={D} Sq={Sq} Sk={Sk}"
            scale = D**-0.5
            out, lse = bind.forward(kern, q.detach(), k.detach(), v.detach(), scale, prep)
            ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float32, **rt)
            empty = torch.isinf(ref_lse)
            assert torch.isfinite(out).all() and (out[empty] == 0).all(), f"output: {where}"
            assert torch.equal(torch.isinf(lse), empty), f"LSE -inf exactly on empty rows: {where}"
            assert _rel(out, ref) < FWD_TOL[dtype], f"output error {_rel(out, ref):.2e}: {where}"
            got = bind.backward(kern, dout, q.detach(), k.detach(), v.detach(), out, lse, None, scale, prep)
            _check_grads(got, torch.autograd.grad(ref, (q, k, v), dout), dtype, where)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_per_batch_layouts(dtype, D):
    """A block layout with a grid per batch element ([B, H or 1, nbq, nbk]), alone and under | with a window, in
    both kernel families: out, LSE and gradients against the reference, partial tiles and GQA included."""
    from attngen import bind, prepare

    gen = _gen("per-batch layouts", dtype, D)
    B, Hq, Hkv = 3, 4, 2
    for shape, Sq, Sk in (((B, Hq, 12, 10), 700, 600), ((B, 1, 5, 5), 300, 300)):
        grid = torch.rand(shape, generator=gen) < 0.4
        for pat in (ag.block_layout(grid, 64), ag.block_layout(grid, 64) | ag.sliding_window(100)):
            q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
            where = f"{pat!r} {dtype} D={D} Sq={Sq} Sk={Sk}"
            got = ag.attention(q, k, v, pat, return_lse=True)
            _check_call(q, k, v, got, _reference(q, k, v, pat, {}), dtype, where)
            kern = _mma_sync_kernels(pat, D, dtype)  # the other family, launched directly
            prep = prepare.prepare(pat, q, k, {"document_ids": None, "key_lengths": None})
            out, lse = bind.forward(kern, q.detach(), k.detach(), v.detach(), D**-0.5, prep)
            ref, ref_lse = _reference(q, k, v, pat, {})
            _check_forward(out, lse, ref, ref_lse, dtype, f"mma.sync {where}")
            dout = torch.randn_like(out)
            grads = bind.backward(kern, dout, q.detach(), k.detach(), v.detach(), out, lse, None, D**-0.5, prep)
            _check_grads(grads, torch.autograd.grad(ref, (q, k, v), dout), dtype, f"mma.sync {where}")


# in_document(): positions within packed documents (tests/test_in_document.py has the CPU side)
IN_DOCUMENT = (
    ag.in_document(ag.prefix_lm(48)),
    ag.in_document(ag.global_tokens(4)) & ag.causal(),
    ag.in_document(ag.predicate("q // 64 == k // 64") & ag.causal()) | ag.sliding_window(20),
)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_in_document(dtype, D):
    """Patterns on positions within packed documents (one id tensor per batch element; documents that start in the
    middle of a tile), in both kernel families: out, LSE and gradients against the reference, GQA included."""
    from attngen import bind, prepare

    gen = _gen("in_document", dtype, D)
    B, Hq, Hkv = 2, 4, 2
    for S in (300, 777):
        ids = (torch.rand(B, S, generator=gen) < 0.01).cumsum(-1).cuda()
        rt = {"document_ids": ids}
        for pat in IN_DOCUMENT:
            q, k, v = _inputs(B, Hq, Hkv, S, S, D, DTYPES[dtype], gen, requires_grad=True)
            where = f"{pat!r} {dtype} D={D} S={S}"
            got = ag.attention(q, k, v, pat, return_lse=True, **rt)
            _check_call(q, k, v, got, _reference(q, k, v, pat, rt), dtype, where)
            kern = _mma_sync_kernels(pat, D, dtype)  # the other family, launched directly
            prep = prepare.prepare(pat, q, k, {"document_ids": ids, "key_lengths": None})
            out, lse = bind.forward(kern, q.detach(), k.detach(), v.detach(), D**-0.5, prep)
            ref, ref_lse = _reference(q, k, v, pat, rt)
            _check_forward(out, lse, ref, ref_lse, dtype, f"mma.sync {where}")
            dout = torch.randn_like(out)
            grads = bind.backward(kern, dout, q.detach(), k.detach(), v.detach(), out, lse, None, D**-0.5, prep)
            _check_grads(grads, torch.autograd.grad(ref, (q, k, v), dout), dtype, f"mma.sync {where}")


def test_layouts_are_run_time_data():
    """Patterns that differ only in their layout grids share one compiled kernel, and each call runs with its own
    grid (a layout built per training step compiles once and is never confused with the previous one)."""
    from attngen.kernel import compiled

    gen = torch.Generator().manual_seed(13)
    B, H, S, D = 1, 4, 1000, 64
    before = compiled.cache_info().misses
    for density in (0.2, 0.5, 0.8):
        pat = ag.block_layout(torch.rand(H, 16, 16, generator=gen) < density, 64) & ag.causal()
        q, k, v = _inputs(B, H, H, S, S, D, torch.float16, gen, requires_grad=True)
        out = ag.attention(q, k, v, pat)
        ref = reference.attention(q, k, v, pat, dtype=torch.float32)[0]
        assert _rel(out, ref) < FWD_TOL["fp16"], f"density {density}"
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        _check_grads(got, torch.autograd.grad(ref, (q, k, v), dout), "fp16", f"layout density {density}")
    assert compiled.cache_info().misses - before <= 1


@pytest.mark.parametrize("family", ["default", "mma.sync"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_split_dkdv(dtype, family, monkeypatch):
    """Long query ranges over few key tiles: the blocks of a key tile share its dK/dV list (bind.dkdv_splits) and
    their fp32 partials are summed in order. The split call matches the reference, repeats bit for bit, and agrees
    with the same call forced to one block per key tile; shares left empty (a window that lists fewer tiles than
    there are shares) write zeros."""
    from attngen import bind, prepare

    grids = []

    def spy(binary, entry, grid, *rest):
        if entry == "attngen_bwd_dkdv":
            grids.append(grid)
        return launch(binary, entry, grid, *rest)

    launch = bind.launch
    monkeypatch.setattr(bind, "launch", spy)
    gen = torch.Generator().manual_seed(len(dtype) + len(family))
    D, B, Hq, Hkv = 64, 1, 4, 1
    window = ag.sliding_window(48, align="bottom_right")
    cases = (
        (ag.predicate("k < 8") | window, (3001, 77)),  # sinks: every query tile lists the key tile
        (window, (3001, 77)),  # only the last query tiles list it: more shares than listed tiles, some empty
        (ag.full(), (4100, 300)),
    )
    for pat, (Sq, Sk) in cases:
        q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        ref = _reference(q, k, v, pat, {})[0]
        dout = torch.randn(B, Hq, Sq, D, generator=gen).to("cuda", q.dtype)
        want = torch.autograd.grad(ref, (q, k, v), dout)
        where = f"{family} {pat} {dtype} Sq={Sq} Sk={Sk}"
        if family == "default":

            def grads():
                return torch.autograd.grad(ag.attention(q, k, v, pat), (q, k, v), dout)
        else:
            kern, prep = _mma_sync_kernels(pat, D, dtype), prepare.prepare(pat, q, k, {})
            out, lse = bind.forward(kern, q.detach(), k.detach(), v.detach(), D**-0.5, prep)

            def grads():
                return bind.backward(kern, dout, q.detach(), k.detach(), v.detach(), out, lse, None, D**-0.5, prep)

        grids.clear()
        first, second = grads(), grads()
        assert all(g == grids[0] for g in grids) and grids[0][1] > Hkv, f"no split: {where}"
        _check_grads(first, want, dtype, where)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"split dK/dV not deterministic: {where}"
        monkeypatch.setattr(bind, "dkdv_splits", lambda *args: 1)
        whole = grads()
        monkeypatch.undo()
        monkeypatch.setattr(bind, "launch", spy)
        for a, b in zip(first, whole):
            assert _rel(a, b) < BWD_TOL[dtype] / 4, f"split and whole lists disagree: {where}"
