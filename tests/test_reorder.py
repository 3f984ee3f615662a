"""Buckets, LSH and keep masks on the CPU: their dense semantics, the sorted tokens a call runs on (`reorder.route`),
the per-query key ranges and the schedules built from them (checked element by element against the mask of the
sorted tokens), the plans and kernels (compiled with NVRTC, no spills), and whole calls end to end with the kernels
replaced by the reference (`reference_kernels`): forward and gradients against the reference on original positions."""

import itertools

import pytest
import torch

import attngen as ag
from attngen import op, prepare, reference, reorder, schedule
from attngen import pattern as P
from attngen.affine import EMPTY, FULL, PARTIAL
from attngen.plan import make_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, HQ, HKV = 2, 4, 2

# name -> (pattern, whether every row keeps one range of sorted keys)
PATTERNS = {
    "causal&buckets": (ag.causal() & ag.buckets(), True),
    "strict&lsh": (ag.predicate("k < q") & ag.lsh(4, seed=5), True),
    "causal&keep": (ag.causal() & ag.keep(), True),
    "bottom_right&buckets&keep": (ag.causal(align="bottom_right") & ag.buckets() & ag.keep(), True),
    "window&buckets": (ag.sliding_window(7) & ag.buckets(), True),
    "local&padding&buckets": (ag.local(3, 2) & ag.key_padding() & ag.buckets(), True),
    "diagonal&buckets": (ag.predicate("2*k == q + 1") & ag.buckets(), True),
    "keep alone": (ag.keep(), True),
    "documents&causal&buckets": (ag.documents() & ag.causal() & ag.buckets(), False),
    "causal&(buckets|globals)": (ag.causal() & (ag.buckets() | ag.global_tokens(2)), False),
    "causal&~buckets": (ag.causal() & ~ag.buckets(), False),
    "prefix&keep": (ag.prefix_lm(3) & ag.keep(), False),
    "layout&buckets": (
        ag.block_layout(torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) < 0.5, 16) & ag.buckets(),
        False,
    ),
}
LENGTHS = [(1, 1), (9, 9), (37, 37), (50, 23), (23, 50)]


def _inputs(pat, Sq, Sk, gen, n_buckets=3):
    rt = {}
    need = pat.runtime_inputs
    if "query_buckets" in need:
        rt["query_buckets"] = torch.randint(0, n_buckets, (B, HQ, Sq), generator=gen)
        rt["key_buckets"] = torch.randint(0, n_buckets, (B, HKV, Sk), generator=gen).to(torch.int32)
    if "query_keep" in need:
        rt["query_keep"] = torch.rand(B, HQ, Sq, generator=gen) < 0.7
        rt["key_keep"] = torch.rand(B, HKV, Sk, generator=gen) < 0.7
    if "document_ids" in need:
        ids = lambda n: (torch.rand(B, n, generator=gen) < 0.2).cumsum(-1)
        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    if "key_lengths" in need:
        rt["key_lengths"] = torch.randint(0, Sk + 1, (B,), generator=gen)
    return rt


def _qkv(Sq, Sk, gen, D=64):
    return (torch.randn(B, h, s, D, generator=gen).half() for h, s in ((HQ, Sq), (HKV, Sk), (HKV, Sk)))


def _prepared(pat, q, k, rt):
    return prepare.prepare(pat, q, k, {"document_ids": None, "key_lengths": None, **rt})


# ------------------------------------------------------------------------------------------- semantics


def test_dense_masks_compare_per_head_values():
    gen = torch.Generator().manual_seed(0)
    qb, kb = torch.randint(0, 3, (B, HQ, 11), generator=gen), torch.randint(0, 3, (B, HKV, 13), generator=gen)
    m = ag.buckets().mask(11, 13, query_buckets=qb, key_buckets=kb)
    assert m.shape == (B, HQ, 11, 13)
    for b, h, i, j in itertools.product(range(B), range(HQ), range(11), range(13)):
        assert bool(m[b, h, i, j]) == (qb[b, h, i] == kb[b, h // 2, j])
    qk, kk = torch.rand(B, HQ, 11, generator=gen) < 0.5, torch.rand(B, HKV, 13, generator=gen) < 0.5
    m = (ag.causal() & ag.keep()).mask(11, 13, query_keep=qk, key_keep=kk)
    want = qk[..., :, None] & kk.repeat_interleave(2, 1)[..., None, :] & torch.ones(11, 13, dtype=torch.bool).tril()
    assert torch.equal(m, want)


def test_lsh_buckets_are_argmax_of_signed_projections():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, HQ, 20, 16, generator=gen), torch.randn(B, HKV, 30, 16, generator=gen)
    qb, kb = ag.lsh_buckets(q, k, 8, seed=3)
    assert qb.dtype == kb.dtype == torch.int32 and qb.shape == (B, HQ, 20) and kb.shape == (B, HKV, 30)
    r = torch.randn(HKV, 16, 4, generator=torch.Generator().manual_seed(3))
    for h in range(HQ):  # queries use their KV head's directions
        proj = q[:, h] @ r[h // 2]
        assert torch.equal(qb[:, h].long(), torch.cat([proj, -proj], -1).argmax(-1))
    assert torch.equal(kb.long(), torch.cat([k @ r, -(k @ r)], -1).argmax(-1))
    assert torch.equal(ag.lsh_buckets(q, k, 8, seed=3)[0], qb)  # a seed fixes them
    m = (ag.causal() & ag.lsh(8, seed=3)).mask(20, 30, q=q, k=k)
    assert torch.equal(m, (ag.causal() & ag.buckets()).mask(20, 30, query_buckets=qb, key_buckets=kb))


def test_patterns_print_and_share_one_structure():
    assert repr(ag.causal() & ag.lsh(16, seed=2)) == "causal() & lsh(16, seed=2)"
    assert repr(ag.keep() & ag.buckets()) == "keep() & buckets()"
    assert (ag.causal() & ag.lsh(8)).key == (ag.causal() & ag.lsh(64, seed=1)).key == (ag.causal() & ag.buckets()).key
    assert (ag.causal() & ag.keep()).reorders and not ag.causal().reorders


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ag.lsh(7), "n must be an even integer"),
        (lambda: ag.lsh(0), "n must be an even integer from 2"),
        (lambda: ag.lsh(8, seed=-1), "seed must be None or an integer"),
        (lambda: make_plan(ag.buckets() & ag.nm(2, 4), head_dim=64, dtype="fp16", arch="sm_90"), "selection rule"),
    ],
)
def test_bad_patterns_are_refused(build, message):
    with pytest.raises(ag.InputError, match=message):
        build()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "needs key_buckets=, query_buckets="),
        ({"query_buckets": torch.zeros(B, HQ, 9), "key_buckets": torch.zeros(B, HKV, 9)}, "integer tensor"),
        ({"query_buckets": torch.zeros(B, 9, dtype=torch.int32), "key_buckets": torch.zeros(B, HKV, 9)}, "shape"),
        (
            {"query_buckets": torch.full((B, HQ, 9), 2**40), "key_buckets": torch.zeros(B, HKV, 9, dtype=torch.int32)},
            "fit in int32",
        ),
        ({"query_keep": torch.ones(B, HQ, 9)}, "does not use it"),
    ],
)
def test_bad_inputs_are_refused(inputs, message):
    q, k, _ = _qkv(9, 9, torch.Generator().manual_seed(0))
    with pytest.raises(ag.InputError, match=message):
        _prepared(ag.causal() & ag.buckets(), q, k, inputs)


def test_keep_masks_must_be_bool_and_one_bucket_leaf():
    q, k, _ = _qkv(9, 9, torch.Generator().manual_seed(0))
    rt = {"query_keep": torch.ones(B, HQ, 9, dtype=torch.int32), "key_keep": torch.ones(B, HKV, 9, dtype=torch.bool)}
    with pytest.raises(ag.InputError, match=r"torch\.bool"):
        _prepared(ag.keep(), q, k, rt)
    with pytest.raises(ag.InputError, match="one bucket leaf"):
        _prepared(ag.lsh(4, seed=1) & ag.lsh(8, seed=1), q, k, {})


# ---------------------------------------------------------------------------------------- sorted tokens


def test_route_sorts_stably_by_bucket_with_dropped_tokens_last():
    gen = torch.Generator().manual_seed(2)
    q, k, _ = _qkv(40, 40, gen)
    rt = _inputs(ag.buckets() & ag.keep(), 40, 40, gen)
    route, perm = reorder.route(ag.buckets() & ag.keep(), q, k, rt)
    for side, ids, kept, order in (
        (0, rt["query_buckets"], rt["query_keep"], route.q_order),
        (1, rt["key_buckets"], rt["key_keep"], route.k_order),
    ):
        order = order.long()
        sb, sk = torch.gather(ids, -1, order), torch.gather(kept, -1, order)
        assert torch.equal(route.buckets[side].long(), sb) and torch.equal(route.keep[side].bool(), sk)
        key = (~sk).long() * 100 + sb  # (dropped, bucket) non-decreasing, original order within equal keys
        assert (key.diff(dim=-1) >= 0).all()
        assert ((key.diff(dim=-1) > 0) | (order.diff(dim=-1) > 0)).all()
    x = torch.randn(B, HQ, 40, 3)
    there = op.to_sorted(x, perm.q_rows, perm.q_back)
    assert torch.equal(there, torch.gather(x, 2, route.q_order.long()[..., None].expand(-1, -1, -1, 3)))
    assert torch.equal(op.to_original(there, perm.q_rows, perm.q_back), x)


@pytest.mark.parametrize("Sq,Sk", LENGTHS)
@pytest.mark.parametrize("name", [n for n, (_, ranges) in PATTERNS.items() if ranges])
def test_key_ranges_are_the_sorted_mask(name, Sq, Sk):
    pat, _ = PATTERNS[name]
    assert P.keeps_key_ranges(pat)
    for trial in range(3):
        gen = torch.Generator().manual_seed(hash((name, Sq, Sk, trial)) % 2**31)
        q, k, _ = _qkv(Sq, Sk, gen)
        rt = _inputs(pat, Sq, Sk, gen, n_buckets=1 + trial * 2)
        route = _prepared(pat, q, k, rt).route
        want = P.dense_mask(pat.structure(), Sq, Sk, **{**rt, **route.mask_inputs()}).expand(B, HQ, Sq, Sk)
        first, count = route.ranges[..., 0, None], route.ranges[..., 1, None]
        j = torch.arange(Sk)
        assert torch.equal((j >= first) & (j < first + count), want), f"{name} trial {trial}"
        assert (first[count == 0] == 0).all()  # a row keeping nothing reads as (0, 0)


def test_patterns_that_are_not_ranges():
    for name, (pat, ranges) in PATTERNS.items():
        assert P.keeps_key_ranges(pat) == ranges, name
        plan = make_plan(pat, head_dim=64, dtype="bf16", arch="sm_90")
        assert plan.row_ranges == ranges and plan.reordered
        if ranges:
            r = "qrange[((long long)b * Hq + h) * Sq + min(q, Sq - 1)]"
            assert (
                plan.keep_c == plan.mask_c == f"unsigned(k - {r}.x) < unsigned({r}.y)"
                and [a.name for a in plan.runtime_args][-1] == "qrange"
            )
        else:  # the positions leaves read the original positions qo, ko
            assert "[&](int qo, int ko)" in plan.keep_c and "q_order" in [a.name for a in plan.runtime_args]


@pytest.mark.parametrize("bm,bn", [(64, 64), (16, 32), (32, 16)])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_schedules_of_sorted_tokens_are_sound(name, bm, bn):
    """A FULL tile keeps every pair, an EMPTY one none (exactly so, with key ranges), on the sorted tokens."""
    pat, ranges = PATTERNS[name]
    for Sq, Sk in [(37, 37), (100, 70), (70, 130)]:
        gen = torch.Generator().manual_seed(hash((name, bm, bn, Sq)) % 2**31)
        q, k, _ = _qkv(Sq, Sk, gen)
        rt = _inputs(pat, Sq, Sk, gen)
        prep = _prepared(pat, q, k, rt)
        cls = schedule.classes(pat.structure(), bm, bn, Sq, Sk, "cpu", prep).expand(B, HQ, -1, -1)
        leaves = pat if pat.layouts() else pat.structure()  # a layout's grid is in the pattern; lsh's buckets in rt
        mask = P.dense_mask(leaves, Sq, Sk, **{**rt, **prep.route.mask_inputs()}).expand(B, HQ, Sq, Sk)
        pad = torch.zeros(B, HQ, cls.shape[2] * bm, cls.shape[3] * bn, dtype=torch.int8)
        pad[..., :Sq, :Sk] = mask.to(torch.int8)
        tiles = pad.unflatten(2, (-1, bm)).unflatten(4, (-1, bn))  # [B, H, Tq, bm, Tk, bn]
        kept = tiles.sum((3, 5))
        area = torch.zeros_like(pad)
        area[..., :Sq, :Sk] = 1
        area = area.unflatten(2, (-1, bm)).unflatten(4, (-1, bn)).sum((3, 5))
        assert (kept[cls == EMPTY] == 0).all(), f"an EMPTY tile keeps pairs: {name}"
        assert (kept[cls == FULL] == area[cls == FULL]).all(), f"a FULL tile drops pairs: {name}"
        if ranges:  # exact, but for the last key tile when it runs past Sk (kept PARTIAL: the kernel masks it)
            partial = cls == PARTIAL
            if Sk % bn:
                partial[..., -1] = False
            assert ((kept[partial] > 0) & (kept[partial] < area[partial])).all(), f"inexact: {name}"


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", list(PATTERNS))
def test_calls_match_the_reference(name, reference_kernels):
    """Sort, run (the reference on the sorted tokens, as the kernels would), move back: the reference's answer on
    the original positions, forward, LSE and gradients; dropped queries get zero gradient."""
    pat, _ = PATTERNS[name]
    for Sq, Sk in LENGTHS:
        gen = torch.Generator().manual_seed(hash((name, Sq, Sk)) % 2**31)
        q, k, v = (t.requires_grad_() for t in _qkv(Sq, Sk, gen))
        rt = _inputs(pat, Sq, Sk, gen)
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float32, **rt)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        assert torch.allclose(out.float(), ref, atol=2e-3, rtol=2e-3)
        dout = torch.randn(out.shape, generator=gen).half()
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout.float())
        for g, w in zip(got, want):
            assert torch.allclose(g.float(), w.float(), atol=5e-3, rtol=5e-3)
        if "query_keep" in rt:
            assert (got[0][~rt["query_keep"]] == 0).all()
    assert all(c.prep.route is not None for c in reference_kernels.calls)


def test_kernels_compile_without_spills():
    """Both kernel families, both mask forms (key ranges; the pattern on original positions)."""
    for arch, d, (pat, _) in itertools.product(
        ("sm_80", "sm_90"), (64, 128), (PATTERNS["causal&buckets"], PATTERNS["documents&causal&buckets"])
    ):
        kern = ag.compile(pat, head_dim=d, dtype="bf16", arch=arch)
        binaries = {"attngen_fwd": kern.forward_binary, "attngen_bwd_dkdv": kern.backward_binary}
        binaries["attngen_bwd_dq"] = kern.backward_binary
        for entry, binary in binaries.items():
            res = binary.resources_of(entry)
            assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{pat} {arch} {d} {entry}"


def test_helper_kernels_compile():
    from attngen.nvrtc import compile_cached
    from attngen.render import render_gather_rows, render_range_classes

    for arch, (render, entry) in itertools.product(
        ("sm_80", "sm_90"),
        ((render_gather_rows, "attngen_gather_rows"), (render_range_classes, "attngen_range_classes")),
    ):
        res = compile_cached(render(arch)).resources_of(entry)
        assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{entry} {arch}"


def test_calls_trace_under_torch_compile(reference_kernels):
    """The sort, key ranges and gathers trace into one graph (fullgraph=True) for buckets() and keep(); a seeded
    lsh(n) draws its R with a torch.Generator, which a compiled region cannot make: one graph break there."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(40, 40, gen)
    cases = [(PATTERNS[name][0], True) for name in ("causal&buckets", "causal&keep", "documents&causal&buckets")]
    cases += [(PATTERNS["strict&lsh"][0], False), (ag.predicate("k < q") & ag.lsh(4), True)]
    for pat, fullgraph in cases:
        rt = _inputs(pat, 40, 40, gen)

        def fn(q, k, v, pat=pat, rt=rt):
            return ag.attention(q, k, v, pat, **rt)

        traced = torch.compile(fn, fullgraph=fullgraph, backend="eager")(q, k, v)
        if any(isinstance(leaf, P.LSH) and leaf.seed is None for leaf in pat.leaves()):
            assert traced.shape == q.shape and torch.isfinite(traced).all()  # a fresh R: other buckets each call
        else:
            assert torch.allclose(traced.float(), fn(q, k, v).float(), atol=1e-3), pat


@pytest.mark.parametrize("Sq,Sk,batch", [(5, 0, 1), (0, 5, 1), (3, 3, 0)])
def test_empty_sequences_and_batches(Sq, Sk, batch, reference_kernels):
    """No key, no query or no batch element: the sort, ranges and gathers handle empty tensors (output 0 rows)."""
    q = torch.randn(batch, 2, Sq, 64).half().requires_grad_()
    k, v = (torch.randn(batch, 1, Sk, 64).half().requires_grad_() for _ in range(2))
    rt = {"query_buckets": torch.zeros(batch, 2, Sq, dtype=torch.int32)}
    rt |= {"key_buckets": torch.zeros(batch, 1, Sk, dtype=torch.int32)}
    rt |= {
        "query_keep": torch.ones(batch, 2, Sq, dtype=torch.bool),
        "key_keep": torch.ones(batch, 1, Sk, dtype=torch.bool),
    }
    for pat in (ag.causal() & ag.buckets() & ag.keep(), ag.global_tokens(1) | ag.buckets() & ag.keep()):
        out = ag.attention(q, k, v, pat, **rt)
        assert out.shape == q.shape and (out == 0).all()
        grads = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
        assert all(g is None or (g == 0).all() for g in grads)
