"""Top-k by token (`topk(k, scorer=...)`) without a GPU: the constructors and what they refuse, the reference
semantics against a direct per-row loop (exact scores, lowrank, indexer; ties, fewer candidates than k, empty rows),
the call-time selection pass (`tokenselect`, fp32 on CPU tensors, in chunks) against the float64 reference, the
plan (one structure for every k; per-head lists on the flash kernels, the indexer's on the gather kernels) and
`attention` end to end with the kernels replaced by the reference."""

import pytest
import torch

import attngen as ag
from attngen import pattern as P
from attngen import reference, tokenselect
from attngen.errors import InputError
from attngen.plan import make_plan
from attngen.prepare import prepare
from attngen.select import split_selection

B, HQ, HKV, D = 2, 4, 2, 16


def _grid(*shape, gen) -> torch.Tensor:
    """Small integers: every product and sum below is exact in fp32 and float64 alike, so both rank keys the same
    way, ties included."""
    return torch.randint(-3, 4, shape, generator=gen).float()


def _inputs(scorer, Sq, Sk, gen) -> dict:
    if isinstance(scorer, P.LowRank):
        return {"proj": ag.random_projection(D, 4, seed=1)}
    if isinstance(scorer, P.Indexer):
        return {"index_q": _grid(B, Sq, 3, 8, gen=gen), "index_k": _grid(B, Sk, 8, gen=gen),
                "index_w": torch.randint(0, 3, (B, Sq, 3), generator=gen).float()}  # fmt: skip
    return {}


def _loop_scores(scorer, q, k, inputs) -> torch.Tensor:
    """[B, Hq or 1, Sq, Sk] float64 scores, one (row, key) at a time from the definitions."""
    Bq, Hq, Sq, _ = q.shape
    Sk, group = k.shape[2], Hq // k.shape[1]
    if isinstance(scorer, P.Indexer):
        iq, ik, w = (inputs[n].double() for n in ("index_q", "index_k", "index_w"))
        out = torch.zeros(Bq, 1, Sq, Sk, dtype=torch.float64)
        for b in range(Bq):
            for i in range(Sq):
                for j in range(Sk):
                    out[b, 0, i, j] = sum(w[b, i, h] * torch.relu(iq[b, i, h] @ ik[b, j]) for h in range(iq.shape[2]))
        return out
    out = torch.zeros(Bq, Hq, Sq, Sk, dtype=torch.float64)
    for b in range(Bq):
        for h in range(Hq):
            qh, kh = q[b, h].double(), k[b, h // group].double()
            if isinstance(scorer, P.LowRank):
                p = inputs["proj"].double()
                p = p if p.dim() == 2 else p[h]
                qh, kh = qh @ p, kh @ p
            out[b, h] = qh @ kh.T
    return out


def _loop_keep(scores: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """The k best candidates of each row, ties to the lower index: a stable sort of (-score, index)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:3])).tolist():
        row, ok = scores[tuple(idx)], cand[tuple(idx)]
        order = sorted((j for j in range(len(row)) if ok[j]), key=lambda j: (-float(row[j]), j))
        keep[tuple(idx)][order[:k]] = True
    return keep


SCORERS = {"exact": None, "lowrank": ag.lowrank(), "indexer": ag.indexer()}


@pytest.mark.parametrize("name", list(SCORERS))
@pytest.mark.parametrize("k", [1, 3, 40])
def test_reference_is_the_definition(name, k):
    """Scores from the definitions, the k best of the causal candidates with ties to the lower index (the small
    integer inputs make many ties), all candidates where fewer than k exist."""
    gen = torch.Generator().manual_seed(k)
    scorer, Sq, Sk = SCORERS[name], 11, 13
    q, kk = _grid(B, HQ, Sq, D, gen=gen), _grid(B, HKV, Sk, D, gen=gen)
    inputs = _inputs(scorer, Sq, Sk, gen)
    pat = ag.causal() & ag.topk(k, scorer=scorer)
    got = pat.mask(Sq, Sk, q=q, k=kk, **inputs)
    cand = ag.causal().mask(Sq, Sk).expand(B, got.shape[1], Sq, Sk)
    assert torch.equal(got, _loop_keep(_loop_scores(scorer, q, kk, inputs), cand, k))


@pytest.mark.parametrize("name", list(SCORERS))
def test_call_time_selection_matches_the_reference(name, monkeypatch):
    """tokenselect (fp32, rows in chunks) chooses what the float64 reference chooses, for contexts with | (the
    window adds keys, not candidates), documents (per batch; and a window within each), and key padding (a batch
    with no key: empty rows)."""
    monkeypatch.setattr(tokenselect, "CHUNK", 3000)  # several chunks of rows
    gen = torch.Generator().manual_seed(7)
    scorer = SCORERS[name]
    docs = (torch.rand(B, 50, generator=gen) < 0.1).cumsum(-1)
    for pat, Sq, Sk, extra in [
        (ag.causal() & ag.topk(5, scorer=scorer), 50, 50, {}),
        (ag.causal() & (ag.topk(4, scorer=scorer) | ag.sliding_window(3)), 50, 50, {}),
        (ag.documents() & ag.topk(6, scorer=scorer), 50, 50, {"document_ids": docs}),
        (
            ag.in_document(ag.causal() & ag.sliding_window(12)) & ag.topk(3, scorer=scorer),
            50,
            50,
            {"document_ids": docs},
        ),
        (ag.key_padding() & ag.topk(2, scorer=scorer), 20, 33, {"key_lengths": torch.tensor([0, 17])}),
    ]:
        q, kk = _grid(B, HQ, Sq, D, gen=gen), _grid(B, HKV, Sk, D, gen=gen)
        inputs = _inputs(scorer, Sq, Sk, gen) | extra
        lists = prepare(pat, q, kk, inputs).key_lists  # what ag.selected_keys returns (which wants CUDA tensors)
        heads = HKV if isinstance(scorer, P.Indexer) else HQ
        assert lists.dtype == torch.int32 and lists.shape[:3] == (B, heads, Sq)
        listed = P.dense_mask(ag.key_indices(), Sq, Sk, key_indices=lists, q=q)
        # The reference's choice of the leaf itself (the rest of the pattern is applied after it).
        leaf = P.token_leaf(pat)
        want = P._token_mask(pat, leaf, Sq, Sk, "cpu", {"q": q, "k": kk, "order": None, **_runtime(inputs)})
        assert torch.equal(listed, want.expand_as(listed)), pat
        out, _ = reference.attention(q, kk, _grid(B, HKV, Sk, D, gen=gen), pat.structure(), key_indices=lists, **extra)
        assert torch.isfinite(out).all()


def _runtime(inputs: dict) -> dict:
    keys = ("document_ids", "key_lengths", "query_buckets", "key_buckets", "query_keep", "key_keep", "key_indices")
    names = ("proj", "index_q", "index_k", "index_w", "scale")
    return {n: inputs.get(n) for n in keys + names} | {"score_mods": inputs.get("score_mods", ())}


def test_empty_rows_and_k_beyond_the_candidates():
    gen = torch.Generator().manual_seed(3)
    q, kk = _grid(1, 2, 9, D, gen=gen), _grid(1, 2, 9, D, gen=gen)
    pat = ag.key_padding() & ag.topk(100)
    lists = prepare(pat, q, kk, {"key_lengths": torch.tensor([4])}).key_lists
    assert lists.shape == (1, 2, 9, 9)
    assert torch.equal(lists[..., :4], torch.arange(4, dtype=torch.int32).expand(1, 2, 9, 4))
    assert (lists[..., 4:] == -1).all()
    lists = prepare(pat, q, kk, {"key_lengths": torch.tensor([0])}).key_lists
    assert (lists == -1).all()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ag.topk(0), "k must be an integer"),
        (lambda: ag.topk(4, scorer="indexer"), "scorer must be lowrank"),
        (lambda: ~(ag.causal() & ag.topk(2)), "~ cannot apply"),
    ],
)
def test_constructor_refuses(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_refused_compositions():
    bad = {
        "another top-k or key_indices": [
            ag.topk(2) | ag.topk(3),
            ag.causal() & ag.topk(2) & ag.key_indices(),
            ag.topk(2) | ag.topk_blocks(2),
        ],
        "selection rule": [ag.causal() & ag.topk(2) & ag.nm(2, 4)],
        "buckets, lsh or keep": [ag.causal() & ag.buckets() & ag.topk(2)],
    }
    for match, pats in bad.items():
        for pat in pats:
            with pytest.raises(InputError, match=match):
                split_selection(pat)
            with pytest.raises(InputError, match=match):
                make_plan(pat, head_dim=64, dtype="fp16", arch="sm_90a")


def test_inputs_are_checked():
    q, kk = torch.randn(B, HQ, 10, D), torch.randn(B, HKV, 12, D)
    lr, ix = ag.causal() & ag.topk(2, scorer=ag.lowrank()), ag.causal() & ag.topk(2, scorer=ag.indexer())
    good = {"index_q": torch.randn(B, 10, 3, 8), "index_k": torch.randn(B, 12, 8), "index_w": torch.randn(B, 10, 3)}
    cases = [
        (lr, {"proj": torch.randn(D + 1, 4)}, "proj= must be"),
        (lr, {"proj": torch.randn(HQ + 1, D, 4)}, "proj= must be"),
        (lr, {"proj": torch.ones(D, 4, dtype=torch.int32)}, "floating-point"),
        (lr, {}, "needs proj="),
        (ix, good | {"index_k": torch.randn(B, 12, 7)}, "index_k= must be"),
        (ix, good | {"index_w": torch.randn(B, 10, 2)}, "index_w= must be"),
        (ix, good | {"index_q": torch.randn(B, 11, 3, 8)}, "index_q= must be"),
    ]
    for pat, inputs, match in cases:
        with pytest.raises(InputError, match=match):
            prepare(pat, q, kk, inputs)


def test_plan_one_structure_for_every_k():
    """k is data: one compile per structure. Per-head selections run the flash kernels with the lists as bits (no
    gather can share a key between rows); the indexer's, shared by the heads, the gather kernels."""
    assert ag.topk(8).structure() == ag.topk(200).structure()
    assert (ag.causal() & ag.topk(8)).key == (ag.causal() & ag.topk(9, scorer=ag.lowrank())).key
    per_head = make_plan(ag.causal() & ag.topk(8), head_dim=64, dtype="bf16", arch="sm_90a")
    shared = make_plan(ag.causal() & ag.topk(8, scorer=ag.indexer()), head_dim=64, dtype="bf16", arch="sm_90a")
    assert per_head.gather is None and "kbits[" in per_head.mask_c
    assert shared.gather is not None and shared.gather.rest_c == "k <= q"


@pytest.mark.parametrize("name", list(SCORERS))
def test_calls_match_the_reference(name, reference_kernels):
    """`attention` end to end on the CPU with the kernels replaced by the reference: the selection reaches them as
    lists, output and gradients are the float64 reference's (which selects by itself)."""
    gen = torch.Generator().manual_seed(11)
    scorer = SCORERS[name]
    q = _grid(B, HQ, 40, 32, gen=gen).half().requires_grad_()  # small integers: exact in fp16
    kk, v = (_grid(B, HKV, 40, 32, gen=gen).half().requires_grad_() for _ in range(2))
    inputs = _inputs(scorer, 40, 40, gen)
    inputs |= {"proj": ag.random_projection(32, 4, seed=1)} if "proj" in inputs else {}
    pat = ag.causal() & (ag.topk(6, scorer=scorer) | ag.sliding_window(2))
    out, lse = ag.attention(q, kk, v, pat, return_lse=True, scale=0.05, **inputs)
    ref, ref_lse = reference.attention(q, kk, v, pat, scale=0.05, dtype=torch.float32, **inputs)
    assert torch.allclose(out.float(), ref, atol=5e-3) and torch.allclose(lse, ref_lse, atol=1e-4)
    dout = torch.randn(out.shape, generator=gen).half()
    got = torch.autograd.grad(out, (q, kk, v), dout)
    want = torch.autograd.grad(ref, (q, kk, v), dout.float())
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def _loop_threshold(scores: torch.Tensor, cand: torch.Tensor, t: float) -> torch.Tensor:
    """p(i, j) >= t over each row's candidates, else the row's first maximum: one row at a time."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:3])).tolist():
        row, ok = scores[tuple(idx)], cand[tuple(idx)]
        js = [j for j in range(len(row)) if ok[j]]
        if not js:
            continue
        p = torch.softmax(row[js], 0)
        passed = [j for j, pj in zip(js, p.tolist()) if pj >= t]
        best = max(js, key=lambda j: (float(row[j]), -j))
        keep[tuple(idx)][passed or [best]] = True
    return keep


@pytest.mark.parametrize("name", list(SCORERS))
@pytest.mark.parametrize("t", [0.01, 0.2, 1.0])
def test_threshold_reference_is_the_definition(name, t):
    """The softmax over the candidates of the scores the rule ranks (the exact ones at the attention's scale, a
    scorer's as they are), p >= t kept, the first maximum where nothing passes (t = 1 with ties: the lowest key)."""
    gen = torch.Generator().manual_seed(int(t * 100))
    scorer, Sq, Sk, scale = SCORERS[name], 11, 13, 0.3
    q, kk = _grid(B, HQ, Sq, D, gen=gen), _grid(B, HKV, Sk, D, gen=gen)
    q[0, 0, 5] = 0  # a row of equal scores
    inputs = _inputs(scorer, Sq, Sk, gen)
    pat = ag.causal() & ag.threshold(t, scorer=scorer)
    got = pat.mask(Sq, Sk, q=q, k=kk, scale=scale, **inputs)
    scores = _loop_scores(scorer, q, kk, inputs) * (scale if scorer is None else 1)
    cand = ag.causal().mask(Sq, Sk).expand(B, got.shape[1], Sq, Sk)
    assert torch.equal(got, _loop_threshold(scores, cand, t))
    assert (got.sum(-1) <= max(1, int(1 / t))).all()  # at most 1/t keys pass a row


@pytest.mark.parametrize("name", list(SCORERS))
def test_threshold_call_time_matches_the_reference(name, monkeypatch):
    """fp32 in chunks against float64. The thresholds sit away from the probabilities the grid's ties make (two equal
    maxima and nothing else have p just under 1/2: a near-tie at t = 0.5, which fp32 may round either way)."""
    monkeypatch.setattr(tokenselect, "CHUNK", 3000)
    gen = torch.Generator().manual_seed(5)
    scorer = SCORERS[name]
    for pat, extra in [
        (ag.causal() & ag.threshold(0.03, scorer=scorer), {}),
        (ag.causal() & (ag.threshold(0.2, scorer=scorer) | ag.sliding_window(3)), {}),
        (ag.key_padding() & ag.threshold(0.45, scorer=scorer), {"key_lengths": torch.tensor([0, 30])}),
    ]:
        q, kk = _grid(B, HQ, 40, D, gen=gen), _grid(B, HKV, 40, D, gen=gen)
        inputs = _inputs(scorer, 40, 40, gen) | extra
        lists = prepare(pat, q, kk, inputs, scale=0.125).key_lists
        listed = P.dense_mask(ag.key_indices(), 40, 40, key_indices=lists, q=q)
        leaf = P.token_leaf(pat)
        runtime = {"q": q, "k": kk, "order": None, **_runtime(inputs), "scale": 0.125}
        want = P._token_mask(pat, leaf, 40, 40, "cpu", runtime)
        assert torch.equal(listed, want.expand_as(listed)), pat


def test_threshold_constructor():
    assert repr(ag.threshold(0.25, scorer=ag.indexer())) == "threshold(0.25, scorer=indexer())"
    assert ag.threshold(0.25).structure() == ag.topk(3).structure()  # t is data: the same kernels
    for bad in (0, 1.5, -0.1, True, "0.1", float("nan")):
        with pytest.raises(InputError, match=r"t must be a number in \(0, 1\]"):
            ag.threshold(bad)
    with pytest.raises(InputError, match="~ cannot apply"):
        ~ag.threshold(0.1)


# ----------------------------------------------------------------------------------- with score modifications


def _mods(Sq: int, Sk: int, gen, align: str = "top_left"):
    """(score_mod, tensors, the definition): ALiBi with slopes that are multiples of 1/4, a bias of small integers
    with some -inf (keys it forbids), T5 buckets with an integer table; every modified score is exact in fp32 and
    float64 alike. The definition adds them to [B, Hq, Sq, Sk] scores one term at a time."""
    slopes = torch.randint(-4, 5, (HQ,), generator=gen).float() / 4
    bias = torch.randint(-2, 3, (B, 1, Sq, Sk), generator=gen).float()
    bias = bias.masked_fill(torch.rand(B, 1, Sq, Sk, generator=gen) < 0.1, float("-inf"))
    spec = ag.rel_bias(8, 20)
    table = torch.randint(-3, 4, (HQ, 8), generator=gen).float()

    def define(s: torch.Tensor) -> torch.Tensor:
        shift = Sk - Sq if align == "bottom_right" else 0
        rel = torch.arange(Sk).view(1, Sk) - torch.arange(Sq).view(Sq, 1)  # k - q
        s = s + slopes.double().view(HQ, 1, 1) * (rel - shift)
        s = s + bias.double()
        return s + table.double()[:, spec.bucket(rel)]

    mods = (ag.alibi(slopes, align), ag.bias(), spec)
    return mods, {"bias": bias, "rel_table": table}, define


def _bound(mods, tensors, q, Sk):
    from attngen import scoremod

    return scoremod.bind(mods, q, Sk, **tensors)


@pytest.mark.parametrize("rule", ["topk", "threshold"])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_reference_ranks_the_modified_scores(rule, align):
    """Exact scores are ranked as the softmax sees them, scale · q·k then the modifications (a key a bias sets to -inf
    is never kept, and a row of such keys keeps none); a scorer ranks its own values, the modifications aside."""
    gen = torch.Generator().manual_seed(5)
    Sq, Sk, scale = 13, 17, 0.5
    q, kk = _grid(B, HQ, Sq, D, gen=gen), _grid(B, HKV, Sk, D, gen=gen)
    mods, tensors, define = _mods(Sq, Sk, gen, align)
    tensors["bias"][0, 0, 3] = float("-inf")  # row 3 of batch 0: no key left
    bound = _bound(mods, tensors, q, Sk)
    make = (lambda scorer: ag.topk(3, scorer=scorer)) if rule == "topk" else lambda s: ag.threshold(0.1, scorer=s)
    pat = ag.causal(align) & make(None)
    got = pat.mask(Sq, Sk, q=q, k=kk, scale=scale, score_mods=bound)
    scores = define(_loop_scores(None, q, kk, {}) * scale)
    cand = ag.causal(align).mask(Sq, Sk).expand(B, HQ, Sq, Sk) & (scores > float("-inf"))
    want = _loop_keep(scores, cand, 3) if rule == "topk" else _loop_threshold(scores, cand, 0.1)
    assert torch.equal(got, want)
    assert not got[0, :, 3].any()
    plain = pat.mask(Sq, Sk, q=q, k=kk, scale=scale)
    assert not torch.equal(got, plain)  # the modifications changed the choice
    ix = ag.causal(align) & make(ag.indexer())
    inputs = _inputs(ag.indexer(), Sq, Sk, gen)
    assert torch.equal(ix.mask(Sq, Sk, q=q, k=kk, score_mods=bound, **inputs), ix.mask(Sq, Sk, q=q, k=kk, **inputs))


@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_call_time_selection_ranks_the_modified_scores(rule, monkeypatch):
    """tokenselect scores rows in chunks over the key spans the context leaves them (a window: chunks after the
    first start past key 0), and modifies each chunk at its place in the whole: the float64 reference's choice,
    for both alignments and Sq != Sk."""
    monkeypatch.setattr(tokenselect, "CHUNK", 2000)
    gen = torch.Generator().manual_seed(9)
    make = ag.topk if rule == "topk" else lambda n: ag.threshold(1 / n)
    for Sq, Sk, align in [(150, 150, "top_left"), (130, 170, "bottom_right"), (170, 130, "top_left")]:
        q, kk = _grid(B, HQ, Sq, D, gen=gen), _grid(B, HKV, Sk, D, gen=gen)
        mods, tensors, _ = _mods(Sq, Sk, gen, align)
        bound = _bound(mods, tensors, q, Sk)
        pat = ag.causal(align) & ag.sliding_window(70, align=align) & make(5)
        lists = prepare(pat, q, kk, {}, 0.5, bound).key_lists
        listed = P.dense_mask(ag.key_indices(), Sq, Sk, key_indices=lists, q=q)
        want = pat.mask(Sq, Sk, q=q, k=kk, scale=0.5, score_mods=bound)
        assert torch.equal(listed, want), (Sq, Sk, align)
        assert not torch.equal(listed, pat.mask(Sq, Sk, q=q, k=kk, scale=0.5))


def test_calls_with_score_mods_match_the_reference(reference_kernels):
    """`attention` with ALiBi, a bias and T5 buckets (and a head scale folded into q): the call's choice is the
    reference's, and output and gradients (in q, k, v, the bias and the table) are the float64 reference's."""
    gen = torch.Generator().manual_seed(13)
    Sq = Sk = 40
    q = _grid(B, HQ, Sq, 32, gen=gen).half().requires_grad_()
    kk, v = (_grid(B, HKV, Sk, 32, gen=gen).half().requires_grad_() for _ in range(2))
    mods, tensors, _ = _mods(Sq, Sk, gen)
    tensors = {n: t.requires_grad_() for n, t in tensors.items()}
    for pat in [ag.causal() & ag.topk(6), ag.causal() & (ag.threshold(0.05) | ag.sliding_window(2))]:
        call = dict(scale=0.25, score_mod=(*mods, ag.head_scale(torch.full((HQ,), 2.0))), **tensors)
        out, lse = ag.attention(q, kk, v, pat, return_lse=True, **call)
        ref, ref_lse = reference.attention(q, kk, v, pat, dtype=torch.float64, **call)
        assert torch.allclose(out.float(), ref.float(), atol=5e-3)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(
            lse[finite], ref_lse[finite].float(), atol=1e-4
        )
        dout = torch.randn(out.shape, generator=gen).half()
        wrt = (q, kk, v, tensors["bias"], tensors["rel_table"])
        got = torch.autograd.grad(out, wrt, dout)
        want = torch.autograd.grad(ref, wrt, dout.double())
        for name, a, b in zip(("q", "k", "v", "bias", "table"), got, want):
            assert torch.allclose(a.double(), b.double(), atol=2e-2, rtol=1e-2), (pat, name)


def test_selected_keys_takes_the_calls_modifications(monkeypatch):
    """`selected_keys` with the call's scale and score_mod returns what the call attends over."""
    from attngen import launch

    monkeypatch.setattr(launch, "_require_cuda", lambda q: None)
    gen = torch.Generator().manual_seed(17)
    q, kk = _grid(B, HQ, 30, D, gen=gen).half(), _grid(B, HKV, 30, D, gen=gen).half()
    mods, tensors, _ = _mods(30, 30, gen)
    pat = ag.causal() & ag.topk(4)
    got = ag.selected_keys(q, kk, pat, scale=0.5, score_mod=mods, **tensors)
    want = prepare(pat, q, kk, {"document_ids": None, "key_lengths": None}, 0.5, _bound(mods, tensors, q, 30))
    assert torch.equal(got, want.key_lists)
    assert not torch.equal(got, ag.selected_keys(q, kk, pat, scale=0.5))
    with pytest.raises(InputError, match="scale must be"):
        ag.selected_keys(q, kk, pat, scale=-1.0)
