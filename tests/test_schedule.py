"""Tile classification against brute force: no tile may be called FULL or EMPTY wrongly; single affine atoms
and aligned layouts are classified exactly; schedules list exactly the non-empty tiles in ascending order."""

import math
import random

import pytest
import torch

import attngen as ag
from attngen import expr as X
from attngen import schedule
from attngen.pattern import document_ids_pair, document_offsets, reads_document_offsets
from attngen.prepare import Prepared
from attngen.schedule import EMPTY, FULL, PARTIAL

q, k, Sq, Sk = ag.q, ag.k, ag.Sq, ag.Sk


def _truth(mask: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: are all valid elements allowed, is any allowed (mask [LB, LH, Sq, Sk])."""
    Sq_, Sk_ = mask.shape[-2:]
    tq, tk = math.ceil(Sq_ / bm), math.ceil(Sk_ / bn)
    pad = torch.nn.functional.pad
    m = mask.to(torch.int8)
    every = pad(m, (0, tk * bn - Sk_, 0, tq * bm - Sq_), value=1).view(*m.shape[:2], tq, bm, tk, bn)
    some = pad(m, (0, tk * bn - Sk_, 0, tq * bm - Sq_), value=0).view(*m.shape[:2], tq, bm, tk, bn)
    return every.amin((3, 5)).bool(), some.amax((3, 5)).bool()


def prepared(pat, Sq_: int, Sk_: int, runtime: dict) -> Prepared:
    """The run-time tensors of `pat` on the CPU, as `prepare` hands them to the scheduler."""
    docs = runtime.get("document_ids")
    lengths = runtime.get("key_lengths")
    if docs is not None:
        within = (document_offsets(docs, Sq_, Sk_),) * 2 if reads_document_offsets(pat) else ()
        docs = (*document_ids_pair(docs, Sq_, Sk_), *within)
    return Prepared(
        layouts=tuple(leaf.tensor() for leaf in pat.layouts()),
        document_ids=docs,
        key_lengths=None if lengths is None else lengths.to(torch.int32),
    )


def _check(pat, bm, bn, Sq_, Sk_, runtime=None, exact=False):
    runtime = runtime or {}
    mask = pat.mask(Sq_, Sk_, **runtime)
    cls = schedule.tile_classes(pat.structure(), bm, bn, Sq_, Sk_, "cpu", prepared(pat, Sq_, Sk_, runtime))
    every, some = _truth(mask, bm, bn)
    cls, every, some = torch.broadcast_tensors(cls, every, some)
    assert not ((cls == FULL) & ~every).any(), f"{pat!r}: a tile called full has a masked element"
    assert not ((cls == EMPTY) & some).any(), f"{pat!r}: a tile called empty has an allowed element"
    if exact:
        assert not ((cls == PARTIAL) & (every | ~some)).any(), f"{pat!r}: a uniform tile called partial"


def _random_atom(rng: random.Random) -> X.Boolean:
    a, b, c, d = (rng.randint(-3, 3) for _ in range(4))
    e = rng.randint(-40, 40)
    return X.relation(rng.choice(list(X.OPS)), a * q + b * k + c * Sq + d * Sk + e, 0)


def _random_predicate(rng: random.Random, depth: int = 2) -> X.Boolean:
    if depth == 0 or rng.random() < 0.3:
        atom = _random_atom(rng)
        return atom if atom not in (X.TRUE, X.FALSE) else q - k >= 0
    op = rng.choice([X.conj, X.disj, X.neg])
    if op is X.neg:
        return ~_random_predicate(rng, depth - 1)
    return op(_random_predicate(rng, depth - 1), _random_predicate(rng, depth - 1))


TILE_SIZES = [1, 2, 3, 7, 16, 64]  # small and odd tiles put tile corners on the predicates' boundaries


@pytest.mark.parametrize("seed", range(200))
def test_random_affine_patterns_against_brute_force(seed):
    rng = random.Random(seed)
    expr = _random_predicate(rng)
    pat = ag.predicate(expr) if expr not in (X.TRUE, X.FALSE) else ag.full()
    _check(pat, rng.choice(TILE_SIZES), rng.choice(TILE_SIZES), rng.randint(1, 150), rng.randint(1, 150))


@pytest.mark.parametrize("seed", range(100))
def test_single_atoms_are_exact(seed):
    rng = random.Random(1000 + seed)
    atom = _random_atom(rng)
    while not (isinstance(atom, X.Rel) and atom.op in ("ge", "gt", "le", "lt")):
        atom = _random_atom(rng)
    bm, bn = rng.choice(TILE_SIZES), rng.choice(TILE_SIZES)
    _check(ag.predicate(atom), bm, bn, rng.randint(1, 150), rng.randint(1, 150), exact=True)


@pytest.mark.parametrize(
    "pat",
    [
        ag.causal(),
        ag.causal(align="bottom_right") & ag.sliding_window(50, align="bottom_right"),
        ag.causal() & ag.sliding_window(1024) | ag.global_tokens(16),
        ~ag.local(10, 3) | ag.prefix_lm(20),
    ],
)
@pytest.mark.parametrize("shape", [(1, 1), (17, 300), (300, 17), (257, 257)])
def test_library_patterns(pat, shape):
    _check(pat, 64, 32, *shape)


def test_layouts_documents_key_padding():
    gen = torch.Generator().manual_seed(0)
    lay = torch.rand(3, 9, 9, generator=gen) < 0.4
    for bs, bm, bn in [(32, 64, 32), (64, 64, 64), (20, 64, 32), (128, 64, 64)]:
        nb = math.ceil(260 / bs)
        layout = torch.rand(3, nb, nb, generator=gen) < 0.4
        _check(ag.block_layout(layout, bs), bm, bn, 260, 250, exact=(bs % bm == 0 and bs % bn == 0))
    ids = torch.sort(torch.randint(0, 5, (2, 200), generator=gen), dim=-1).values
    _check(ag.documents() & ag.causal(), 32, 16, 200, 200, {"document_ids": ids})
    _check(ag.documents(), 32, 16, 200, 200, {"document_ids": ids}, exact=False)
    lens = torch.tensor([0, 77, 200])
    _check(ag.key_padding(), 32, 16, 100, 200, {"key_lengths": lens}, exact=True)
    _check(ag.block_layout(lay, 32) & ~ag.key_padding(), 64, 32, 280, 270, {"key_lengths": lens})


@pytest.mark.parametrize(
    "inner",
    [
        ag.causal(),
        ag.sliding_window(40),
        ag.prefix_lm(20),
        ag.global_tokens(8),
        ag.local(5, 30),
        ag.predicate("q // 32 == k // 32"),
        ~ag.causal() | ag.predicate("(q - k) % 3 == 0"),
    ],
    ids=repr,
)
def test_positions_within_documents(inner):
    """in_document(): a tile is classified by its documents and by the predicate over the box of its positions
    within them: sound for packed and for scattered ids; for one document it is the predicate's own classes."""
    gen = torch.Generator().manual_seed(4)
    packed = (torch.rand(2, 300, generator=gen) < 0.02).cumsum(-1)
    scattered = torch.randint(0, 3, (300,), generator=gen)
    for ids in (packed, scattered):
        _check(ag.in_document(inner), 32, 16, 300, 300, {"document_ids": ids})
        _check(ag.in_document(inner) | ag.sliding_window(10), 64, 32, 300, 300, {"document_ids": ids})
        _check(~ag.in_document(inner), 64, 64, 300, 300, {"document_ids": ids})
    one = torch.zeros(300, dtype=torch.int64)
    pat = ag.in_document(inner)
    got = schedule.tile_classes(
        pat.structure(), 64, 32, 300, 300, "cpu", prepared(pat, 300, 300, {"document_ids": one})
    )
    assert torch.equal(got[0, 0], schedule.tile_classes(inner, 64, 32, 300, 300, "cpu", None)[0, 0])


def test_per_batch_layouts():
    """A grid per batch element ([B, H or 1, nbq, nbk], or one broadcast batch): classes per (batch, head), alone
    and with documents, whose ids differ per batch element too."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.sort(torch.randint(0, 4, (3, 200), generator=gen), dim=-1).values
    for shape, bs, bm, bn in [((3, 2, 7, 7), 32, 64, 32), ((3, 1, 4, 4), 64, 64, 64), ((1, 2, 10, 10), 20, 16, 32)]:
        grid = torch.rand(shape, generator=gen) < 0.5
        _check(ag.block_layout(grid, bs), bm, bn, 200, 200, exact=(bs % bm == 0 and bs % bn == 0))
        _check(ag.block_layout(grid, bs) & ag.documents(), bm, bn, 200, 200, {"document_ids": ids})
        _check(ag.causal() | ag.block_layout(grid, bs), bm, bn, 200, 190)


def test_schedule_lists_nonempty_tiles_in_order():
    pat = ag.causal() & ag.sliding_window(100)
    s = schedule.build(pat, 64, 32, 300, 300, "cpu")
    cls = schedule.classes(pat, 64, 32, 300, 300, "cpu")[0, 0]
    for row in range(cls.shape[0]):
        n = int(s.counts[0, 0, row])
        tiles = s.tiles[0, 0, row, :n]
        expect = torch.nonzero(cls[row] > EMPTY).flatten()
        assert torch.equal(tiles >> 1, expect.to(torch.int32))
        assert torch.equal((tiles & 1).bool(), cls[row, expect] == PARTIAL)
    assert s.strides == (0, 0)


def test_last_key_tile_is_never_full():
    cls = schedule.classes(ag.full(), 64, 64, 100, 100, "cpu")
    assert cls[0, 0, :, -1].eq(PARTIAL).all() and cls[0, 0, :, 0].eq(FULL).all()
    assert schedule.classes(ag.full(), 64, 64, 100, 128, "cpu")[0, 0].eq(FULL).all()


def test_transposed_schedule_walks_query_tiles():
    s = schedule.build(ag.causal(), 64, 32, 200, 200, "cpu", transpose=True)
    # key tile 0 is seen by every query tile; the last key tile only by the last query tile
    assert s.counts[0, 0, 0] == math.ceil(200 / 64) and s.counts[0, 0, -1] == 1


def test_explain_draws_tiles_and_reasons():
    text = schedule.explain(ag.causal() & ag.sliding_window(300), 128, 64, 1000, 1000)
    assert "full (no mask)" in text and "sliding_window(300)" in text and "█" in text and "·" in text
    assert "built per call on the GPU from document_ids" in schedule.explain(ag.documents(), 128, 64, 100, 100)


def test_layout_schedules_are_cached_on_the_grid_not_the_pattern():
    """A layout's schedule is reused while its grid lives and is rebuilt for another grid of the same structure."""
    import gc
    import weakref

    a = ag.block_layout(torch.eye(4, dtype=torch.bool), 64)
    b = ag.block_layout(~torch.eye(4, dtype=torch.bool), 64)
    assert a.structure() == b.structure()
    first = schedule.build(a.structure(), 64, 64, 256, 256, "cpu", prepared(a, 256, 256, {}))
    grid = Prepared(layouts=(a.tensor().clone(),))  # a device copy, as prepare makes, owned by this test
    once = schedule.build(a.structure(), 64, 64, 256, 256, "cpu", grid)
    assert schedule.build(a.structure(), 64, 64, 256, 256, "cpu", grid) is once
    other = schedule.build(b.structure(), 64, 64, 256, 256, "cpu", prepared(b, 256, 256, {}))
    assert torch.equal(first.counts, once.counts) and first.counts.sum() == 4 and other.counts.sum() == 12
    alive = weakref.ref(grid.layouts[0])
    del grid, once
    gc.collect()
    assert alive() is None  # the cache keeps no grid alive


def test_document_schedules_are_made_once_per_batch_of_ids(monkeypatch):
    """One batch's document ids, passed to every layer: the calls share prepare's converted ids and the schedules
    built on them (classified once per tiling), until the ids change in place (then made again, and right); other
    ids get their own; the caches keep no tensor alive."""
    import gc
    import weakref

    from attngen import prepare as prep_mod

    pat, S = ag.documents() & ag.causal(), 300
    made = []
    classify = schedule.classes
    monkeypatch.setattr(schedule, "classes", lambda *a, **kw: made.append(a[1:5]) or classify(*a, **kw))
    ids = torch.tensor([0] * 100 + [1] * 150 + [2] * 50)  # int64: converted (and checked) once
    q = torch.empty(1, 2, S, 64)

    def layer(ids):
        runtime = prep_mod.prepare(pat, q, q, {"document_ids": ids, "key_lengths": None})
        return runtime, schedule.build(pat.structure(), 64, 64, S, S, "cpu", runtime)

    (first_rt, first), (second_rt, second) = layer(ids), layer(ids)
    assert second_rt.document_ids[0] is first_rt.document_ids[0] and second is first and len(made) == 1
    want = schedule._compress(classify(pat.structure(), 64, 64, S, S, "cpu", first_rt))
    assert torch.equal(first.counts, want.counts) and torch.equal(first.tiles, want.tiles)
    ids[250:] = 1  # changed in place: documents 1 and 2 are one now
    third_rt, third = layer(ids)
    assert third_rt.document_ids[0] is not first_rt.document_ids[0] and len(made) == 2
    assert (
        torch.equal(third_rt.document_ids[0].view(-1), ids.to(torch.int32)) and third.counts.sum() > first.counts.sum()
    )
    runtime, other = layer(torch.zeros(S, dtype=torch.int64))  # one document
    assert other.counts.sum() > third.counts.sum()
    alive = weakref.ref(third_rt.document_ids[0])
    del ids, first_rt, second_rt, third_rt, runtime, first, second, third, other
    gc.collect()
    assert alive() is None  # gone with the caller's ids
    ready = torch.zeros(1, S, dtype=torch.int32)  # as the kernels take them: the cache holds a copy, not the caller's
    caller = weakref.ref(ready)
    runtime, _ = layer(ready)
    assert runtime.document_ids[0] is not ready and torch.equal(runtime.document_ids[0], ready)
    del ready, runtime
    gc.collect()
    assert caller() is None


def test_a_rule_removes_tiles_from_the_schedule():
    """A selection rule's share of the schedule (`Selector.tile_keep`, built at call time from its tensors): tiles
    it rules out are never listed, for the forward-shaped and the transposed (dK/dV) schedule alike."""
    from dataclasses import dataclass

    from attngen.pattern import Selector

    @dataclass(frozen=True, repr=False)
    class EvenKeyTiles(Selector):  # a stand-in rule: keys only in even key tiles
        def tile_keep(self, bm, bn, Sq, Sk, tensors):
            (flag,) = tensors
            tk = math.ceil(Sk / bn)
            return (torch.arange(tk) % 2 == 0).expand(1, 1, math.ceil(Sq / bm), tk) & flag

    rule, pat = EvenKeyTiles(), ag.causal()
    run = Prepared(rule=(torch.tensor(True),))
    s = schedule.build(pat, 64, 32, 300, 300, "cpu", run, rule=rule)
    full = schedule.build(pat, 64, 32, 300, 300, "cpu")
    for row in range(s.rows):
        listed = s.tiles[0, 0, row, : s.counts[0, 0, row]] >> 1
        expect = full.tiles[0, 0, row, : full.counts[0, 0, row]] >> 1
        assert torch.equal(listed, expect[expect % 2 == 0])
    t = schedule.build(pat, 64, 32, 300, 300, "cpu", run, transpose=True, rule=rule)
    assert all(int(t.counts[0, 0, kt]) == 0 for kt in range(1, t.rows, 2))  # odd key tiles: no query tile
    assert int(t.counts[0, 0, 0]) == math.ceil(300 / 64)
    none = schedule.build(pat, 64, 32, 300, 300, "cpu", Prepared(rule=(torch.tensor(False),)), rule=rule)
    assert int(none.counts.sum()) == 0
