"""GPU: top-k by token (`topk(k)`, exact, `lowrank()`, `indexer()`) forward and backward against attngen.reference
given the call's own choice (`selected_keys`), composed with causal, a window under |, documents; GQA, odd and
uneven lengths, k beyond the candidates, empty rows, fp16 and bf16, head dims 64 and 128; and the choice itself
against the float64 reference's: sets may differ only on few rows (near-ties). Outputs are poisoned
(ATTNGEN_POISON_OUTPUTS=1). Skipped cleanly without a CUDA GPU."""

import pytest
import torch
from test_kernels_gpu import DTYPES, GPU_TESTS, _check_call, _check_forward, _check_grads, _gen, _inputs

import attngen as ag
from attngen import pattern as P
from attngen import reference, scoremod

pytestmark = GPU_TESTS


SCORERS = {"exact": None, "lowrank": ag.lowrank(), "indexer": ag.indexer()}
PATTERNS = {
    "causal": lambda s, n: ag.causal() & ag.topk(n, scorer=s),
    "causal&(topk|window)": lambda s, n: ag.causal() & (ag.topk(n, scorer=s) | ag.sliding_window(32)),
    "documents&topk": lambda s, n: ag.documents() & ag.topk(n, scorer=s),
    "causal&threshold": lambda s, n: ag.causal() & ag.threshold(0.01, scorer=s),
}
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (300, 517), (517, 300)]
B, HQ, HKV = 2, 8, 2


def _scorer_inputs(scorer, Sq, Sk, D, gen) -> dict:
    if isinstance(scorer, P.LowRank):
        return {"proj": torch.randn(HQ, D, 16, generator=gen).cuda()}  # one per query head
    if isinstance(scorer, P.Indexer):
        return {
            "index_q": torch.randn(B, Sq, 4, 32, generator=gen).to("cuda", torch.bfloat16),
            "index_k": torch.randn(B, Sk, 32, generator=gen).to("cuda", torch.bfloat16),
            "index_w": torch.rand(B, Sq, 4, generator=gen).cuda(),
        }
    return {}


def _docs(Sq, Sk, gen) -> dict:
    ids = lambda s: (torch.rand(B, s, generator=gen) < 4.0 / s).cumsum(-1).to(torch.int32).cuda()
    return {"document_ids": ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_forward_and_backward(scorer, pattern, dtype, D):
    for Sq, Sk in LENGTHS:
        gen = _gen("topk", scorer, pattern, dtype, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        n = 24 if Sk > 100 else 40  # past the candidates on the short ones
        pat = PATTERNS[pattern](SCORERS[scorer], n)
        rt = _scorer_inputs(SCORERS[scorer], Sq, Sk, D, gen) | (_docs(Sq, Sk, gen) if "documents" in pattern else {})
        where = f"{pat!r} {dtype} D={D} Sq={Sq} Sk={Sk}"
        lists = ag.selected_keys(q, k, pat, **rt)
        given = {"key_indices": lists} | {n: t for n, t in rt.items() if n == "document_ids"}
        got = ag.attention(q, k, v, pat, return_lse=True, **rt)
        want = reference.attention(q, k, v, pat.structure(), dtype=torch.float32, **given)
        _check_call(q, k, v, got, want, dtype, where)


@pytest.mark.parametrize("rule", ["topk", "threshold"])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_choice_matches_the_float64_reference(scorer, rule):
    """Random inputs: the fp32 choice and the float64 one agree on at least 99.5% of the rows (the rest are
    near-ties: scores a few ulps apart, or a probability a few ulps from the threshold)."""
    gen = _gen("fidelity", scorer)
    Sq = Sk = 1500
    q, k, _ = _inputs(1, HQ, HKV, Sq, Sk, 64, torch.bfloat16, gen)
    rt = _scorer_inputs(SCORERS[scorer], Sq, Sk, 64, gen)
    rt = {n: t[:1] if n.startswith("index") else t for n, t in rt.items()}  # batch 1
    make = ag.topk if rule == "topk" else lambda n, scorer: ag.threshold(1 / n, scorer=scorer)
    pat = ag.causal() & make(64, scorer=SCORERS[scorer])
    lists = ag.selected_keys(q, k, pat, **rt)
    got = P.dense_mask(ag.key_indices(), Sq, Sk, key_indices=lists, device="cuda")
    want = pat.mask(Sq, Sk, q=q, k=k, device="cuda", **rt)
    differ = (got != want.expand_as(got)).any(-1).float().mean().item()
    assert differ < 0.005, f"{differ:.2%} of rows chose other keys"


def test_empty_rows_give_zero_and_gradients_zero():
    gen = _gen("topk empty")
    q, k, v = _inputs(B, HQ, HKV, 200, 200, 64, torch.float16, gen, requires_grad=True)
    pat = ag.key_padding() & ag.topk(8, scorer=ag.indexer())
    rt = _scorer_inputs(ag.indexer(), 200, 200, 64, gen) | {"key_lengths": torch.tensor([0, 50], device="cuda")}
    out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


@pytest.mark.parametrize("C", [1, 37, 300, 8192, 8193, 20000])
def test_topk_rows_kernel_is_the_rule(C):
    """device.topk_rows against blocktopk.choose (the rule: the k largest, ties to the lower column, -inf never
    taken) on rows with many ties (small integers), some candidates masked, rows of no candidate, k below and
    beyond the candidates; rows cached in shared memory (C <= 8192) or read from global memory."""
    from attngen import blocktopk, device, tokentopk

    gen = _gen("topk rows", C)
    s = torch.randint(-4, 5, (64, C), generator=gen).float()
    s[torch.rand(s.shape, generator=gen) < 0.3] = float("-inf")
    s[5] = float("-inf")
    s[6] = torch.randn(C, generator=gen)
    for k in (1, 3, 64, C + 5):
        got = device.topk_rows(s.cuda(), k, first=7).cpu()
        keep = blocktopk.choose(s, torch.isfinite(s), k)
        want = tokentopk.lists_of(keep, k)
        assert torch.equal(got, torch.where(want >= 0, want + 7, -1)), k


@pytest.mark.parametrize("Di", [32, 64, 128])
def test_indexer_scores_kernel(Di):
    """device.indexer_scores against float64 torch on a block of rows and keys that does not start at 0."""
    from attngen import device

    gen = _gen("indexer", Di)
    iq = torch.randn(2, 200, 5, Di, generator=gen).to("cuda", torch.bfloat16)
    ik = torch.randn(2, 150, Di, generator=gen).to("cuda", torch.bfloat16)
    w = torch.rand(2, 200, 5, generator=gen).cuda()
    got = device.indexer_scores(iq, ik, w, slice(30, 171), slice(7, 140))
    logits = torch.einsum("brhd,bkd->brhk", iq[:, 30:171].double(), ik[:, 7:140].double()).relu()
    want = torch.einsum("brhk,brh->brk", logits, w[:, 30:171].double())
    assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


TOKEN_MODS = {
    "alibi+softcap": lambda gen: ((ag.alibi(torch.rand(HQ, generator=gen).cuda() / 8), ag.softcap(20.0)), False),
    "bias+rel_bias": lambda gen: ((ag.bias(), ag.rel_bias(32, 128)), True),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mods", list(TOKEN_MODS))
@pytest.mark.parametrize("scorer", ["exact", "indexer"])
def test_score_mods(scorer, mods, dtype, D):
    """Top-k by token with score modifications: the choice ranks the modified scores (`selected_keys` with the
    call's score_mod) and the kernels (tile kernels, lists as bits) apply them; out, LSE and the gradients of q, k, v
    and of a bias and a T5 table against the reference given that choice."""
    from test_score_mod_gpu import _check_tensor_grad

    for Sq, Sk in [(17, 17), (1000, 1000), (300, 517)]:
        gen = _gen("topk score_mod", scorer, mods, dtype, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        score_mod, additive = TOKEN_MODS[mods](gen)
        tensors = {}
        if additive:
            tensors["bias"] = (torch.randn(B, 1, Sq, Sk, generator=gen) * 2).cuda().requires_grad_()
            tensors["rel_table"] = (torch.randn(HQ, 32, generator=gen) * 2).cuda().requires_grad_()
        pat = ag.causal() & ag.topk(24, scorer=SCORERS[scorer])
        rt = _scorer_inputs(SCORERS[scorer], Sq, Sk, D, gen)
        where = f"{pat!r} {mods} {dtype} D={D} Sq={Sq} Sk={Sk}"
        call = dict(score_mod=score_mod, **tensors)
        lists = ag.selected_keys(q, k, pat, **call, **rt)
        if scorer == "exact":  # the modifications change what the exact scores choose
            assert not torch.equal(lists, ag.selected_keys(q, k, pat, **rt)), where
        got = ag.attention(q, k, v, pat, return_lse=True, **call, **rt)
        want = reference.attention(q, k, v, pat.structure(), dtype=torch.float32, key_indices=lists, **call)
        _check_forward(*got, *want, dtype, where)
        dout = torch.randn_like(got[0])
        inputs = (q, k, v, *tensors.values())
        grads, ref_grads = torch.autograd.grad(got[0], inputs, dout), torch.autograd.grad(want[0], inputs, dout)
        _check_grads(grads[:3], ref_grads[:3], dtype, where)
        for label, g, r in zip(tensors, grads[3:], ref_grads[3:]):
            _check_tensor_grad(label, g, r, dtype, where)


def test_score_mods_choice_matches_the_float64_reference():
    """The fp32 choice of the modified scores (ALiBi, a bias) and the float64 reference's agree on at least 99.5% of
    the rows."""
    gen = _gen("fidelity score_mod")
    Sq = Sk = 1500
    q, k, _ = _inputs(1, HQ, HKV, Sq, Sk, 64, torch.bfloat16, gen)
    bias = torch.randn(1, HQ, Sq, Sk, generator=gen).cuda()
    mods = (ag.alibi(torch.rand(HQ, generator=gen).cuda() / 8), ag.bias())
    pat = ag.causal() & ag.topk(64)
    lists = ag.selected_keys(q, k, pat, score_mod=mods, bias=bias)
    bound = scoremod.bind(mods, q, Sk, bias=bias)
    got = P.dense_mask(ag.key_indices(), Sq, Sk, key_indices=lists, device="cuda")
    want = pat.mask(Sq, Sk, q=q, k=k, device="cuda", scale=64**-0.5, score_mods=bound)
    differ = (got != want.expand_as(got)).any(-1).float().mean().item()
    assert differ < 0.005, f"{differ:.2%} of rows chose other keys"
