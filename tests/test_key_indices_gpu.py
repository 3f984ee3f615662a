"""GPU: key-index lists (`key_indices()`) in both kernel families, forward and backward, against attngen.reference:
lists per KV head (shared by the group's query heads) and per query head, with -1 padding, out-of-range entries and
duplicates, composed with causal, a window under |, documents, ~; empty lists give 0 rows, LSE -inf and zero
gradients; GQA, odd and uneven lengths, fp16 and bf16, head dims 64 and 128. Outputs are poisoned
(ATTNGEN_POISON_OUTPUTS=1). Skipped cleanly without a CUDA GPU."""

import pytest
import torch
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


PATTERNS = {
    "alone": ag.key_indices(),
    "causal": ag.causal() & ag.key_indices(),
    "causal&(indices|window)": ag.causal() & (ag.key_indices() | ag.sliding_window(64)),
    "documents&indices": ag.documents() & ag.key_indices(),
    "causal&~indices": ag.causal() & ~ag.key_indices(),
}
GATHERED = ["alone", "causal", "documents&indices"]  # `rest & key_indices()`: the gather kernels
MMA_SYNC_PATTERNS = ["causal&(indices|window)", "causal&~indices"]  # the ordinary kernels, bits in the mask
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (2049, 2049), (300, 517), (517, 300)]
B, HQ, HKV = 2, 8, 2


def _runtime(pat, Sq, Sk, gen, heads=HKV, n=48, dtype=torch.int32) -> dict:
    idx = torch.randint(0, Sk, (B, heads, Sq, n), generator=gen)
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
    idx[..., -1] = Sk + 7  # out of range: ignored
    idx[..., 1] = idx[..., 0]  # a duplicate
    rt = {"key_indices": idx.to(dtype).cuda()}
    if "document_ids" in pat.runtime_inputs:
        ids = lambda s: (torch.rand(B, s, generator=gen) < 4.0 / s).cumsum(-1).to(torch.int32).cuda()
        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    return rt


@pytest.mark.parametrize("heads", [HKV, HQ])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward(name, dtype, D, heads):
    pat = PATTERNS[name]
    for Sq, Sk in LENGTHS:
        gen = _gen("fwd", name, dtype, D, heads, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen)
        rt = _runtime(pat, Sq, Sk, gen, heads, dtype=torch.int64 if heads == HQ else torch.int32)
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        ref, ref_lse = reference.attention(q, k, v, pat, **rt)
        _check_forward(out, lse, ref, ref_lse, dtype, f"{name} {dtype} D={D} lists of {heads} heads Sq={Sq} Sk={Sk}")


@pytest.mark.parametrize("heads", [HKV, HQ])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_backward(name, dtype, D, heads):
    pat = PATTERNS[name]
    for Sq, Sk in LENGTHS:
        gen = _gen("bwd", name, dtype, D, heads, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        rt = _runtime(pat, Sq, Sk, gen, heads)
        dout = torch.randn(B, HQ, Sq, D, generator=gen).to("cuda", q.dtype)
        got = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
        want = _grads(lambda q, k, v: reference.attention(q, k, v, pat, dtype=torch.float32, **rt)[0], q, k, v, dout)
        _check_grads(got, want, dtype, f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}")


def test_empty_lists_give_zero_rows_and_gradients():
    gen = _gen("empty")
    q, k, v = _inputs(B, HQ, HKV, 700, 700, 64, torch.float16, gen, requires_grad=True)
    idx = torch.full((B, HKV, 700, 16), -1, dtype=torch.int32, device="cuda")
    idx[1, :, :, 0] = torch.arange(700, device="cuda")  # batch 1: each query its own key only
    out, lse = ag.attention(q, k, v, ag.key_indices(), return_lse=True, key_indices=idx)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1], v[1].detach().repeat_interleave(HQ // HKV, dim=0))  # one key: its value row
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


def test_lists_equal_the_dense_pattern_they_spell():
    """Every key up to the query listed: causal attention, to the kernels' rounding."""
    gen = _gen("causal")
    q, k, v = _inputs(1, 4, 1, 300, 300, 128, torch.bfloat16, gen)
    idx = torch.arange(300, device="cuda").expand(1, 1, 300, 300)
    idx = torch.where(idx <= torch.arange(300, device="cuda")[:, None], idx, -1).to(torch.int32)
    got = ag.attention(q, k, v, ag.key_indices(), key_indices=idx)
    assert _rel(got, ag.attention(q, k, v, ag.causal())) < FWD_TOL["bf16"]


@pytest.mark.parametrize("name", ["causal", "causal&(indices|window)"])
def test_backward_deterministic(name):
    gen = _gen("det", name)
    pat = PATTERNS[name]
    q, k, v = _inputs(B, HQ, HKV, 3000, 3000, 128, torch.float16, gen, requires_grad=True)
    rt = _runtime(pat, 3000, 3000, gen, n=256)
    dout = torch.randn(B, HQ, 3000, 128, generator=gen).to("cuda", torch.float16)
    first = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    second = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU"
)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", MMA_SYNC_PATTERNS)
def test_mma_sync_family_on_hopper(name, D, monkeypatch):
    from attngen import op

    pat = PATTERNS[name]
    kern = _mma_sync_kernels(pat, D, "bf16")
    monkeypatch.setattr(op, "_compiled_for", lambda structure, q, mods="": kern)
    for Sq, Sk in [(17, 17), (1000, 1000), (300, 517)]:
        gen = _gen("mma.sync", name, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, torch.bfloat16, gen, requires_grad=True)
        rt = _runtime(pat, Sq, Sk, gen)
        where = f"mma.sync {name} D={D} Sq={Sq} Sk={Sk}"
        got = ag.attention(q, k, v, pat, return_lse=True, **rt)
        want = reference.attention(q, k, v, pat, dtype=torch.float32, **rt)
        _check_call(q, k, v, got, want, "bf16", where)


@pytest.mark.parametrize("Hq,Hkv,heads", [(20, 1, 1), (4, 4, 4), (6, 2, 6)])
def test_gather_groups_of_any_size(Hq, Hkv, heads):
    """The gather kernels' rows are 16 heads sharing a list: 20 heads of one KV head (16 + 4 rows), one head per
    KV head, and per-query-head lists (one row each): forward and gradients against the reference."""
    pat = PATTERNS["causal"]
    for Sq, Sk in [(33, 33), (777, 777), (200, 401)]:
        gen = _gen("groups", Hq, Hkv, heads, Sq, Sk)
        q, k, v = _inputs(1, Hq, Hkv, Sq, Sk, 64, torch.bfloat16, gen, requires_grad=True)
        idx = torch.randint(-1, Sk, (1, heads, Sq, 40), generator=gen).to(torch.int32).cuda()
        where = f"Hq={Hq} Hkv={Hkv} lists of {heads} heads Sq={Sq} Sk={Sk}"
        got = ag.attention(q, k, v, pat, return_lse=True, key_indices=idx)
        want = reference.attention(q, k, v, pat, dtype=torch.float32, key_indices=idx)
        _check_call(q, k, v, got, want, "bf16", where)


def test_list_kernels_match_their_definitions():
    """device.key_lists (sorted distinct keys, -1, counts, bits) against keyindex's torch form, and device.tile_rows
    (the inverse lists at 16 keys) against a scan of the bits in Python."""
    from attngen import device, keyindex

    gen = _gen("lists")
    Sk = 1000
    idx = torch.randint(-3, Sk + 3, (2, 3, 130, 70), generator=gen)
    idx[..., 1::2] = idx[..., ::2]  # duplicates
    idx[0, 0, 5] = -1  # an empty row
    want = keyindex.sorted_lists(idx, Sk, "cpu")
    got = keyindex.sorted_lists(idx.cuda(), Sk, "cuda")
    for name, a, b in zip(("bits", "lists", "counts"), got, want):
        assert torch.equal(a.cpu(), b), name
    bits = got[0]
    rows, start, count = device.tile_rows(bits, Sk)
    listed = keyindex.unpack(bits.cpu(), Sk)  # [2, 3, 130, Sk]
    tiles = -(-Sk // 16)
    for b in range(2):
        for h in range(3):
            for t in (0, 1, 31, tiles - 1):
                want_rows = torch.nonzero(listed[b, h, :, 16 * t : 16 * t + 16].any(-1)).flatten().int()
                s, n = int(start[b, h, t]), int(count[b, h, t])
                assert torch.equal(rows[s : s + n].cpu(), want_rows), (b, h, t)
    assert int(count.sum()) == int(sum(listed[..., 16 * t : 16 * t + 16].any(-1).sum() for t in range(tiles)))


def test_lists_of_no_entries():
    gen = _gen("no entries")
    q, k, v = _inputs(1, 4, 2, 50, 50, 64, torch.float16, gen)
    idx = torch.zeros(1, 2, 50, 0, dtype=torch.int32, device="cuda")
    out, lse = ag.attention(q, k, v, PATTERNS["causal"], return_lse=True, key_indices=idx)
    assert (out == 0).all() and torch.isneginf(lse).all()
