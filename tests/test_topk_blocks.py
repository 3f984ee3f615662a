"""Block top-k (`topk_blocks`) without a GPU: the constructor and what it refuses, the &-context a leaf selects in,
the reference semantics against a direct per-block loop, the call-time selection pass (`blockselect`, on CPU
tensors) against the reference, its exact candidates where tile classes are not exact, the schedule's classes of a
selection grid, the plan (one structure for every k, tiles lined up with the blocks, the grid in the mask) and the
kernels compiled with NVRTC for both families without spills."""

import itertools
import math

import pytest
import torch

import attngen as ag
from attngen import blockselect, blocktopk, reference, schedule
from attngen import pattern as P
from attngen.affine import EMPTY, FULL, PARTIAL
from attngen.errors import InputError
from attngen.plan import make_plan
from attngen.prepare import Prepared
from attngen.select import split_selection


@pytest.mark.parametrize(
    "args,match",
    [((0,), "k must be an integer"), ((2, 32), "block must be one of"), ((True,), "k must"), ((2, True), "block")],
)
def test_constructor_refuses_bad_arguments(args, match):
    with pytest.raises(InputError, match=match):
        ag.topk_blocks(*args)


def test_refused_compositions():
    with pytest.raises(InputError, match="~ cannot apply"):
        ~(ag.causal() & ag.topk_blocks(2))
    bad = {
        "2 topk_blocks leaves": ag.topk_blocks(2) | ag.topk_blocks(3, block=128),
        "another selection rule": ag.causal() & ag.topk_blocks(2) & ag.nm(2, 4),
        "buckets, lsh or keep": ag.causal() & ag.buckets() & ag.topk_blocks(2),
    }
    for match, pat in bad.items():
        with pytest.raises(InputError, match=match):
            split_selection(pat)
        with pytest.raises(InputError, match=match):
            make_plan(pat, head_dim=64, dtype="fp16", arch="sm_90a")


def test_context_is_the_conjunction_of_and_siblings():
    t = ag.topk_blocks(4)
    cases = [
        (t, ag.full()),
        (ag.causal() & t, ag.causal()),
        (ag.causal() & (t | ag.sliding_window(8)), ag.causal()),
        (
            ag.documents() & (ag.key_padding() & t | ag.full()) & ag.causal(),
            ag.documents() & ag.causal() & ag.key_padding(),
        ),
    ]
    for pat, want in cases:
        got = P.context_of(pat, P.topk_leaf(pat))
        assert set(got.parts if isinstance(got, P.And) else (got,)) == set(
            want.parts if isinstance(want, P.And) else (want,)
        )


def test_one_structure_for_every_k():
    a, b = ag.causal() & ag.topk_blocks(3), ag.causal() & ag.topk_blocks(30)
    assert a.structure() == b.structure() and a.key == b.key
    assert a.structure() != (ag.causal() & ag.topk_blocks(3, block=128)).structure()
    assert repr(a) == "causal() & topk_blocks(3, block=64)"


def _direct_selection(q, k, allowed, kk, bs):
    """The semantics written out block by block with Python loops, in float64."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    nbq, nbk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    keep = torch.zeros(B, Hq, nbq, nbk, dtype=torch.bool)
    for b, h, a in itertools.product(range(B), range(Hq), range(nbq)):
        mq = q[b, h, a * bs : (a + 1) * bs].double().mean(0)
        scored = []
        for c in range(nbk):
            if allowed[
                min(b, allowed.shape[0] - 1), min(h, allowed.shape[1] - 1), a * bs : (a + 1) * bs, c * bs : (c + 1) * bs
            ].any():
                mk = k[b, h // (Hq // Hkv), c * bs : (c + 1) * bs].double().mean(0)
                scored.append((-(mq @ mk).item(), c))
        for _, c in sorted(scored)[:kk]:  # largest first, then the lower index
            keep[b, h, a, c] = True
    return keep


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (130, 130), (200, 77), (77, 200)])
def test_reference_matches_a_direct_loop(Sq, Sk):
    g = torch.Generator().manual_seed(Sq * 1000 + Sk)
    q, k = torch.randn(2, 4, Sq, 16, generator=g), torch.randn(2, 2, Sk, 16, generator=g)
    docs = (torch.rand(2, Sq, generator=g) < 0.02).cumsum(-1), (torch.rand(2, Sk, generator=g) < 0.02).cumsum(-1)
    pat = ag.documents() & (ag.topk_blocks(2, block=64) | ag.sliding_window(5))
    mask = P.dense_mask(pat, Sq, Sk, q=q, k=k, document_ids=docs)
    context = P.dense_mask(ag.documents(), Sq, Sk, document_ids=docs)
    grid = _direct_selection(q, k, context, 2, 64)
    want = context & (blocktopk.expand(grid, 64, Sq, Sk) | P.dense_mask(ag.sliding_window(5), Sq, Sk))
    assert torch.equal(mask, want)
    given = P.dense_mask(pat, Sq, Sk, q=q, k=k, document_ids=docs, selected_blocks=grid)
    assert torch.equal(given, want)


def test_dense_mask_needs_q_and_k_or_a_selection():
    with pytest.raises(InputError, match="needs q= and k="):
        (ag.causal() & ag.topk_blocks(2)).mask(100, 100)
    with pytest.raises(InputError, match="selected_blocks must be bool"):
        (ag.causal() & ag.topk_blocks(2)).mask(100, 100, selected_blocks=torch.ones(1, 1, 3, 3, dtype=torch.bool))


def _prepared(pat, Sq, Sk, runtime):
    from attngen.prepare import prepare

    q = torch.randn(2, 4, Sq, 16, dtype=torch.float16)
    k = torch.randn(2, 2, Sk, 16, dtype=torch.float16)
    inputs = {"document_ids": None, "key_lengths": None, **runtime}
    return q, k, prepare(pat, q, k, inputs)


CONTEXTS = {
    "causal": ag.causal(),
    "window": ag.sliding_window(50),
    "documents": ag.documents() & ag.causal(),
    "padding": ag.key_padding(),
    "layout": ag.block_layout(torch.rand(12, 12, generator=torch.Generator().manual_seed(1)) < 0.4, 48),
    "thin": ag.predicate("k >= q + 70") & ag.predicate("k <= 2*q - 60"),  # tile classes partial where nothing is
    "or": ag.predicate("(k < 10) | (q - k > 300)") & ~ag.local(2, 2),
}


@pytest.mark.parametrize("Sq,Sk", [(500, 500), (333, 517), (517, 64)])
@pytest.mark.parametrize("name", list(CONTEXTS))
def test_selection_pass_matches_the_reference(name, Sq, Sk):
    """blockselect.select (fp32, no S x S) against the float64 reference selection: the candidates exactly, the kept
    blocks exactly on these inputs (no near-ties: every differing row would be checked as one on the GPU)."""
    g = torch.Generator().manual_seed(len(name) * 7 + Sq)
    context = CONTEXTS[name]
    pat = context & ag.topk_blocks(3, block=64)
    runtime = {}
    if "document_ids" in pat.runtime_inputs:
        runtime["document_ids"] = (
            (torch.rand(2, Sq, generator=g) < 0.01).cumsum(-1),
            (torch.rand(2, Sk, generator=g) < 0.01).cumsum(-1),
        )
    if "key_lengths" in pat.runtime_inputs:
        runtime["key_lengths"] = torch.tensor([0, Sk // 3])
    q, k, prep = _prepared(pat, Sq, Sk, runtime)
    dense = P.dense_mask(context, Sq, Sk, **runtime)
    structure = pat.structure()
    got = blockselect.candidates(P.context_of(structure, P.topk_leaf(structure)), 64, Sq, Sk, "cpu", prep)
    want = blocktopk.candidates_of(dense, 64, Sq, Sk)
    assert torch.equal(got.expand(want.expand(2, 4, -1, -1).shape), want.expand(2, 4, -1, -1))
    ref = blocktopk.choose(blocktopk.block_scores(q, k, 64, torch.float64), want, 3)
    assert torch.equal(prep.blocks.bool(), ref)


def test_kleene_classes_alone_would_admit_empty_blocks():
    """The `thin` context: its tile classes call some blocks partial that allow no pair; the pass drops them."""
    context = CONTEXTS["thin"]
    cls = schedule.classes(context, 64, 64, 640, 640, "cpu")
    exact = blocktopk.candidates_of(P.dense_mask(context, 640, 640), 64, 640, 640)
    assert ((cls == PARTIAL) & ~exact).any()  # the case the pair-by-pair check exists for
    assert torch.equal(blockselect.candidates(context, 64, 640, 640, "cpu", None), exact)


@pytest.mark.parametrize("bm,bn", [(64, 64), (128, 128), (64, 128), (128, 64), (96, 48), (16, 32)])
def test_schedule_classes_of_a_selection_grid(bm, bn):
    """Tiles of a selection grid: full where every block they touch is kept, empty where none is, by brute force."""
    g = torch.Generator().manual_seed(bm + bn)
    Sq, Sk, bs = 700, 555, 64
    grid = (torch.rand(2, 3, math.ceil(Sq / bs), math.ceil(Sk / bs), generator=g) < 0.3).to(torch.uint8)
    got = schedule.tile_classes(P.SelectedBlocks(bs), bm, bn, Sq, Sk, "cpu", Prepared(blocks=grid))
    dense = blocktopk.expand(grid.bool(), bs, Sq, Sk)
    for t, u in itertools.product(range(math.ceil(Sq / bm)), range(math.ceil(Sk / bn))):
        cell = dense[..., t * bm : (t + 1) * bm, u * bn : (u + 1) * bn].flatten(-2)
        want = torch.where(cell.all(-1), FULL, torch.where(cell.any(-1), PARTIAL, EMPTY))
        assert torch.equal(got[..., t, u], want.to(torch.int8)), (t, u)


def test_plan_reads_the_grid_and_lines_tiles_up_with_blocks():
    p = make_plan(
        ag.causal() & (ag.topk_blocks(16, block=64) | ag.sliding_window(512)), head_dim=128, dtype="bf16", arch="sm_90a"
    )
    assert "blocks[b * blocks_sb + h * blocks_sh + (q / 64) * blocks_nk + k / 64] != 0" in p.mask_c
    assert [a.name for a in p.runtime_args] == ["blocks", "blocks_sb", "blocks_sh", "blocks_nk"]
    assert p.fwd.block_m == 64 and p.fwd.block_n == 64 and p.dkdv.block_n == 64 and p.dq.block_m == 64
    p = make_plan(ag.causal() & ag.topk_blocks(8, block=128), head_dim=128, dtype="fp16", arch="sm_90a")
    assert (p.fwd.block_m, p.fwd.block_n) == (128, 128)
    assert "block top-k selection" in str(ag.compile(ag.causal() & ag.topk_blocks(8), head_dim=64, arch="sm_90").plan)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_without_spills(arch, head_dim):
    for pat in (
        ag.causal() & (ag.topk_blocks(16) | ag.sliding_window(512)),
        ag.causal() & ag.topk_blocks(8, block=128),
    ):
        kern = ag.compile(pat, head_dim=head_dim, dtype="fp16", arch=arch)
        assert "blocks[b * blocks_sb" in kern.source and "blocks[b * blocks_sb" in kern.backward_source
        binaries = {"attngen_fwd": kern.forward_binary}
        binaries |= {e: kern.backward_binary for e in ("attngen_bwd_dkdv", "attngen_bwd_dq")}
        for entry, binary in binaries.items():
            res = binary.resources_of(entry)
            assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{pat} {entry}: {res}"


def test_choose_breaks_ties_by_the_lower_index():
    """Against a stable descending sort, on scores with many exact ties and rows with fewer candidates than k."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (3, 5, 7, 40), generator=g).double()
    cand = torch.rand(3, 5, 7, 40, generator=g) < 0.6
    cand[0, 0, 0] = False  # a row with no candidate
    for k in (1, 2, 5, 23, 40, 100):
        ranked = scores.masked_fill(~cand, -math.inf).sort(dim=-1, descending=True, stable=True).indices[..., :k]
        want = torch.zeros_like(cand).scatter_(-1, ranked, True) & cand
        assert torch.equal(blocktopk.choose(scores, cand, k), want), k
    assert torch.equal(
        blocktopk.choose(torch.tensor([[3.0, 1, 3, 3, 0]]), torch.ones(1, 5, dtype=torch.bool), 2),
        torch.tensor([[True, False, True, False, False]]),
    )


def _qkv(B, Hq, Hkv, Sq, Sk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, 32, generator=g).half().requires_grad_()
    k, v = (torch.randn(B, Hkv, Sk, 32, generator=g).half().requires_grad_() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("Sq,Sk", [(200, 200), (130, 300)])
def test_calls_match_the_reference(Sq, Sk, reference_kernels):
    """`attention` end to end on the CPU with the kernels replaced by the reference: the selection made in `prepare`
    is the float64 one on these inputs, and output and gradients are the reference's (the choice held fixed)."""
    pat = ag.causal() & (ag.topk_blocks(2, block=64) | ag.sliding_window(20))
    q, k, v = _qkv(2, 4, 2, Sq, Sk, Sq + Sk)
    out, lse = ag.attention(q, k, v, pat, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.allclose(out.float(), ref, atol=2e-3, rtol=2e-3)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half()
    for g, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.float())):
        assert torch.allclose(g.float(), w.float(), atol=5e-3, rtol=5e-3)
    assert all(c.prep.blocks is not None for c in reference_kernels.calls)


def test_calls_under_torch_compile(reference_kernels):
    """The selection pass runs inside a compiled function (its candidates' count on the host is a graph break:
    fullgraph=True refuses it), with the eager call's answer."""
    pat = ag.causal() & ag.topk_blocks(2, block=64)
    q, k, v = _qkv(1, 2, 2, 150, 150, 7)

    def fn(q, k, v):
        return ag.attention(q, k, v, pat)

    traced = torch.compile(fn, backend="eager")(q, k, v)
    assert torch.equal(traced, fn(q, k, v))

    def whole(q, k, v):  # a function of its own: the one above has its graph-broken code cached
        return ag.attention(q, k, v, pat)

    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(whole, backend="eager", fullgraph=True)(q, k, v)


@pytest.mark.parametrize("Sq,Sk,batch", [(5, 0, 1), (0, 5, 1), (3, 3, 0)])
def test_empty_sequences_and_batches(Sq, Sk, batch, reference_kernels):
    """No query, key or batch: nothing to choose, an empty grid, and the call's usual empty answer."""
    for pat, rt in [
        (ag.causal() & ag.topk_blocks(2), {}),
        (ag.causal() & ag.key_indices(), {"key_indices": torch.zeros(batch, 1, Sq, 3, dtype=torch.int32)}),
    ]:
        q = torch.randn(batch, 2, Sq, 32).half().requires_grad_()
        k, v = (torch.randn(batch, 1, Sk, 32).half().requires_grad_() for _ in range(2))
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        assert out.shape == q.shape and lse.shape == (batch, 2, Sq)
        if Sk == 0:  # every row empty: 0 and LSE -inf
            assert (out == 0).all() and torch.isneginf(lse).all()
        grads = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
        assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))
