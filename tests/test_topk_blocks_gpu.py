"""GPU: block top-k (`topk_blocks(k, block)`) in both kernel families, forward and backward, against
attngen.reference. The selection (fp32 block scores on the GPU, `attngen.selected_blocks`) is checked against the
float64 selection of the reference: equal, except where the k-th and (k+1)-th best candidates of a row are a
near-tie (selection-semantics: within 1e-3 of the row's largest |score|). The attention is then checked against the
reference given that selection, so a near-tie cannot make the comparison flaky. Exact ties (identical key blocks)
go to the lower block index. Patterns: alone, under causal, NSA-like with a window under |, with documents, key
padding and a block layout in the context; GQA, odd and uneven lengths, fp16 and bf16, head dims 64 and 128, blocks
of 64 and 128. Outputs are poisoned (ATTNGEN_POISON_OUTPUTS=1). Skipped cleanly without a CUDA GPU."""

import pytest
import torch
from fuzzing import selection_errors
from test_kernels_gpu import (
    DTYPES,
    FWD_TOL,
    GPU_TESTS,
    _check_call,
    _check_forward,
    _check_grads,
    _gen,
    _grads,
    _inputs,
    _mma_sync_kernels,
    _rel,
)

import attngen as ag
from attngen import reference

pytestmark = GPU_TESTS


_LAYOUT = torch.Generator().manual_seed(5)
PATTERNS = {
    "alone": ag.topk_blocks(3, block=64),
    "causal": ag.causal() & ag.topk_blocks(4, block=128),
    "nsa": ag.causal() & (ag.topk_blocks(2, block=64) | ag.sliding_window(100)),
    "documents": ag.documents() & ag.causal() & ag.topk_blocks(2, block=64),
    "padding|globals": ag.key_padding() & (ag.topk_blocks(2, block=128) | ag.global_tokens(7)),
    "layout": ag.block_layout(torch.rand(70, 70, generator=_LAYOUT) < 0.5, 32) & ag.topk_blocks(3, block=64),
}
MMA_SYNC_PATTERNS = ["causal", "nsa", "documents"]
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (2049, 2049), (300, 517), (517, 300)]
B, HQ, HKV = 2, 8, 2


def _runtime(pat: ag.Pattern, Sq: int, Sk: int, gen: torch.Generator) -> dict:
    rt = {}
    if "document_ids" in pat.runtime_inputs:
        ids = lambda n: (torch.rand(B, n, generator=gen) < 4.0 / n).cumsum(-1).to(torch.int32).cuda()
        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    if "key_lengths" in pat.runtime_inputs:
        rt["key_lengths"] = torch.randint(0, Sk + 1, (B,), generator=gen).to(torch.int32).cuda()
    return rt


def _check_selection(grid, q, k, pat, rt, where: str) -> None:
    """The kernels' selection equals the float64 one, except on rows where a near-tie decides it."""
    assert grid.dtype == torch.bool, where
    errors = selection_errors(grid, q, k, pat, rt)
    assert not errors, f"{errors[0]}: {where}"


def _case(name, dtype, D, Sq, Sk, tag, requires_grad=False):
    pat, gen = PATTERNS[name], _gen(tag, name, dtype, D, Sq, Sk)
    q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=requires_grad)
    rt = _runtime(pat, Sq, Sk, gen)
    grid = ag.selected_blocks(q, k, pat, **rt)
    where = f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}"
    _check_selection(grid, q.detach(), k.detach(), pat, rt, where)
    return pat, gen, (q, k, v), rt, grid, where


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward(name, dtype, D):
    for Sq, Sk in LENGTHS:
        pat, _, (q, k, v), rt, grid, where = _case(name, dtype, D, Sq, Sk, "fwd")
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        ref, ref_lse = reference.attention(q, k, v, pat, selected_blocks=grid, **rt)
        _check_forward(out, lse, ref, ref_lse, dtype, where)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_backward(name, dtype, D):
    for Sq, Sk in LENGTHS:
        pat, gen, (q, k, v), rt, grid, where = _case(name, dtype, D, Sq, Sk, "bwd", requires_grad=True)
        dout = torch.randn(B, HQ, Sq, D, generator=gen).to("cuda", q.dtype)
        got = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
        fn = lambda q, k, v: reference.attention(q, k, v, pat, dtype=torch.float32, selected_blocks=grid, **rt)[0]
        _check_grads(got, _grads(fn, q, k, v, dout), dtype, where)


def test_exact_ties_go_to_the_lower_block():
    """Key blocks that are copies of one another score exactly alike: the lower block indices are kept."""
    gen, bs, S = _gen("ties"), 64, 64 * 12
    q, k, _ = _inputs(1, 4, 2, S, S, 64, torch.float16, gen)
    k = k[:, :, :bs].repeat(1, 1, 12, 1)  # 12 identical key blocks
    grid = ag.selected_blocks(q, k, ag.topk_blocks(5, block=bs))
    assert torch.equal(grid, torch.arange(12, device="cuda").expand(1, 4, 12, 12) < 5)
    grid = ag.selected_blocks(q, k, ag.causal() & ag.topk_blocks(3, block=bs))  # candidates: blocks 0..a
    want = torch.arange(12, device="cuda").view(1, 12) <= torch.arange(12, device="cuda").clamp(max=2).view(12, 1)
    assert torch.equal(grid, want.expand(1, 4, 12, 12))


def test_fewer_candidates_than_k_keeps_the_context():
    """k at least the number of candidates: every allowed block is kept, so the pattern is its context exactly."""
    gen = _gen("all")
    q, k, v = _inputs(2, 8, 2, 1500, 1500, 128, torch.bfloat16, gen)
    got = ag.attention(q, k, v, ag.causal() & ag.topk_blocks(1000, block=128))
    assert torch.equal(got, ag.attention(q, k, v, ag.causal() & ag.topk_blocks(12, block=128)))
    assert _rel(got, ag.attention(q, k, v, ag.causal())) < FWD_TOL["bf16"]


def test_empty_selection_gives_zero_rows_and_gradients():
    gen = _gen("empty")
    q, k, v = _inputs(2, 4, 4, 700, 700, 64, torch.float16, gen, requires_grad=True)
    pat = ag.key_padding() & ag.topk_blocks(2, block=64)
    lengths = torch.tensor([0, 700], dtype=torch.int32, device="cuda")
    out, lse = ag.attention(q, k, v, pat, return_lse=True, key_lengths=lengths)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


def test_candidates_exact_where_tile_classes_are_not():
    """A context whose every atom is partial on a block while their conjunction allows no pair there: the block does
    not compete (Kleene logic alone would let it), so the k kept blocks are the reference's."""
    gen = _gen("exact")
    pat = ag.predicate("k >= q + 70") & ag.predicate("k <= 2*q - 60") & ag.topk_blocks(2, block=64)
    q, k, v = _inputs(1, 2, 2, 640, 640, 64, torch.float16, gen)
    grid = ag.selected_blocks(q, k, pat)
    _check_selection(grid, q, k, pat, {}, "exact candidates")
    out = ag.attention(q, k, v, pat)
    ref, _ = reference.attention(q, k, v, pat, selected_blocks=grid)
    assert _rel(out, ref) < FWD_TOL["fp16"]


def test_backward_deterministic():
    gen = _gen("det")
    pat = ag.causal() & (ag.topk_blocks(4, block=64) | ag.sliding_window(256))
    q, k, v = _inputs(2, 8, 2, 3000, 3000, 128, torch.float16, gen, requires_grad=True)
    dout = torch.randn(2, 8, 3000, 128, generator=gen).to("cuda", torch.float16)
    first = _grads(lambda q, k, v: ag.attention(q, k, v, pat), q, k, v, dout)
    second = _grads(lambda q, k, v: ag.attention(q, k, v, pat), q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU"
)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", MMA_SYNC_PATTERNS)
def test_mma_sync_family_on_hopper(name, D, monkeypatch):
    """The mma.sync kernels (what GPUs other than Hopper run): the same plan with the mma.sync tilings, compiled for
    sm_90 and called through `attention`."""
    from attngen import op

    pat = PATTERNS[name]
    kern = _mma_sync_kernels(pat, D, "bf16")
    monkeypatch.setattr(op, "_compiled_for", lambda structure, q, mods="": kern)
    for Sq, Sk in [(17, 17), (1000, 1000), (300, 517)]:
        _, _, (q, k, v), rt, grid, where = _case(name, "bf16", D, Sq, Sk, "mma.sync", requires_grad=True)
        got = ag.attention(q, k, v, pat, return_lse=True, **rt)
        want = reference.attention(q, k, v, pat, dtype=torch.float32, selected_blocks=grid, **rt)
        _check_call(q, k, v, got, want, "bf16", f"mma.sync {where}")
