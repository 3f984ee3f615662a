"""Key-index lists (`key_indices()`) without a GPU: the lists as bits (ignored entries, duplicates, both dtypes,
chunked building), the tile classes of the bits against brute force (lists per KV head widened to their query
heads), the dense semantics, the call-time checks and what is refused, and the kernels compiled with NVRTC for both
families without spills."""

import math

import pytest
import torch

import attngen as ag
from attngen import keyindex, schedule
from attngen import pattern as P
from attngen.affine import EMPTY, PARTIAL
from attngen.errors import InputError
from attngen.prepare import Prepared, prepare
from attngen.select import split_selection


def _lists(B, H, Sq, n, Sk, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-2, Sk + 3, (B, H, Sq, n), generator=g)  # -2, -1, Sk, Sk + 1, Sk + 2 are ignored
    idx[..., 1::3] = idx[..., ::3][..., : idx[..., 1::3].shape[-1]]  # duplicates
    return idx.to(dtype)


def _dense(idx, Sk):
    want = torch.zeros(*idx.shape[:3], Sk, dtype=torch.bool)
    for pos in torch.nonzero((idx >= 0) & (idx < Sk)).tolist():
        want[tuple(pos[:3])][idx[tuple(pos)]] = True
    return want


@pytest.mark.parametrize("Sk", [1, 31, 32, 33, 300])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bits_hold_the_listed_keys(Sk, dtype, monkeypatch):
    idx = _lists(2, 3, 37, 9, Sk, Sk, dtype)
    monkeypatch.setattr(keyindex, "CHUNK", 4096)  # several chunks of rows
    words = keyindex.bits(idx, Sk, "cpu")
    assert words.dtype == torch.int32 and words.shape == (2, 3, 37, math.ceil(Sk / 32))
    assert torch.equal(keyindex.unpack(words, Sk), _dense(idx.long(), Sk))
    assert torch.equal(P.dense_mask(ag.key_indices(), 37, Sk, key_indices=idx), _dense(idx.long(), Sk))


def _sorted_reference(idx, Sk):
    """Each row's distinct keys in [0, Sk), increasing, then -1 (a Python set per row)."""
    rows = idx.reshape(-1, idx.shape[-1]).tolist()
    keys = [sorted({k for k in row if 0 <= k < Sk}) for row in rows]
    lists = torch.tensor([ks + [-1] * (idx.shape[-1] - len(ks)) for ks in keys], dtype=torch.int32)
    return lists.view(idx.shape), torch.tensor([len(ks) for ks in keys], dtype=torch.int32).view(idx.shape[:-1])


@pytest.mark.parametrize("Sk", [1, 33, 300])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_sorted_lists_hold_each_listed_key_once(Sk, dtype):
    """What the gather kernels walk: distinct keys in [0, Sk), increasing, -1 after them, and their number; -1,
    out-of-range (also past int32, given as int64) and repeated entries dropped."""
    idx = _lists(2, 3, 37, 9, Sk, Sk, dtype)
    if dtype == torch.int64:
        idx[0, 0, 0, :2] = torch.tensor([2**40, -(2**33)])
    bits, lists, counts = keyindex.sorted_lists(idx, Sk, "cpu")
    want_lists, want_counts = _sorted_reference(idx, Sk)
    assert torch.equal(lists, want_lists) and torch.equal(counts, want_counts)
    assert torch.equal(bits, keyindex.bits(idx, Sk, "cpu"))
    bits, lists, counts = keyindex.sorted_lists(torch.zeros(2, 1, 5, 0, dtype=dtype), Sk, "cpu")
    assert lists.shape == (2, 1, 5, 0) and torch.equal(counts, torch.zeros(2, 1, 5, dtype=torch.int32))


def test_empty_lists_and_no_lists():
    assert not keyindex.unpack(keyindex.bits(torch.full((1, 1, 5, 4), -1), 70, "cpu"), 70).any()
    assert not keyindex.unpack(keyindex.bits(torch.zeros(1, 1, 5, 0, dtype=torch.int32), 70, "cpu"), 70).any()
    for shape in ((0, 2, 5, 3), (1, 2, 0, 3)):  # no batch, no query
        lists = torch.zeros(shape, dtype=torch.int32)
        assert keyindex.bits(lists, 70, "cpu").shape == (*shape[:3], 3)
        assert keyindex.tile_classes(lists, 64, 64, shape[2], 70, 1).numel() == 0


@pytest.mark.parametrize("bm,bn", [(64, 64), (128, 48), (192, 128), (16, 32)])
@pytest.mark.parametrize("group", [1, 3])
def test_tile_classes_of_the_lists(bm, bn, group, monkeypatch):
    monkeypatch.setattr(keyindex, "CHUNK", 5000)  # several chunks of rows
    Sq, Sk = 333, 290
    idx = _lists(2, 2, Sq, 40, Sk, bm + bn)
    idx[0, 0, :64] = torch.arange(40)  # the first rows list keys 0..39 (full tiles where bn, bm allow)
    dense = _dense(idx, Sk).repeat_interleave(group, dim=1)
    got = keyindex.tile_classes(idx, bm, bn, Sq, Sk, group)
    for t in range(math.ceil(Sq / bm)):
        for u in range(math.ceil(Sk / bn)):
            cell = dense[..., t * bm : (t + 1) * bm, u * bn : (u + 1) * bn].flatten(-2)
            want = torch.where(cell.any(-1), PARTIAL, EMPTY).to(torch.int8)  # never FULL: the bits are always read
            assert torch.equal(got[..., t, u], want), (t, u)


def test_schedule_widens_kv_head_lists_to_query_heads():
    idx = _lists(1, 2, 100, 5, 100, 1)
    prep = Prepared(key_bits=keyindex.bits(idx, 100, "cpu"), key_lists=idx)
    cls = schedule.classes(ag.key_indices(), 16, 16, 100, 100, "cpu", prep, heads=6)
    assert cls.shape == (1, 6, 7, 7)
    assert torch.equal(cls[:, :3], cls[:, :1].expand(1, 3, 7, 7)) and torch.equal(
        cls[:, 3:], cls[:, 3:4].expand(1, 3, 7, 7)
    )


def test_reference_mask_widens_and_composes():
    idx = _lists(2, 2, 50, 6, 60, 3)
    q = torch.zeros(2, 4, 50, 16)
    m = P.dense_mask(ag.causal() & ~ag.key_indices(), 50, 60, key_indices=idx, q=q)
    want = _dense(idx, 60).repeat_interleave(2, dim=1)
    assert torch.equal(m, ~want & (torch.arange(60) <= torch.arange(50)[:, None]))


def _prep(pat, indices, B=2, Hq=4, Hkv=2, Sq=50, Sk=60):
    q = torch.zeros(B, Hq, Sq, 16, dtype=torch.float16)
    k = torch.zeros(B, Hkv, Sk, 16, dtype=torch.float16)
    return prepare(pat, q, k, {"document_ids": None, "key_lengths": None, "key_indices": indices})


def test_call_time_checks():
    pat = ag.key_indices()
    for bad, match in [
        (torch.zeros(2, 4, 50, 3), "int32 or int64"),
        ([[0]], "int32 or int64"),
        (torch.zeros(2, 3, 50, 3, dtype=torch.int32), r"H=2 or 4"),
        (torch.zeros(2, 4, 49, 3, dtype=torch.int32), "Sq=50"),
        (torch.zeros(1, 4, 50, 3, dtype=torch.int32), "B=2"),
        (torch.zeros(2, 4, 50, 3, dtype=torch.int32, device="meta"), "meta"),
    ]:
        with pytest.raises(InputError, match=match):
            _prep(pat, bad)
    with pytest.raises(InputError, match="needs key_indices="):
        _prep(pat, None)
    for heads in (2, 4):  # per KV head or per query head
        prep = _prep(pat, torch.zeros(2, heads, 50, 3, dtype=torch.int32))
        assert prep.key_bits.shape == (2, heads, 50, 2) and prep.key_lists.shape == (2, heads, 50, 3)


def test_refused_with_reordering():
    with pytest.raises(InputError, match="key_indices"):
        split_selection(ag.causal() & ag.buckets() & ag.key_indices())


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_without_spills(arch, head_dim):
    """`rest & key_indices()` runs the gather kernels (their dK/dV reads the bits), other uses the ordinary kernels
    with the bits in their mask."""
    gathered, ordinary = ag.causal() & ag.key_indices(), ag.causal() & (ag.key_indices() | ag.sliding_window(64))
    for pat, markers in ((gathered, ("attngen gather forward", "tile_rows")), (ordinary, ("kbits[", "kbits["))):
        kern = ag.compile(pat, head_dim=head_dim, dtype="bf16", arch=arch)
        assert markers[0] in kern.source and markers[1] in kern.backward_source
        assert (kern.kernel_plan.gather is not None) == (pat is gathered)
        binaries = {"attngen_fwd": kern.forward_binary}
        binaries |= {e: kern.backward_binary for e in ("attngen_bwd_dkdv", "attngen_bwd_dq")}
        for entry, binary in binaries.items():
            res = binary.resources_of(entry)
            assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{pat} {entry}: {res}"


def test_calls_match_the_reference_and_trace(reference_kernels):
    """`attention` end to end on the CPU with the kernels replaced by the reference, eager and under torch.compile
    (one graph: turning the lists into bits traces): the lists reach the op as given (and as bits), output and
    gradients are the reference's."""
    from attngen import reference

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 90, 32, generator=g).half().requires_grad_()
    k, v = (torch.randn(2, 2, 70, 32, generator=g).half().requires_grad_() for _ in range(2))
    idx = _lists(2, 2, 90, 12, 70, 5).to(torch.int32)
    pat = ag.causal() & (ag.key_indices() | ag.sliding_window(4))
    out, lse = ag.attention(q, k, v, pat, return_lse=True, key_indices=idx)
    ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float32, key_indices=idx)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.allclose(out.float(), ref, atol=2e-3, rtol=2e-3)
    dout = torch.randn(out.shape, generator=g).half()
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.float())):
        assert torch.allclose(got.float(), want.float(), atol=5e-3, rtol=5e-3)
    call = reference_kernels.calls[0]
    assert torch.equal(call.prep.key_lists, keyindex.sorted_lists(idx, 70, "cpu")[1])
    assert call.prep.key_bits.shape == (2, 2, 90, 3)

    def fn(q, k, v):
        return ag.attention(q, k, v, pat, key_indices=idx)

    assert torch.equal(torch.compile(fn, backend="eager", fullgraph=True)(q, k, v), fn(q, k, v))
