"""Fuzz cases (tests/fuzzing.py) through every stage that runs without a GPU: planning for sm_80 and sm_90, the
call-time checks of `prepare` (every generated case is valid input), tile classification and schedules against
brute force from the dense reference mask, and the emitted C mask against the reference (tests/test_lower.py's
translator); a small fixed sample of plans is rendered and compiled (no spills after the planner's fallback).

Cases whose pattern reorders (buckets(), lsh(n, seed), keep(): their tokens are sorted by bucket in a call) go
through the same stages on their sorted tokens: `prepare` sorts them (`Route`: each row a permutation, stably by
dropped flag then bucket, the ids and flags carried along), the mask of the sorted tokens is the original mask
permuted, tile classes and schedules are checked by brute force against it, and so is what the kernels evaluate:
the key ranges (`Route.ranges`) where every query keeps one range of sorted keys, else the plan's C mask, read at
the tokens' original positions (`q_order`, `k_order`), through the translator.

Cases with a `topk_blocks` leaf check the selection `prepare` makes (fp32, on the CPU here) against the float64 one
(they may differ only at near-ties), then go through the same stages with that selection; cases with
`key_indices()` bind the lists' bits (per KV head or per query head) where the translator evaluates the C mask.
Cases with a `topk(k, scorer)` leaf (top-k by token: exact scores, `lowrank()`, `indexer()`) check that the choice
`prepare` makes (fp32, on the CPU here, with the call's scale and score modifications) is the float64 reference's
exactly (their inputs and modifications make every score exact), then go through the same stages with its lists'
bits; their scorer inputs are checked to give the same scores in fp32 and float64, and a few of them run through the
GPU script's checks.

The same cases run on a GPU with `python bench/fuzz_gpu.py`; a failure here prints the line that runs its case
there."""

from __future__ import annotations

import math
import os
import re

import fuzzing
import pytest
import torch
from fuzzing import BLOCK_SIZES, GRID, HEAD_DIMS, MAX_INPUT, MAX_SCORES, STORAGES, case, selection_errors
from test_lower import Case as LowerCase
from test_lower import CEvalError, CExprError, _eval, _hazards, eval_c, parse_c, runtime_values
from test_lower import check as check_lowering
from test_schedule import _truth

import attngen as ag
from attngen import kernel, prepare, schedule, scoremod, tiling, tokentopk
from attngen import pattern as P
from attngen.plan import make_plan
from attngen.schedule import EMPTY, FULL, PARTIAL

SEEDS = range(300)
ARCHS = ("sm_80", "sm_90")
# Brute force builds the dense mask (and the translator a few tensors of its size): cases above this many
# elements are planned and prepared but not brute-forced (most cases are far below it).
BRUTE_FORCE_LIMIT = 1 << 21


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The tensors here are small: torch's thread pool only adds overhead (see conftest.py)."""


def _where(c) -> str:
    return f"{c.describe()}\n  reproduce on a GPU: {c.repro()}"


def _plans(c) -> dict:
    """The case's plans (without its score modifications, which change no mask, schedule or argument the mask
    reads)."""
    return {arch: make_plan(c.pattern, head_dim=c.head_dim, dtype=c.torch_dtype, arch=arch) for arch in ARCHS}


def _plan(c, arch: str):
    """The case's plan for `arch`, with its score modifications: what its kernels compile from."""
    mods = c.mod_structures()
    return make_plan(c.pattern, head_dim=c.head_dim, dtype=c.torch_dtype, arch=arch, score_mods=mods)


def _qk(c) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's q and k where the pattern hashes them (lsh) or ranks keys by them (top-k), else CPU stand-ins
    (`prepare` reads their shapes and device only)."""
    if any(isinstance(leaf, (P.LSH, P.TopkBlocks, P.TopkTokens)) for leaf in c.pattern.leaves()):
        return c.inputs("cpu")[:2]
    q = torch.empty(1, dtype=c.torch_dtype).expand(c.B, c.Hq, c.Sq, c.head_dim)
    k = torch.empty(1, dtype=c.torch_dtype).expand(c.B, c.Hkv, c.Sk, c.head_dim)
    return q, k


def _prepared(c, q, k) -> prepare.Prepared:
    ranked = _ranked(c, q)
    inputs = {"document_ids": None, "key_lengths": None, **c.runtime()}
    return prepare.prepare(c.pattern, q, k, inputs, ranked["scale"], ranked["score_mods"])


def _ranked(c, q) -> dict:
    """The scale and the bound modifications top-k by token ranks the exact scores with (the call's), as
    `dense_mask` takes them."""
    mods = scoremod.bind(c.mods(), q, c.Sk, **c.mod_tensors()) if P.token_leaf(c.pattern) is not None else ()
    return {"scale": c.scale, "score_mods": mods}


def _mask_elements(c) -> int:
    inputs = c.pattern.runtime_inputs
    per_head = any(grid.dim() == 3 and grid.shape[0] > 1 for grid in c.layouts.values())
    per_head |= P.topk_leaf(c.pattern) is not None or P.token_leaf(c.pattern) is not None
    return (c.B if inputs or per_head else 1) * (c.Hq if per_head or inputs else 1) * (c.Sq + 5) * (c.Sk + 5)


def _check_tiles(c, structure, mask, bm: int, bn: int, prep, transpose: bool) -> None:
    """Classes and the schedule of bm x bn tiles against brute force from the dense mask."""
    cls = schedule.classes(structure, bm, bn, c.Sq, c.Sk, "cpu", prep, heads=c.Hq)
    assert cls.shape[-2:] == (math.ceil(c.Sq / bm), math.ceil(c.Sk / bn)), _where(c)
    every, some = _truth(mask, bm, bn)
    wide, every, some = torch.broadcast_tensors(cls, every, some)
    bad_full = ((wide == FULL) & ~every).nonzero()
    assert not len(bad_full), f"{bm}x{bn} tile {bad_full[0].tolist()} called FULL drops an element\n{_where(c)}"
    bad_empty = ((wide == EMPTY) & some).nonzero()
    assert not len(bad_empty), f"{bm}x{bn} tile {bad_empty[0].tolist()} called EMPTY keeps an element\n{_where(c)}"
    sched = schedule.build(structure, bm, bn, c.Sq, c.Sk, "cpu", prep, transpose=transpose, heads=c.Hq)
    visit = cls.transpose(-1, -2) if transpose else cls
    assert torch.equal(sched.counts, (visit > EMPTY).sum(-1, dtype=torch.int32)), f"{bm}x{bn} counts\n{_where(c)}"
    tiles = sched.tiles
    n = tiles.shape[-1]
    listed = torch.arange(n) < sched.counts.unsqueeze(-1)
    order = torch.argsort((visit == EMPTY).to(torch.int8), dim=-1, stable=True)
    expect = (order.to(torch.int32) << 1) | (torch.gather(visit, -1, order) == PARTIAL).to(torch.int32)
    assert torch.equal(tiles[listed], expect[listed]), f"{bm}x{bn} schedule tiles\n{_where(c)}"


# ------------------------------------------------------------------------------------------ reordering patterns


def _bucket_ids(c, q, k) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bucket ids the case's call sorts by, in the original order: given, or hashed (lsh), or none."""
    for leaf in c.pattern.leaves():
        if isinstance(leaf, P.LSH):
            return ag.lsh_buckets(q, k, leaf.n, leaf.seed)
    return c.query_buckets, c.key_buckets


def _check_route(c, prep, q, k) -> None:
    """Each (batch, head) of each side a permutation of its tokens, stably sorted by (dropped, bucket), with the
    ids and keep flags carried into that order."""
    route = prep.route
    assert route is not None and prep.permutation is not None, _where(c)
    ids = _bucket_ids(c, q, k)
    for side, (order, S) in enumerate(((route.q_order, c.Sq), (route.k_order, c.Sk))):
        order = order.long()
        assert torch.equal(order.sort(-1).values, torch.arange(S).expand_as(order)), f"not a permutation\n{_where(c)}"
        key = torch.zeros_like(order)
        if ids[side] is not None:
            sorted_ids = torch.gather(ids[side].long().expand_as(order), -1, order)
            assert torch.equal(route.buckets[side].long(), sorted_ids), _where(c)
            key += sorted_ids
        kept = (c.query_keep, c.key_keep)[side]
        if kept is not None:
            sorted_kept = torch.gather(kept, -1, order)
            assert torch.equal(route.keep[side].bool(), sorted_kept), _where(c)
            key += (~sorted_kept).long() << 33  # dropped tokens last: above every int32 bucket difference
        step = key.diff(dim=-1)
        assert (step >= 0).all() and ((step > 0) | (order.diff(dim=-1) > 0)).all(), f"sort order\n{_where(c)}"


def _lsh_as_buckets(pat: ag.Pattern) -> ag.Pattern:
    """`pat` with its lsh leaf read as buckets() (the route holds the ids it hashed, in sorted order)."""
    if isinstance(pat, (P.And, P.Or)):
        parts = [_lsh_as_buckets(p) for p in pat.parts]
        return P.And(tuple(parts)) if isinstance(pat, P.And) else P.Or(tuple(parts))
    if isinstance(pat, P.Not):
        return P.Not(_lsh_as_buckets(pat.part))
    return ag.buckets() if isinstance(pat, P.LSH) else pat


def _sorted_mask(c, prep, q, k) -> torch.Tensor:
    """[B, Hq, Sq, Sk]: the mask of the sorted tokens (what the kernels must keep), checked to be the mask of the
    original positions, permuted."""
    shape = (c.B, c.Hq, c.Sq, c.Sk)
    route = prep.route
    mask = P.dense_mask(_lsh_as_buckets(c.pattern), c.Sq, c.Sk, **{**c.runtime(), **route.mask_inputs()})
    mask = mask.expand(shape)
    original = c.pattern.mask(c.Sq, c.Sk, q=q, k=k, **c.runtime()).expand(shape)
    qo = route.q_order.long()[..., None].expand(shape)
    ko = route.k_order.long().repeat_interleave(c.Hq // c.Hkv, dim=1)[..., None, :].expand(shape)
    assert torch.equal(torch.gather(torch.gather(original, 2, qo), 3, ko), mask), f"sorted mask\n{_where(c)}"
    return mask


_REORDERED_KEEP = re.compile(
    r"q < Sq && k < Sk && \[&\]\(int qo, int ko\) -> bool \{ return (?P<mask>.*); \}\((?P<qo>[^,]+), (?P<ko>[^,]+)\)"
)


def _c_value(text: str, ints: dict, ptrs: dict) -> torch.Tensor:
    """An integer C expression through test_lower's translator (bounds-checked loads)."""
    ptrs = {n: t.reshape(-1).to(torch.int64) for n, t in ptrs.items()}
    ints = {n: torch.as_tensor(v, dtype=torch.int64) for n, v in ints.items()}
    tree = parse_c(text, {**dict.fromkeys(ints, "int"), **dict.fromkeys(ptrs, "ptr")})
    hazards: set[int] = set()
    _hazards(tree, hazards)
    active = torch.ones(torch.broadcast_shapes(*(v.shape for v in ints.values())), dtype=torch.bool)
    return _eval(tree, {**ints, **ptrs}, active, hazards)


def _check_sorted_lowering(c, plan, prep, want: torch.Tensor) -> None:
    """What the kernels of a reordered call keep, on the sorted tokens, against `want` (their dense mask): the key
    ranges when every row keeps one range (the C mask is then `k - first < count`, unsigned), else the plan's C
    mask with the original positions read from q_order / k_order, evaluated by the translator."""
    route = prep.route
    if plan.row_ranges:
        first, count = route.ranges[..., 0, None].long(), route.ranges[..., 1, None].long()
        j = torch.arange(c.Sk)
        got = (j >= first) & (j < first + count)
        assert torch.equal(got, want), f"key ranges\n{_where(c)}"
        assert (first[count == 0] == 0).all() and (first + count <= c.Sk).all(), f"key ranges\n{_where(c)}"
        return
    m = _REORDERED_KEEP.fullmatch(plan.keep_c.replace("(long long)", ""))  # the translator computes in 64 bits
    assert m, f"unexpected C mask of a reordered plan: {plan.keep_c}\n{_where(c)}"
    lower = LowerCase(c.seed, c.pattern, c.Sq, c.Sk, B=c.B, H=c.Hq, layouts=dict(c.layouts))
    lower.document_ids, lower.key_lengths = c.document_ids, c.key_lengths
    values = runtime_values(lower)
    values |= {"q_order": ("ptr", route.q_order), "k_order": ("ptr", route.k_order)}
    for names, pair in ((("qbucket", "kbucket"), route.buckets), (("qkeep", "kkeep"), route.keep)):
        values |= {n: ("ptr", t) for n, t in zip(names, pair or ())}
    ints = {
        "b": torch.arange(c.B).view(-1, 1, 1, 1),
        "h": torch.arange(c.Hq).view(1, -1, 1, 1),
        "q": torch.arange(c.Sq).view(1, 1, -1, 1),
        "k": torch.arange(c.Sk).view(1, 1, 1, -1),
        "Sq": c.Sq,
        "Sk": c.Sk,
        "Hq": c.Hq,
        "group": c.Hq // c.Hkv,
    }
    ptrs = {}
    for arg in plan.runtime_args:
        assert arg.name in values, f"cannot bind run-time argument {arg}\n{_where(c)}"
        kind, value = values[arg.name]
        (ptrs if kind == "ptr" else ints)[arg.name] = value
    try:
        positions = {"qo": _c_value(m["qo"], ints, ptrs), "ko": _c_value(m["ko"], ints, ptrs)}
        got = eval_c(m["mask"], {**ints, **positions}, ptrs).expand_as(want)
    except (CExprError, CEvalError) as e:
        raise AssertionError(f"{type(e).__name__}: {e}\n  C: {plan.keep_c}\n{_where(c)}") from None
    if not torch.equal(got, want):
        at = tuple(int(i) for i in (got != want).nonzero()[0])
        raise AssertionError(f"C mask of the sorted tokens at (b, h, q, k) = {at}: {plan.mask_c}\n{_where(c)}")


# -------------------------------------------------------------------------------------------- top-k by token


def _as_listed(pat: ag.Pattern) -> ag.Pattern:
    """`pat` with its topk leaf read as key_indices() (the lists of the choice then stand for it)."""
    if isinstance(pat, (P.And, P.Or)):
        parts = tuple(_as_listed(p) for p in pat.parts)
        return P.And(parts) if isinstance(pat, P.And) else P.Or(parts)
    if isinstance(pat, P.Not):
        return P.Not(_as_listed(pat.part))
    return ag.key_indices() if isinstance(pat, P.TopkTokens) else pat


def _check_token_choice(c, leaf, prep, q, k) -> None:
    """The keys `prepare` chose (fp32 scores) are the float64 reference's, exactly: within the leaf's &-context
    (a choice shared by the heads may hold keys that only other heads' context allows)."""
    shape = (c.B, c.Hq, c.Sq, c.Sk)
    context = P.context_of(c.pattern, leaf)
    lists = prep.key_lists
    assert lists.dtype == torch.int32 and lists.shape[:3] == (c.B, c.Hkv if leaf.shared else c.Hq, c.Sq), _where(c)
    assert lists.shape[3] == min(leaf.k, c.Sk), _where(c)
    got = (context & ag.key_indices()).mask(c.Sq, c.Sk, q=q, k=k, key_indices=lists, **c.runtime()).expand(shape)
    want = (context & leaf).mask(c.Sq, c.Sk, q=q, k=k, **_ranked(c, q), **c.runtime()).expand(shape)
    if not torch.equal(got, want):
        at = tuple(int(i) for i in (got != want).nonzero()[0])
        raise AssertionError(f"the fp32 choice differs from the float64 one at (b, h, q, k) = {at}\n{_where(c)}")
    rows = want.sum(-1)
    allowed = context.mask(c.Sq, c.Sk, q=q, k=k, **c.runtime()).expand(shape).sum(-1)  # drawn biases are finite
    if leaf.shared:  # at most k of the keys some head allows
        assert (rows <= leaf.k).all(), _where(c)
    else:  # k of them, or all where fewer are allowed
        assert torch.equal(rows, allowed.clamp(max=leaf.k)), _where(c)


# --------------------------------------------------------------------------------------------------- cases


@pytest.mark.parametrize("seed", SEEDS)
def test_case_plans_schedules_and_lowers(seed):
    c = case(seed)
    plans = _plans(c)
    structure = c.pattern.structure()
    for arch, plan in plans.items():
        assert plan.pattern == structure, _where(c)
        assert plan.reordered == c.reorders, _where(c)
        assert plan.row_ranges == (c.reorders and P.keeps_key_ranges(structure)), _where(c)
        assert {a.name for a in plan.runtime_args} >= {f"layout{n}" for n in range(len(c.pattern.layouts()))}
        for t in (plan.fwd, plan.dkdv, plan.dq):
            assert t.smem_bytes <= tiling.SMEM_LIMIT, f"{arch} {t}: {t.smem_bytes} bytes of shared memory"
        if arch == "sm_80":
            assert not (plan.fwd.wgmma or plan.dkdv.wgmma or plan.dq.wgmma), f"{arch} got wgmma\n{_where(c)}"
        else:
            # a gather plan's (rest & key lists) tilings are the mma.sync family's: its own kernels run instead
            wgmma = c.head_dim in tiling.WGMMA_FORWARD_CONFIGS and plan.gather is None
            assert plan.fwd.wgmma == wgmma, _where(c)
    assert plans["sm_80"].keep_c == plans["sm_90"].keep_c, _where(c)
    q, k = _qk(c)
    prep = _prepared(c, q, k)  # valid input: prepare accepts it
    assert len(prep.layouts) == len(c.pattern.layouts())
    if c.reorders:
        _check_route(c, prep, q, k)
    else:
        assert prep.route is None and prep.permutation is None, _where(c)
    selected = {}
    if P.topk_leaf(c.pattern) is not None:  # the pass's choice: the float64 one but for near-ties
        assert not selection_errors(prep.blocks.bool(), q, k, c.pattern, c.runtime()), _where(c)
        selected["selected_blocks"] = prep.blocks.bool()
    if (token := P.token_leaf(c.pattern)) is not None:  # the pass's choice: the float64 one exactly
        _check_token_choice(c, token, prep, q, k)
    if _mask_elements(c) > BRUTE_FORCE_LIMIT:
        return
    if c.reorders:
        mask = _sorted_mask(c, prep, q, k)
    else:
        # q: key lists widen to its heads; top-k by token ranks the modified scores
        mask = c.pattern.mask(c.Sq, c.Sk, q=q, k=k, **c.runtime(), **selected, **_ranked(c, q))
    tilings = {(t.block_m, t.block_n, name == "dkdv") for p in plans.values() for name in ("fwd", "dkdv", "dq")
               for t in [p.tiles_of(name)]}  # fmt: skip
    for bm, bn, transpose in sorted(tilings):
        _check_tiles(c, plans["sm_90"].positions, mask, bm, bn, prep, transpose)
    if c.reorders:
        _check_sorted_lowering(c, plans["sm_90"], prep, mask)
        return
    pattern = c.pattern if token is None else _as_listed(c.pattern)  # a choice runs as its key lists
    lower = LowerCase(seed, pattern, c.Sq, c.Sk, B=c.B, H=c.Hq, layouts=dict(c.layouts))
    lower.document_ids, lower.key_lengths = c.document_ids, c.key_lengths
    lower.blocks = selected.get("selected_blocks")
    lower.key_indices = c.key_indices if token is None else prep.key_lists
    try:
        check_lowering(lower, plans["sm_90"])
    except AssertionError as e:
        raise AssertionError(f"{e}\n  reproduce on a GPU: {c.repro()}") from None


def test_generator_is_reproducible():
    a, b = case.__wrapped__(123), case.__wrapped__(123)
    assert a.describe() == b.describe() and repr(a.pattern) == repr(b.pattern)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs("cpu")[:3], b.inputs("cpu")[:3]))
    assert a.repro() == "python bench/fuzz_gpu.py --seed 123 --cases 1"
    for seed in [s for s in SEEDS if case(s).reorders][:8]:  # bucket ids, keep masks, lsh seeds too
        a, b = case.__wrapped__(seed), case.__wrapped__(seed)
        assert a.describe() == b.describe() and repr(a.pattern) == repr(b.pattern)
        ra, rb = a.runtime(), b.runtime()
        assert ra.keys() == rb.keys() and all(torch.equal(ra[n], rb[n]) for n in ra if n != "document_ids")
    for seed in [s for s in SEEDS if P.token_leaf(case(s).pattern) is not None][:8]:  # k, the scorer's inputs too
        a, b = case.__wrapped__(seed), case.__wrapped__(seed)
        assert a.describe() == b.describe() and repr(a.pattern) == repr(b.pattern) and a.notes == b.notes
        ra, rb = a.runtime(), b.runtime()
        assert ra.keys() == rb.keys() and ra.keys() >= set(P.token_leaf(a.pattern)._inputs), _where(a)
        for n in set(ra) - {"document_ids"}:
            assert torch.equal(ra[n], rb[n]) and ra[n].stride() == rb[n].stride(), _where(a)


def _nested_reordering(pat, under: bool = False) -> bool:
    """Whether a buckets / lsh / keep leaf of `pat` lies under | or ~."""
    if isinstance(pat, P.And):
        return any(_nested_reordering(p, under) for p in pat.parts)
    if isinstance(pat, (P.Or, P.Not)):
        return any(_nested_reordering(p, True) for p in (pat.parts if isinstance(pat, P.Or) else (pat.part,)))
    return under and isinstance(pat, P.REORDERING)


def _reordering_kinds(c) -> set[str]:
    if not c.reorders:
        return set()
    seen = {"reorder key ranges" if P.keeps_key_ranges(c.pattern) else "reorder sorted mask"}
    seen |= {"reorder nested"} if _nested_reordering(c.pattern) else set()
    seen |= {f"reorder {c.variant}", "reorder backward" if c.backward else "reorder forward"}
    seen |= {"reorder GQA"} if c.Hq > c.Hkv else set()
    seen |= {"reorder Sq != Sk"} if c.Sq != c.Sk else set()
    seen |= {"reorder documents"} if c.document_ids is not None else set()
    seen |= {"reorder layout"} if c.layouts else set()
    return seen


def _topk_kinds(c) -> set[str]:
    leaf = P.topk_leaf(c.pattern)
    if leaf is None:
        return set()
    where = (
        "alone"
        if c.pattern is leaf
        else "on top"
        if isinstance(c.pattern, P.And) and leaf in c.pattern.parts
        else "under |"
    )
    seen = {f"topk {where}", f"topk block {leaf.block}", f"topk {c.variant}"}
    seen |= {"topk k=1"} if leaf.k == 1 else {"topk k>=candidates"} if leaf.k >= math.ceil(c.Sk / leaf.block) else set()
    seen |= {"topk backward"} if c.backward else set()
    seen |= {"topk GQA"} if c.Hq > c.Hkv else set()
    seen |= {"topk Sq != Sk"} if c.Sq != c.Sk else set()
    seen |= {f"topk {name}"} if (name := "documents") in c.family or (name := "key_padding") in c.family else set()
    return seen


def _token_kinds(c) -> set[str]:
    leaf = P.token_leaf(c.pattern)
    if leaf is None:
        return set()
    pat = c.pattern
    if pat is leaf:
        where = "alone"
    elif isinstance(pat, (P.And, P.Or)) and any(p is leaf for p in pat.parts):
        where = "on top" if isinstance(pat, P.And) else "at the top of |"
    else:  # under a | (whose siblings add keys) that lies under & or not
        where = "under |"
    scorer = {P.LowRank: "lowrank", P.Indexer: "indexer"}.get(type(leaf.scorer), "exact")
    seen = {f"topk(k) {where}", f"topk(k) {scorer}", f"topk(k) {c.variant}", f"topk(k) {c.dtype}"}
    seen |= {"topk(k) k=1"} if leaf.k == 1 else {"topk(k) k>=Sk"} if leaf.k >= c.Sk else {"topk(k) 1<k<Sk"}
    seen |= {"topk(k) backward"} if c.backward else set()
    seen |= {"topk(k) GQA"} if c.Hq > c.Hkv else set()
    seen |= {"topk(k) Sq != Sk"} if c.Sq != c.Sk else set()
    seen |= {f"topk(k) {kind}" for kind in ("documents", "key_padding", "layout") if kind in c.family.split("+")}
    return seen


def test_generator_covers_every_kind():
    """Over the CI seeds: every constructor and operator, both aligns, == / != / chained predicates, // and %, Sq / Sk
    terms, shared and per-head layouts of every block size, every document-id form, key lengths 0 and Sk, every
    head dim, dtype, storage and variant, Sq != Sk, edge and long lengths; reordering patterns (buckets, lsh, keep;
    on top and nested, with key ranges and without) with every form of bucket ids and keep masks; block top-k in
    every place; key lists of every form; top-k by token in every place, with every scorer and its inputs' forms, k
    from 1 to past every key; and every case within the size caps."""
    seen: set[str] = set()
    small = reordering = 0
    words = ("causal", "sliding_window", "local", "prefix_lm", "global_tokens", "predicate", "documents",
             "key_padding", "block_layout", "full", "~", "|", "&", "bottom_right", "==", "!=", "Eq(", "Ne(",
             "Sk - Sq", " and ", " or ", "not ", "nm(2, 4)", "nm(1, 2)", "buckets()", "lsh(", "keep()",
             "key_indices()", "~key_indices()")  # fmt: skip
    for seed in SEEDS:
        c = case(seed)
        assert not (c.reorders and c.selects), _where(c)  # refused: the generator makes valid input only
        reordering += c.reorders
        seen |= _reordering_kinds(c)
        text = repr(c.pattern)
        seen |= {w for w in words if w in text}
        seen |= {w for w in ("Sq", "Sk") if w in text.replace("Sk - Sq", "")}
        seen |= {"chained"} if any(text.count(op) >= 2 for op in ("<", ">")) else set()
        seen |= {"floor division"} if re.search(r"predicate\([^)]*(//|floor)", text) else set()
        seen |= {"remainder"} if re.search(r"predicate\([^)]*(%|Mod)", text) else set()
        seen |= set(c.notes)
        seen |= {f"D{c.head_dim}", c.dtype, c.storage, c.variant}
        seen |= {"return_lse"} if c.return_lse else set()
        seen |= {"backward"} if c.backward else set()
        seen |= {"scale"} if c.scale is not None else set()
        seen |= {"Sq != Sk"} if c.Sq != c.Sk else set()
        seen |= {"long"} if max(c.Sq, c.Sk) > 512 else set()
        seen |= {"length 1"} if 1 in (c.Sq, c.Sk) else set()
        seen |= {"GQA"} if c.Hq > c.Hkv else set()
        seen |= {f"rule {c.variant}", "rule backward" if c.backward else "rule forward"} if c.selects else set()
        seen |= {"tile edge"} if {c.Sq, c.Sk} & {63, 65, 127, 129, 191, 193} else set()
        seen |= _topk_kinds(c)
        seen |= _token_kinds(c)
        for leaf, grid in c.layouts.items():
            seen.add(f"bs{leaf.block_size}")
            seen.add("per-head layout" if grid.dim() == 3 and grid.shape[0] > 1 else "shared layout")
        assert c.scores <= MAX_SCORES and c.B * c.Hq * max(c.Sq, c.Sk) * c.head_dim <= MAX_INPUT, _where(c)
        assert 1 <= c.B <= 3 and 1 <= c.Hkv <= 4 and c.Hq % c.Hkv == 0 and c.Hq // c.Hkv <= 4, _where(c)
        small += max(c.Sq, c.Sk) <= 512 and _mask_elements(c) <= BRUTE_FORCE_LIMIT
    expect = {*words, "Sq", "Sk", "chained", "doc:1d", "doc:2d", "doc:2d1", "doc:pair", "keylen:0", "keylen:Sk"}
    expect |= {f"D{d}" for d in HEAD_DIMS} | {"fp16", "bf16", *STORAGES, "auto", "mma_sync"}
    expect |= {"floor division", "remainder"}
    expect |= {"return_lse", "backward", "scale", "Sq != Sk", "long", "length 1", "GQA", "tile edge"}
    expect |= {"rule auto", "rule mma_sync", "rule backward", "rule forward"}
    expect |= {f"bs{bs}" for bs in BLOCK_SIZES} | {"per-head layout", "shared layout"}
    expect |= {f"buckets:{form}" for form in ("one", "few", "many", "distinct", "runs")}
    expect |= {f"buckets:{x}" for x in ("shared", "negative", "extreme", "int32", "int64")}
    expect |= {f"keep:{side} {x}" for side in ("query", "key") for x in ("all dropped", "none dropped", "some")}
    expect |= {"keep:prefixes"}
    expect |= {"reorder key ranges", "reorder sorted mask", "reorder nested", "reorder auto", "reorder mma_sync"}
    expect |= {"reorder backward", "reorder forward", "reorder GQA", "reorder Sq != Sk", "reorder documents"}
    expect |= {"reorder layout"}
    expect |= {f"topk {x}" for x in ("on top", "under |", "alone", "k=1", "k>=candidates", "block 64", "block 128")}
    expect |= {"topk backward", "topk mma_sync", "topk GQA", "topk Sq != Sk", "topk documents", "topk key_padding"}
    expect |= {f"indices:{x}" for x in ("random", "runs", "every", "none", "shared", "per query head")}
    expect |= {"key_indices()", "~key_indices()"}
    expect |= {f"topk(k) {x}" for x in ("alone", "on top", "at the top of |", "under |", "exact", "lowrank", "indexer")}
    expect |= {f"topk(k) {x}" for x in ("k=1", "k>=Sk", "1<k<Sk", "backward", "GQA", "Sq != Sk", "fp16", "bf16")}
    expect |= {f"topk(k) {x}" for x in ("documents", "key_padding", "layout")}
    expect |= {"tokens:exact", "tokens:indexer", "tokens:lowrank [D, r]", "tokens:lowrank [Hq, D, r]"}
    expect |= {f"proj:{x}" for x in ("sparse", "signs", "zero")} | {"index:same dtypes", "index:mixed dtypes"}
    expect |= {"index_w:any", "index_w:nonnegative"}
    assert expect <= seen, f"never generated: {sorted(expect - seen)}"
    assert small >= 0.8 * len(SEEDS), f"only {small} of {len(SEEDS)} cases are small enough to brute-force"
    assert 0.1 * len(SEEDS) <= reordering <= 0.4 * len(SEEDS), f"{reordering} of {len(SEEDS)} cases reorder"


def _mod_kinds(c) -> set[str]:
    return {type(m).__name__ for m in c.score_mod}


def _first(predicate) -> int:
    return next(s for s in SEEDS if predicate(case(s)))


# A fixed sample of distinct plans, rendered and compiled: the kernel families (wgmma and mma.sync forward and
# backward, head dims 256 and 96), both mask forms (branch-free affine, guarded loads), top-k by token (per-head
# lists as bits, the indexer's on the gather kernels).
COMPILE_SAMPLE = [
    ("sm_90", lambda c: _mod_kinds(c) == {"Softcap", "Alibi"}),  # Hopper kernels
    ("sm_80", lambda c: _mod_kinds(c) == {"Softcap", "Alibi"}),  # the mma.sync backward
    ("sm_90", lambda c: _mod_kinds(c) == {"Bias"} and c.head_dim == 64),  # a bias, preloaded
    ("sm_90", lambda c: c.head_dim == 256 and c.family == "affine"),
    ("sm_90", lambda c: c.head_dim == 128 and "layout" in c.family and "documents" in c.family),
    ("sm_90", lambda c: c.head_dim == 64 and c.family == "affine" and repr(c.pattern).count("(") >= 6),
    ("sm_80", lambda c: c.head_dim == 96 and not (c.selects or c.reorders)),  # key bits: guarded loads
    ("sm_80", lambda c: c.head_dim == 128 and c.family == "affine"),
    ("sm_80", lambda c: c.head_dim == 32 and c.dtype == "bf16"),
    ("sm_90", lambda c: c.selects and c.head_dim in (64, 128)),  # sparse P·V: wgmma.sp
    ("sm_90", lambda c: c.selects and c.head_dim == 96),  # sparse P·V: mma.sp
    ("sm_80", lambda c: c.selects and "layout" in c.family),
    ("sm_90", lambda c: P.token_leaf(c.pattern) is not None and c.head_dim == 128 and c.family != "topk"),
    ("sm_90", lambda c: (leaf := P.token_leaf(c.pattern)) is not None and leaf.shared),  # the indexer's: gathers
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,which", COMPILE_SAMPLE, ids=[f"{a}-{n}" for n, (a, _) in enumerate(COMPILE_SAMPLE)])
def test_sample_compiles_without_spills(arch, which):
    c = case(_first(which))
    plan = _plan(c, arch)
    plan, _, fwd = kernel.build_forward(plan)
    plan, _, bwd = kernel.build_backward(plan)
    for binary in (fwd, bwd):
        for entry, res in binary.resources:
            assert (res.spill_stores, res.spill_loads) == (0, 0), f"{arch} {entry} spills: {res}\n{_where(c)}"


def test_score_modifications_are_drawn_where_calls_take_them():
    """About MOD_SHARE of the cases carry softcap, alibi, a bias, T5's buckets or combinations (either order, both
    alignments, every broadcast of a bias), never with a rule, which would rank rounded modified scores; cases with
    top-k by token carry exact ones (no softcap, integer tensors, a scale of 2^-i), about TOKEN_MOD_SHARE of them;
    reordering cases a softcap, about REORDER_MOD_SHARE of them."""
    from fuzzing import EXACT_MOD_KINDS, MOD_SHARE, REORDER_MOD_SHARE, TOKEN_MOD_SHARE

    cases = [case(s) for s in range(4000)]
    reordered = [c for c in cases if c.reorders]
    capped = [c for c in reordered if c.score_mod]
    assert abs(len(capped) / len(reordered) - REORDER_MOD_SHARE) < 0.1
    assert all(len(c.score_mod) == 1 and isinstance(c.score_mod[0], scoremod.Softcap) for c in capped)
    tokens = [c for c in cases if P.token_leaf(c.pattern) is not None]
    exact = [c for c in tokens if c.score_mod]
    assert abs(len(exact) / len(tokens) - TOKEN_MOD_SHARE) < 0.15
    for c in exact:
        assert tuple(type(m).__name__.lower().replace("relbias", "rel_bias") for m in c.score_mod) in EXACT_MOD_KINDS
        assert c.scale in (0.25, 0.125, 0.0625), _where(c)
        for t in c.mod_tensors().values():
            assert torch.equal(t, t.round()), _where(c)
    drawn = [c for c in cases[:2000] if c.score_mod and P.token_leaf(c.pattern) is None and not c.reorders]
    assert abs(len(drawn) / 2000 - MOD_SHARE) < 0.05
    kinds = {tuple(type(m).__name__.lower().replace("relbias", "rel_bias") for m in c.score_mod) for c in drawn}
    assert kinds == set(fuzzing.MOD_KINDS)
    shapes = {n.split(":")[1] for c in drawn for n in c.notes if n.startswith("bias:")}
    assert shapes == set(fuzzing.BIAS_SHAPES)
    for c in drawn:
        takes = {type(m) for m in c.score_mod}
        assert (c.bias is not None) == (scoremod.Bias in takes)
        assert (c.rel_table is not None) == (scoremod.RelBias in takes)
        if c.bias is not None:  # broadcastable, as the call checks
            scoremod.bind(c.mods(), torch.empty(c.B, c.Hq, c.Sq, 8), c.Sk, **c.mod_tensors())
    assert {m.align for c in drawn for m in c.score_mod if isinstance(m, scoremod.Alibi)} == set(scoremod.ALIGNS)
    assert not any(c.selects or c.reorders for c in drawn + exact)
    assert all(m.slopes.shape == (c.Hq,) for c in drawn for m in c.score_mod if isinstance(m, scoremod.Alibi))


def test_rule_cases_draw_exact_scores():
    """Cases with a selection rule draw q and k from the grid, where fp32 and float64 scores choose alike (so the
    GPU run compares kernels with the reference exactly); the other cases keep normal inputs."""
    from attngen.select import split_selection

    with_rule = [s for s in SEEDS if case(s).selects][:6]
    assert with_rule, "no case with a selection rule"
    for seed in with_rule:
        c = case(seed)
        q, k, v, _, _ = c.inputs("cpu")
        assert torch.equal(q * GRID, (q * GRID).round()) and torch.equal(k * GRID, (k * GRID).round()), _where(c)
        assert q.abs().max() <= 1 and not torch.equal(v * GRID, (v * GRID).round()), _where(c)
        positions, rule = split_selection(c.pattern)
        allowed = positions.mask(c.Sq, c.Sk, **c.runtime())
        scale = c.scale or c.head_dim**-0.5
        kk = k.repeat_interleave(c.Hq // c.Hkv, dim=1)
        keep = [
            rule.reference_keep((q.to(t) @ kk.to(t).transpose(-1, -2)) * scale, allowed)
            for t in (torch.float32, torch.float64)
        ]
        assert torch.equal(*keep), _where(c)
    plain = next(case(s) for s in SEEDS if not case(s).on_grid)
    q = plain.inputs("cpu")[0]
    assert not torch.equal(q * GRID, (q * GRID).round())


def _token_seeds() -> list[int]:
    return [s for s in SEEDS if P.token_leaf(case(s).pattern) is not None]


def _few_bits(t: torch.Tensor, bits: int) -> bool:
    """Whether every value of `t` has at most `bits` significant bits (1: 0 and signed powers of two)."""
    mantissa = torch.frexp(t.double()).mantissa * 2**bits
    return torch.equal(mantissa, mantissa.round())


def test_token_cases_draw_exact_scores():
    """Cases with a topk(k) leaf draw q and k from the grid, and scorer inputs whose products and sums are exact:
    lowrank()'s proj holds 0 and signed powers of two, indexer()'s index_q and index_k quarters, index_w quarters
    times a power of two. Their scores are then the same in fp32 and float64 (so the call's fp32 choice is the
    reference's, ties included), and the tensors are valid scorer inputs (dtype, shape, layout as drawn)."""
    seeds = _token_seeds()
    assert len(seeds) >= 16, f"only {len(seeds)} cases with a topk(k) leaf among the first {len(SEEDS)} seeds"
    checked = set()
    for seed in seeds:
        c = case(seed)
        leaf = P.token_leaf(c.pattern)
        rt = c.runtime()
        inputs = {n: rt[n] for n in leaf._inputs}
        assert c.on_grid and not c.selects and not c.reorders, _where(c)
        assert set(rt) & {"proj", "index_q", "index_k", "index_w"} == set(leaf._inputs), _where(c)
        q, k = c.inputs("cpu")[:2]
        for t in (q, k, *(inputs[n] for n in ("index_q", "index_k") if n in inputs)):
            assert t.abs().max() <= 1 and torch.equal(t * GRID, (t * GRID).round()), _where(c)
        if "proj" in inputs:
            p = inputs["proj"]
            assert _few_bits(p, 1) and p.shape[-2] == c.head_dim and p.dim() in (2, 3), _where(c)
            assert p.shape[-1] * c.head_dim**2 <= 1 << 20, _where(c)  # (qP)·(kP) below 2^24 sixteenths
        if "index_w" in inputs:
            assert _few_bits(inputs["index_w"], 2), _where(c)  # quarters times a power of two
            B, Sq, Hi, Di = inputs["index_q"].shape
            assert Hi * Di <= 64 * 128 and inputs["index_w"].shape == (B, Sq, Hi), _where(c)
        tokentopk.check(leaf.scorer, inputs, c.B, c.Hq, c.Sq, c.Sk, c.head_dim)
        hi = inputs["index_q"].shape[2] if "index_q" in inputs else 1
        if c.scores * hi > 1 << 22:
            continue
        scores = {}
        for dtype in (torch.float32, torch.float64):
            keys = tokentopk.keys_of(leaf.scorer, k, inputs, c.Hq, dtype)
            rows, cols = slice(0, c.Sq), slice(0, c.Sk)
            scores[dtype] = tokentopk.scores(leaf.scorer, q, keys, inputs, rows, cols, dtype)
        assert torch.equal(scores[torch.float32].double(), scores[torch.float64]), f"inexact fp32 scores\n{_where(c)}"
        checked.add(type(leaf.scorer).__name__)
    assert checked == {"NoneType", "LowRank", "Indexer"}, checked


def test_token_groups_share():
    """Over the GPU run's thousand seeds: about TOKEN_SHARE of the groups have a topk(k) leaf, never beside a rule,
    reordering, topk_blocks or key_indices() (all refused with it), in both kernel variants."""
    groups = range(0, 1000, fuzzing.GROUP)
    with_leaf = [s for s in groups if fuzzing._tokens(s) is not None]
    expected = fuzzing.TOKEN_SHARE * len(groups)
    assert 0.6 * expected <= len(with_leaf) <= 1.5 * expected, f"{len(with_leaf)} of {len(groups)} groups"
    seen = set()
    for seed in with_leaf:
        c = case(seed)
        assert P.token_leaf(c.pattern) is not None and "topk" in c.family.split("+"), _where(c)
        assert not (c.selects or c.reorders or P.topk_leaf(c.pattern) or "key_indices" in c.pattern.runtime_inputs)
        seen |= _token_kinds(c)
    assert {"topk(k) auto", "topk(k) mma_sync", "topk(k) exact", "topk(k) lowrank", "topk(k) indexer"} <= seen
    for seed in range(0, 200, fuzzing.GROUP):  # and no topk(k) leaf elsewhere
        assert (fuzzing._tokens(seed) is None) == (P.token_leaf(case(seed).pattern) is None), _where(case(seed))


def test_every_generated_pattern_is_a_pattern():
    """Seeds past the CI range generate too (the GPU run takes a thousand or more)."""
    for seed in (1000, 4321, 99_999):
        c = case(seed)
        assert isinstance(c.pattern, ag.Pattern) and c.repro().endswith(f"--seed {seed} --cases 1")


# ------------------------------------------------------------------------------- bench/fuzz_gpu.py without a GPU


@pytest.fixture
def fuzz_gpu(monkeypatch):
    """bench/fuzz_gpu.py imported here (it sets ATTNGEN_POISON_OUTPUTS=1; restored afterwards)."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("ATTNGEN_POISON_OUTPUTS", "0")
    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz_gpu.py"
    spec = importlib.util.spec_from_file_location("fuzz_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert os.environ["ATTNGEN_POISON_OUTPUTS"] == "1"
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return module


def _stand_in(perturb=None):
    """attngen.attention computed by the reference in float32 and rounded to the input dtype (a kernel's
    precision), optionally perturbed: what the GPU script's checks are tested on."""
    from attngen import reference

    def attention(q, k, v, pattern=None, *, scale=None, return_lse=False, **runtime):
        out, lse = reference.attention(q, k, v, pattern, scale=scale, dtype=torch.float32, **runtime)
        out, lse = out.to(q.dtype), lse.float()
        if perturb is not None:
            out, lse = perturb(out, lse)
        return (out, lse) if return_lse else out

    return attention


def _small_seeds(n: int, **want) -> list[int]:
    picked = []
    for s in SEEDS:
        c = case(s)
        if c.scores <= 1 << 17 and c.variant == "auto" and all(getattr(c, a) == v for a, v in want.items()):
            picked.append(s)
    return picked[:n]


def _small_token_seeds() -> list[int]:
    """The first small case of each topk(k) scorer (auto variant), and the first such with backward."""
    picked: dict = {}
    for s in _token_seeds():
        c = case(s)
        if c.scores <= 1 << 17 and c.variant == "auto":
            scorer = type(P.token_leaf(c.pattern).scorer).__name__
            for key in (scorer, "backward" if c.backward else None):
                picked.setdefault(key, s)
    picked.pop(None, None)
    return sorted(set(picked.values()))


def test_gpu_script_checks_pass_a_correct_kernel(fuzz_gpu, monkeypatch):
    """The GPU script's run and checks, on the CPU with the reference standing in for the kernels."""
    monkeypatch.setattr(ag, "attention", _stand_in())
    tol = fuzz_gpu.tolerances()
    seeds = _small_seeds(3, backward=True, return_lse=True) + _small_seeds(3, backward=True, return_lse=False)
    seeds += _small_seeds(3, backward=False)
    seeds += _small_seeds(1, selects=True, backward=True) + _small_seeds(1, selects=True, backward=False)
    seeds += _small_seeds(2, reorders=True, backward=True) + _small_seeds(2, reorders=True, backward=False)
    assert len(seeds) == 15
    tokens = _small_token_seeds()  # the scorer's inputs reach both attention and the reference
    assert len(tokens) >= 3 and any(case(s).backward for s in tokens), tokens
    seeds += tokens
    for seed in seeds:
        c = case(seed)
        assert fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", tol) == [], _where(c)


def test_gpu_script_runs_token_cases_through_attention(fuzz_gpu, reference_kernels):
    """attngen.attention itself on the CPU for small top-k-by-token cases (`reference_kernels`: the kernels replaced by
    the reference, given the call's key lists): the API accepts each case's inputs (q, k, v as laid out, the scorer's
    tensors), `prepare` chooses the keys in fp32, and the GPU script's checks against the float64 reference, which
    chooses by itself, pass: the same keys, forward and backward."""
    seeds = [s for s in _token_seeds() if case(s).scores <= 1 << 18 and case(s).variant == "auto"]
    assert len(seeds) >= 8, seeds
    scorers = set()
    for seed in seeds:
        c = case(seed)
        assert fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", fuzz_gpu.tolerances()) == [], _where(c)
        assert reference_kernels.calls[-1].prep.key_lists is not None, _where(c)
        scorers.add(type(P.token_leaf(c.pattern).scorer).__name__)
    assert scorers == {"NoneType", "LowRank", "Indexer"}, scorers


def test_gpu_script_runs_reordering_mma_sync_cases_through_attention(fuzz_gpu, monkeypatch):
    """A reordering case of the mma_sync variant runs through attngen.attention (which sorts its tokens) with the
    forced kernels swapped in for the planner's (op._compiled_for), not through bind.forward on unsorted tokens;
    the swap is undone afterwards."""
    from attngen import bind, op

    [seed] = [s for s in SEEDS if case(s).reorders and case(s).variant == "mma_sync" and case(s).scores <= 1 << 17][:1]
    c = case(seed)
    forced = object()  # what compiled_for gives (compiling needs no GPU, but takes seconds)
    monkeypatch.setattr(fuzz_gpu, "compiled_for", lambda c, arch: forced)
    monkeypatch.setattr(bind, "forward", lambda *a, **kw: pytest.fail("bind.forward on unsorted tokens"))
    stand_in, seen = _stand_in(), []

    def attention(q, k, v, pattern=None, **kw):
        seen.append(op._compiled_for("structure", q))
        return stand_in(q, k, v, pattern, **kw)

    monkeypatch.setattr(ag, "attention", attention)
    planner = op._compiled_for
    assert fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", fuzz_gpu.tolerances()) == [], _where(c)
    assert seen == [forced] and op._compiled_for is planner


def test_gpu_script_checks_catch_wrong_results(fuzz_gpu, monkeypatch):
    tol = fuzz_gpu.tolerances()
    [seed] = _small_seeds(1, backward=True, return_lse=True)
    c = case(seed)
    wrong = {
        "output error": lambda out, lse: (out * 1.05, lse),
        "non-finite output": lambda out, lse: (out.masked_fill(torch.rand(out.shape) < 0.01, float("nan")), lse),
        "LSE": lambda out, lse: (out, lse + 0.01),
        "backward: dq error": lambda out, lse: (out + (0.1 * out - (0.1 * out).detach()), lse),  # gradient x 1.1
    }
    for expect, perturb in wrong.items():
        monkeypatch.setattr(ag, "attention", _stand_in(perturb))
        errors = fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", tol)
        assert any(expect in e for e in errors), f"{expect}: {errors}"


def _without(pat, kinds):
    """`pat` with its leaves of `kinds` read as full(): what a kernel that ignored them would compute."""
    if isinstance(pat, (P.And, P.Or)):
        parts = tuple(_without(p, kinds) for p in pat.parts)
        return P.And(parts) if isinstance(pat, P.And) else P.Or(parts)
    if isinstance(pat, P.Not):
        return P.Not(_without(pat.part, kinds))
    return ag.full() if isinstance(pat, kinds) else pat


def _without_reordering(pat):
    """`pat` with its buckets / lsh / keep leaves read as full()."""
    return _without(pat, P.REORDERING)


def test_gpu_script_checks_catch_ignored_buckets(fuzz_gpu, monkeypatch):
    """Reordering cases against a kernel that ignores their buckets and keep masks: caught wherever that changes
    the mask."""
    stand_in = _stand_in()
    runtime = ("query_buckets", "key_buckets", "query_keep", "key_keep")

    def ignoring(q, k, v, pattern=None, **kw):
        return stand_in(q, k, v, _without_reordering(pattern), **{n: t for n, t in kw.items() if n not in runtime})

    seeds = [s for s in _small_seeds(40, reorders=True, return_lse=True) if case(s).Sq > 16]
    caught = 0
    for seed in seeds[:6]:
        c = case(seed)
        monkeypatch.setattr(ag, "attention", ignoring)
        errors = fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", fuzz_gpu.tolerances())
        q, k = c.inputs("cpu")[:2]
        rt = c.runtime()
        shape = (c.B, c.Hq, c.Sq, c.Sk)
        masks = (c.pattern.mask(c.Sq, c.Sk, q=q, k=k, **rt), _without_reordering(c.pattern).mask(c.Sq, c.Sk, **rt))
        same = torch.equal(*(m.expand(shape) for m in masks))
        assert bool(errors) != same, f"{errors}\n{_where(c)}"
        caught += bool(errors)
    assert caught >= 3, f"only {caught} of {len(seeds[:6])} cases tell buckets from none"


def _without_tokens(pat):
    """`pat` with its topk(k) leaf read as full(): what a kernel that ignored the choice would compute."""
    return _without(pat, P.TopkTokens)


def test_gpu_script_checks_catch_ignored_topk(fuzz_gpu, monkeypatch):
    """Top-k-by-token cases against a kernel that keeps every candidate (the leaf read as full()): no error where
    that is the same mask (k past the candidates), caught where it differs."""
    stand_in = _stand_in()
    monkeypatch.setattr(
        ag, "attention", lambda q, k, v, pattern=None, **kw: stand_in(q, k, v, _without_tokens(pattern), **kw)
    )
    caught = differ = 0
    for seed in _token_seeds():
        c = case(seed)
        if c.scores > 1 << 18 or c.variant != "auto" or c.Sq < 16:
            continue
        errors = fuzz_gpu.run_case(c, torch.device("cpu"), "sm_90", fuzz_gpu.tolerances())
        q, k = c.inputs("cpu")[:2]
        shape = (c.B, c.Hq, c.Sq, c.Sk)
        masks = [
            p.mask(c.Sq, c.Sk, q=q, k=k, **c.runtime()).expand(shape) for p in (c.pattern, _without_tokens(c.pattern))
        ]
        changed = (masks[0] != masks[1]).any(-1).float().mean().item()  # share of rows the choice changes
        if changed == 0:
            assert errors == [], f"{errors}\n{_where(c)}"
        elif changed > 0.1 and P.token_leaf(c.pattern).k <= 3:
            differ += 1
            caught += bool(errors)
    assert differ >= 3 and caught == differ, f"caught {caught} of {differ}"


def test_gpu_script_dry_run(fuzz_gpu, capsys):
    assert fuzz_gpu.main(["--seed", "40", "--cases", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  #")[0] for line in out[:3]] == [case(s).repro() for s in (40, 41, 42)]
    assert out[-1].startswith("3 cases, ")
    seed = next(s for s in _token_seeds() if "index_q" in case(s).runtime())
    assert fuzz_gpu.main(["--seed", str(seed), "--cases", "1", "--dry-run"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(case(seed).repro()) and "topk(" in line and "index_q (" in line and "index_w (" in line


def test_gpu_script_prewarms_what_the_cases_run(fuzz_gpu, monkeypatch):
    """The prewarm compiles one case of each kernel set, and cases of one kernel set run the same kernels: cases of
    one pattern structure with other score modifications are other sets (else the run compiles them one by one)."""
    from attngen import kernel as kernel_module

    monkeypatch.setattr(kernel_module, "compiled", lambda *args: args)  # what a case's kernels are compiled from
    todo = [case(s) for s in SEEDS if case(s).variant == "auto"]
    runs = {}
    for c in todo:
        runs.setdefault(fuzz_gpu.kernel_set(c, "sm_90"), set()).add(fuzz_gpu.compiled_for(c, "sm_90"))
    assert all(len(compiles) == 1 for compiles in runs.values())
    assert len({next(iter(compiles)) for compiles in runs.values()}) == len(runs)
    assert len({(s[0], *s[2:]) for s in runs}) < len(runs), "the seeds should hold a structure under two mod sets"

    jobs = []

    class Pool:  # the prewarm's process pool, in this process: which seeds it would compile
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, work, chunksize=1):
            jobs.extend(work)
            return [None] * len(work)

    import concurrent.futures

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    fuzz_gpu.prewarm(todo, "sm_90", 2)
    prewarmed = {fuzz_gpu.kernel_set(case(seed), "sm_90"): backward for seed, _arch, backward in jobs}
    assert len(prewarmed) == len(jobs) and set(prewarmed) == set(runs)
    assert all(prewarmed[fuzz_gpu.kernel_set(c, "sm_90")] for c in todo if c.backward)
