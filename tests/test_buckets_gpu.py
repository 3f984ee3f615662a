"""GPU: bucket attention and query/key dropping (`buckets()`, `lsh(n)`, `keep()`) in both kernel families, forward
and backward, against attngen.reference on the original positions: the kernels run on the tokens sorted by bucket
(dropped last) with every other leaf read at the original positions, and the outputs, LSE and gradients come back
in the original order. Random buckets (one, a few, many, all distinct), random keep masks (some tokens, none, all),
GQA, odd and uneven lengths, fp16 and bf16, head dims 64 and 128. Outputs are poisoned (ATTNGEN_POISON_OUTPUTS=1).
Skipped cleanly without a CUDA GPU."""

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
    _reference,
    _rel,
)

import attngen as ag
from attngen import reference

pytestmark = GPU_TESTS


PATTERNS = {
    "causal&buckets": ag.causal() & ag.buckets(),
    "strict&lsh": ag.predicate("k < q") & ag.lsh(8, seed=3),  # SFA's language-model hash
    "causal&keep": ag.causal() & ag.keep(),  # SFA's query/key dropping
    "buckets&keep": ag.buckets() & ag.keep(),
    "window&buckets": ag.sliding_window(300) & ag.buckets(),
    "documents&causal&buckets": ag.documents() & ag.causal() & ag.buckets(),
    "causal&(buckets|globals)": ag.causal() & (ag.buckets() | ag.global_tokens(5)),
    "causal&~buckets": ag.causal() & ~ag.buckets(),
    "padding&lsh&keep": ag.key_padding() & ag.lsh(4, seed=0) & ag.keep(),
}
MMA_SYNC_PATTERNS = ["causal&buckets", "padding&lsh&keep", "documents&causal&buckets"]
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (2049, 2049), (300, 517), (517, 300)]
B, HQ, HKV = 2, 8, 2


def _runtime(pat: ag.Pattern, Sq: int, Sk: int, gen: torch.Generator, n_buckets: int = 3) -> dict:
    rt = {}
    need = pat.runtime_inputs
    if "query_buckets" in need:
        rt["query_buckets"] = torch.randint(0, n_buckets, (B, HQ, Sq), generator=gen).cuda()
        rt["key_buckets"] = torch.randint(0, n_buckets, (B, HKV, Sk), generator=gen).to(torch.int32).cuda()
    if "query_keep" in need:
        rt["query_keep"] = (torch.rand(B, HQ, Sq, generator=gen) < 0.6).cuda()
        rt["key_keep"] = (torch.rand(B, HKV, Sk, generator=gen) < 0.6).cuda()
    if "document_ids" in need:
        ids = lambda n: (torch.rand(B, n, generator=gen) < 4.0 / n).cumsum(-1).to(torch.int32).cuda()
        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    if "key_lengths" in need:
        rt["key_lengths"] = torch.randint(0, Sk + 1, (B,), generator=gen).to(torch.int32).cuda()
    return rt


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward(name, dtype, D):
    pat = PATTERNS[name]
    for Sq, Sk in LENGTHS:
        gen = _gen("fwd", name, dtype, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen)
        rt = _runtime(pat, Sq, Sk, gen)
        out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
        ref, ref_lse = _reference(q, k, v, pat, rt)
        _check_forward(out, lse, ref, ref_lse, dtype, f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_backward(name, dtype, D):
    pat = PATTERNS[name]
    for Sq, Sk in LENGTHS:
        gen = _gen("bwd", name, dtype, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        rt = _runtime(pat, Sq, Sk, gen)
        dout = torch.randn(B, HQ, Sq, D, generator=gen).to("cuda", q.dtype)
        got = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
        ref = _grads(lambda q, k, v: reference.attention(q, k, v, pat, dtype=torch.float32, **rt)[0], q, k, v, dout)
        _check_grads(got, ref, dtype, f"{name} {dtype} D={D} Sq={Sq} Sk={Sk}")
        if "query_keep" in rt:  # a dropped query has no key: zero gradient
            assert (got[0][~rt["query_keep"]] == 0).all()


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["causal&buckets", "strict&lsh", "buckets&keep"])
def test_softcap_and_head_scales(name, dtype, D):
    """A softcap (it reads no position: the sorted tokens' kernels apply it as they are) and head scales, one
    negative (lsh hashes the caller's q): forward and backward against the reference."""
    pat = PATTERNS[name]
    mods = (ag.head_scale(torch.linspace(-1.0, 2.0, HQ, device="cuda")), ag.softcap(5.0))
    for Sq, Sk in [(17, 17), (1000, 1000), (300, 517)]:
        gen = _gen("softcap", name, dtype, D, Sq, Sk)
        q, k, v = _inputs(B, HQ, HKV, Sq, Sk, D, DTYPES[dtype], gen, requires_grad=True)
        rt = _runtime(pat, Sq, Sk, gen)
        got = ag.attention(q, k, v, pat, return_lse=True, score_mod=mods, **rt)
        want = reference.attention(q, k, v, pat, dtype=torch.float32, score_mod=mods, **rt)
        _check_call(q, k, v, got, want, dtype, f"{name} softcap {dtype} D={D} Sq={Sq} Sk={Sk}")


@pytest.mark.parametrize("n_buckets", [1, 16, 4096])
def test_bucket_counts(n_buckets):
    """One bucket (the static pattern itself), a few, and (nearly) all distinct: forward and gradients."""
    pat, Sq = ag.causal() & ag.buckets(), 1500
    gen = _gen("counts", n_buckets)
    q, k, v = _inputs(B, HQ, HKV, Sq, Sq, 64, torch.float16, gen, requires_grad=True)
    rt = _runtime(pat, Sq, Sq, gen, n_buckets)
    out, lse = ag.attention(q, k, v, pat, return_lse=True, **rt)
    ref, ref_lse = _reference(q, k, v, pat, rt)
    _check_forward(out, lse, ref, ref_lse, "fp16", f"{n_buckets} buckets")
    if n_buckets == 1:
        assert _rel(out, ag.attention(q, k, v, ag.causal())) < FWD_TOL["fp16"]
    dout = torch.randn_like(out)
    got = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    want = _grads(lambda q, k, v: reference.attention(q, k, v, pat, dtype=torch.float32, **rt)[0], q, k, v, dout)
    _check_grads(got, want, "fp16", f"{n_buckets} buckets")


def test_all_distinct_buckets_attend_to_themselves():
    """Bucket = position on both sides: each query sees only its own key, so its output is that key's value row."""
    S, gen = 777, _gen("distinct")
    q, k, v = _inputs(1, 4, 4, S, S, 64, torch.bfloat16, gen)
    ids = torch.arange(S, device="cuda").expand(1, 4, S)
    out = ag.attention(q, k, v, ag.causal() & ag.buckets(), query_buckets=ids, key_buckets=ids.to(torch.int32))
    assert torch.equal(out, v)


def test_everything_dropped():
    S, gen = 500, _gen("dropped")
    q, k, v = _inputs(2, 4, 2, S, S, 128, torch.float16, gen, requires_grad=True)
    rt = {"query_keep": torch.zeros(2, 4, S, dtype=torch.bool, device="cuda")}
    rt["key_keep"] = torch.ones(2, 2, S, dtype=torch.bool, device="cuda")
    out, lse = ag.attention(q, k, v, ag.causal() & ag.keep(), return_lse=True, **rt)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all((g == 0).all() for g in grads)
    rt = {"query_keep": ~rt["query_keep"], "key_keep": ~rt["key_keep"]}  # every key dropped instead
    out, lse = ag.attention(q, k, v, ag.causal() & ag.keep(), return_lse=True, **rt)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_lsh_equals_its_buckets():
    """`lsh(n, seed)` is `buckets()` with `lsh_buckets(q, k, n, seed)`, bit for bit, forward and backward."""
    gen = _gen("lsh")
    q, k, v = _inputs(2, 8, 2, 2000, 2000, 64, torch.bfloat16, gen, requires_grad=True)
    qb, kb = ag.lsh_buckets(q, k, 16, seed=11)
    assert qb.shape == (2, 8, 2000) and kb.shape == (2, 2, 2000) and qb.dtype == kb.dtype == torch.int32
    assert 0 <= int(qb.min()) and int(qb.max()) < 16 and len(torch.unique(kb)) > 8
    dout = torch.randn(2, 8, 2000, 64, generator=gen).to("cuda", torch.bfloat16)
    hashed = _grads(lambda q, k, v: ag.attention(q, k, v, ag.causal() & ag.lsh(16, seed=11)), q, k, v, dout)
    given = _grads(
        lambda q, k, v: ag.attention(q, k, v, ag.causal() & ag.buckets(), query_buckets=qb, key_buckets=kb),
        q,
        k,
        v,
        dout,
    )
    assert all(torch.equal(a, b) for a, b in zip(hashed, given))


def test_backward_deterministic_and_fresh_lsh_draws():
    gen = _gen("det")
    q, k, v = _inputs(2, 8, 2, 3000, 3000, 128, torch.float16, gen, requires_grad=True)
    dout = torch.randn(2, 8, 3000, 128, generator=gen).to("cuda", torch.float16)
    rt = _runtime(ag.buckets() & ag.keep(), 3000, 3000, gen, n_buckets=8)
    pat = ag.causal() & ag.buckets() & ag.keep()
    first = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    second = _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    fresh = ag.causal() & ag.lsh(8)  # no seed: a new R each call, so (almost surely) other buckets
    assert not torch.equal(ag.attention(q, k, v, fresh), ag.attention(q, k, v, fresh))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU"
)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", MMA_SYNC_PATTERNS)
def test_mma_sync_family_on_hopper(name, D, monkeypatch):
    """The mma.sync kernels (what GPUs other than Hopper run) on sorted tokens: the same plan with the mma.sync
    tilings, compiled for sm_90 and called through `attention`."""
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


@pytest.mark.parametrize("name", ["causal&buckets", "documents&causal&buckets", "strict&lsh", "causal&keep"])
def test_no_host_synchronisation(name):
    """Hashing, sorting, key ranges, schedules, gathers and kernels, forward and backward, all stay on the GPU: torch
    raises on any device-to-host synchronisation in this mode (int32 bucket ids; int64 ones are range-checked)."""
    pat, gen = PATTERNS[name], _gen("sync", name)
    q, k, v = _inputs(B, HQ, HKV, 1000, 1000, 64, torch.bfloat16, gen, requires_grad=True)
    rt = _runtime(pat, 1000, 1000, gen)
    if "query_buckets" in rt:
        rt["query_buckets"] = rt["query_buckets"].to(torch.int32)
    dout = torch.randn(B, HQ, 1000, 64, generator=gen).to("cuda", torch.bfloat16)
    _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)  # compiles, uploads, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _grads(lambda q, k, v: ag.attention(q, k, v, pat, **rt), q, k, v, dout)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("bm,bn", [(192, 128), (64, 128), (128, 64), (16, 32)])
def test_range_classes_kernel_matches_the_torch_classes(bm, bn, monkeypatch):
    """The one-launch tile classes of key ranges (device.range_classes) against the torch computation, which the CPU
    tests check element by element against the mask: random runs, empty queries, ragged ends."""
    from attngen import device, schedule

    gen = _gen("ranges", bm, bn)
    for Sq, Sk in [(1, 1), (777, 1000), (1000, 777), (4096, 4096)]:
        first = torch.randint(0, Sk, (2, 3, Sq), generator=gen)
        count = torch.minimum(torch.randint(0, Sk // 2 + 2, (2, 3, Sq), generator=gen), Sk - first)
        count[torch.rand(2, 3, Sq, generator=gen) < 0.1] = 0
        ranges = torch.stack([torch.where(count > 0, first, 0), count], -1).to(torch.int32).cuda()
        got = device.range_classes(ranges, bm, bn, Sk)
        with monkeypatch.context() as m:
            m.setattr(device, "range_classes", lambda *a: None)  # the torch path
            want = schedule._key_range_classes(ranges, bm, bn, Sk)
        assert got is not None and torch.equal(got, want), f"Sq={Sq} Sk={Sk}"
