"""Score modifications (`softcap`, `alibi`) on the CPU: their reference semantics, the call-time checks, the plan and
the emitted CUDA, and every kernel compiled (NVRTC, no GPU needed) without spills or a stack frame in both kernel
families. tests/test_score_mod_gpu.py checks the kernels against the reference."""

import math

import pytest
import torch
from test_nm_compile import assert_no_spills

import attngen as ag
from attngen import reference, scoremod
from attngen.errors import InputError
from attngen.plan import make_plan
from attngen.prepare import Prepared

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def test_softcap_and_alibi_reference_semantics():
    """s -> c·tanh(s/c), then s + slopes[h]·(k - q') in the order given; q' = q + Sk - Sq bottom-right."""
    s = torch.randn(1, 4, 3, 5, dtype=torch.float64) * 40
    capped = scoremod.reference((ag.softcap(30.0),), s)
    assert torch.allclose(capped, 30 * torch.tanh(s / 30))
    assert capped.abs().max() < 30
    shifted = scoremod.reference((ag.alibi(SLOPES, "bottom_right"),), s)
    h, i, j = 2, 1, 4
    assert math.isclose(shifted[0, h, i, j] - s[0, h, i, j], SLOPES[h].item() * (j - (i + 5 - 3)))
    both = scoremod.reference((ag.alibi(SLOPES), ag.softcap(30.0)), s)
    assert torch.allclose(both, 30 * torch.tanh(scoremod.reference((ag.alibi(SLOPES),), s) / 30))


def test_reference_attention_applies_them_before_the_pattern():
    q, k, v = (torch.randn(1, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    mods = (ag.alibi(SLOPES), ag.softcap(5.0))
    out, lse = reference.attention(q, k, v, ag.causal(), score_mod=mods)
    s = scoremod.reference(mods, q @ k.transpose(-1, -2) / math.sqrt(8))
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(out, torch.softmax(s, -1) @ v) and torch.allclose(lse, torch.logsumexp(s, -1))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: ag.softcap(0), "positive finite"),
        (lambda: ag.softcap(float("inf")), "positive finite"),
        (lambda: ag.softcap("3"), "positive finite"),
        (lambda: ag.alibi(torch.ones(2, 2)), "1-d float tensor"),
        (lambda: ag.alibi(torch.ones(4, dtype=torch.int32)), "1-d float tensor"),
        (lambda: ag.alibi(SLOPES, align="middle"), "align"),
        (lambda: scoremod.normalize((ag.softcap(1.0), ag.softcap(2.0))), "at most one softcap"),
        (lambda: scoremod.normalize(torch.tanh), "score_mod takes"),
        (lambda: scoremod.bind((ag.alibi(SLOPES),), torch.zeros(1, 3, 4, 8), 4), "one per query head"),
    ],
)
def test_bad_modifications_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        bad()


def test_plan_carries_the_modifications_and_alibi_slopes_are_a_runtime_argument():
    p = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=(ag.alibi(SLOPES), ag.softcap(50.0)))
    assert p.score_mods == (scoremod.AlibiSlot(), ag.softcap(50.0)) and p.mod_grad
    assert [a.name for a in p.runtime_args] == ["alibi_slopes"]
    assert "score mod alibi(), softcap(50.0)" in str(p)
    # new slopes are data: the same structure, one compile
    other = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=(ag.alibi(SLOPES * 2),))
    assert other.score_mods == (scoremod.AlibiSlot(),) and not other.mod_grad


def test_gather_kernels_give_way_and_reordered_patterns_take_softcap_only():
    """key_indices() and top-k by token (even the indexer's lists, shared by the heads) with a modification run on the
    tile kernels (lists as bits); buckets take a softcap (it reads no position) and refuse the others."""
    capped = (ag.softcap(9.0),)
    for pat in [ag.causal() & ag.key_indices(), ag.causal() & ag.topk(8, scorer=ag.indexer())]:
        p = make_plan(pat.structure(), head_dim=64, dtype="fp16", arch="sm_80", score_mods=capped)
        assert p.gather is None and "kbits" in [a.name for a in p.runtime_args]
    p = make_plan(ag.causal() & ag.buckets(), head_dim=64, dtype="fp16", arch="sm_80", score_mods=capped)
    assert p.reordered and p.score_mods == capped
    for mods in [(ag.alibi(SLOPES),), (ag.bias(),), (ag.softcap(9.0), ag.rel_bias(8, 20))]:
        with pytest.raises(InputError, match="only softcap"):
            make_plan(ag.causal() & ag.buckets(), head_dim=64, dtype="fp16", arch="sm_80", score_mods=mods)


def test_reordered_calls_with_softcap_and_head_scales(reference_kernels):
    """Buckets, keep masks and lsh with a softcap and head scales (one negative: lsh hashes the caller's q, not q
    scaled per head): the call sorts, the kernels cap, and output and gradients are the reference's."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D = 2, 4, 2, 40, 32
    q = torch.randn(B, Hq, S, D, generator=gen).half().requires_grad_()
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).half().requires_grad_() for _ in range(2))
    rt = {"query_buckets": torch.randint(0, 3, (B, Hq, S), generator=gen)}
    rt |= {"key_buckets": torch.randint(0, 3, (B, Hkv, S), generator=gen)}
    mods = (ag.head_scale(torch.tensor([-1.0, 0.5, 2.0, 1.0])), ag.softcap(2.0))
    for pat, inputs in [(ag.causal() & ag.buckets(), rt), (ag.causal() & ag.lsh(4, seed=7), {})]:
        out, lse = ag.attention(q, k, v, pat, return_lse=True, score_mod=mods, **inputs)
        ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float64, score_mod=mods, **inputs)
        assert torch.allclose(out.double(), ref, atol=5e-3), pat
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(
            lse[finite].double(), ref_lse[finite], atol=1e-3
        )
        dout = torch.randn(out.shape, generator=gen).half()
        for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.double())):
            assert torch.allclose(a.double(), b.double(), atol=2e-2, rtol=1e-2), pat
    with pytest.raises(InputError, match="only softcap and head_scale"):
        ag.attention(q, k, v, ag.causal() & ag.buckets(), score_mod=ag.alibi(SLOPES), **rt)


KERNELS = {
    "causal softcap": (ag.causal(), (ag.softcap(30.0),)),
    "window alibi": (ag.sliding_window(100), (ag.alibi(SLOPES),)),
    "full alibi softcap": (ag.full(), (ag.alibi(SLOPES, "bottom_right"), ag.softcap(20.0))),
    "causal nm softcap": (ag.causal() & ag.nm(2, 4), (ag.softcap(30.0),)),
    "causal topk alibi bias": (ag.causal() & ag.topk(8), (ag.alibi(SLOPES), ag.bias())),
    "buckets softcap": (ag.causal() & ag.buckets() & ag.keep(), (ag.softcap(20.0),)),
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_compile_with_the_hooks_and_without_spills(name, head_dim, arch):
    pat, mods = KERNELS[name]
    kern = ag.compile(pat, head_dim=head_dim, dtype="bf16", arch=arch, score_mod=mods)
    fwd, bwd = kern.source, kern.backward_source
    sweeps = 1 + kern.kernel_plan.dkdv.split  # dK/dV in one sweep, or dK then dV (mma.sync, registers short)
    assert "struct ScoreMod" in fwd and "mod.apply(" in fwd and bwd.count("mod.apply(") == 1 + sweeps
    grads = bwd.count("mod.grad(") + bwd.count("mod.grad_of_p(")
    assert grads == (2 if any(isinstance(m, scoremod.Softcap) for m in mods) else 0)  # dV's sweep needs no dS
    assert_no_spills(kern)


def test_without_modifications_the_kernels_are_unchanged():
    plain = ag.compile(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90")
    assert "ScoreMod" not in plain.source and "ScoreMod" not in plain.backward_source


# ------------------------------------------------------------------------------------ bias() and rel_bias()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256), (6, 9)])
def test_rel_bias_buckets_are_t5s(num_buckets, max_distance, bidirectional):
    """The buckets equal transformers' T5 on every relative position, and the kernels' threshold form equals them."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    spec = ag.rel_bias(num_buckets, max_distance, bidirectional)
    rel = torch.arange(-3 * max_distance, 3 * max_distance)
    want = t5._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(spec.bucket(rel), want)
    n = torch.arange(0, 3 * max_distance)
    by_thresholds = spec.exact + sum((n >= t).long() for t in spec.thresholds())
    assert torch.equal(torch.where(n < spec.exact, n, by_thresholds), spec.distance_bucket(n))


def test_bias_broadcasts_and_is_differentiable_in_the_reference():
    B, Sq, Sk = 2, 5, 7
    q, k, v = torch.randn(B, 4, Sq, 8, dtype=torch.float64), *(torch.randn(B, 2, Sk, 8, dtype=torch.float64),) * 2
    for shape in [(B, 4, Sq, Sk), (1, 4, Sq, Sk), (Sq, Sk), (B, 1, 1, Sk), (Sk,)]:
        bias = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        out, _ = reference.attention(q, k, v, ag.causal(), score_mod=ag.bias(), bias=bias)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / math.sqrt(8) + bias
        s = s.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool).tril(), float("-inf"))
        assert torch.allclose(out, torch.softmax(s, -1) @ v.repeat_interleave(2, 1))
        (grad,) = torch.autograd.grad(out.sum(), bias)
        assert grad.shape == bias.shape and grad.abs().sum() > 0


@pytest.mark.parametrize("Sq, Sk", [(1, 1), (5, 9), (9, 5), (33, 33)])
def test_t5_table_gradient_from_the_score_gradient(Sq, Sk):
    """scoremod.tensor_grads: the bias's gradient is dL/ds itself, the T5 table's its sums over each bucket's
    diagonals; both equal autograd through the reference (float64)."""
    spec = ag.rel_bias(8, 6)
    table = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 3, Sq, Sk, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, Sq, Sk, dtype=torch.float64)
    q = torch.empty(2, 3, Sq, 4, dtype=torch.float64)
    mods = scoremod.bind((ag.bias(), spec), q, Sk, bias=bias, rel_table=table)
    upstream = torch.randn(2, 3, Sq, Sk, dtype=torch.float64)
    modified = scoremod.reference(mods, s)
    want = torch.autograd.grad(modified, (bias, table), upstream)
    tensors = scoremod.kernel_tensors(mods)
    got = scoremod.tensor_grads(scoremod.structures(mods), tensors, upstream.float())
    assert torch.allclose(got[0].double(), want[0], atol=1e-6) and torch.allclose(got[1].double(), want[1], atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: scoremod.bind((ag.bias(),), q, 6), "needs the call's bias="),
        (lambda q: scoremod.bind((), q, 6, bias=torch.zeros(6)), "no ag.bias"),
        (lambda q: scoremod.bind((ag.bias(),), q, 6, bias=torch.zeros(3, 6)), "does not broadcast"),
        (lambda q: scoremod.bind((ag.bias(),), q, 6, bias=torch.zeros(2, 4, 5, 6, 1)), "does not broadcast"),
        (lambda q: scoremod.bind((ag.bias(),), q, 6, bias=torch.zeros(5, 6, dtype=torch.bool)), "float tensor"),
        (lambda q: scoremod.bind((ag.rel_bias(8, 20),), q, 6), "needs the call's rel_table="),
        (lambda q: scoremod.bind((ag.rel_bias(8, 20),), q, 6, rel_table=torch.zeros(4, 9)), r"\[4, 8\]"),
        (lambda q: ag.rel_bias(7, 20), "even number"),
        (lambda q: ag.rel_bias(8, 2), "max_distance"),
        (lambda q: ag.rel_bias(8.0, 20), "must be an int"),
        (lambda q: scoremod.normalize((ag.bias(), ag.bias())), "at most one bias"),
        (lambda q: scoremod.normalize((ag.bias(), ag.softcap(2.0), ag.rel_bias())), "between bias"),
    ],
)
def test_bad_bias_and_rel_bias_are_refused(call, match):
    with pytest.raises(InputError, match=match):
        call(torch.zeros(2, 4, 5, 8))


@pytest.mark.parametrize("Sk", [8, 9])
@pytest.mark.parametrize(
    "make",
    [
        lambda Sk: torch.randn(1, 3, Sk, 8).transpose(-1, -2),  # keys strided
        lambda Sk: torch.randn(1, 3, 8, Sk + 1, dtype=torch.float16)[..., 1:],  # off a pair's address or odd pitch
        lambda Sk: torch.randn(8, 1).expand(8, Sk),  # keys broadcast
        lambda Sk: torch.randn(2, 1, 1, Sk),  # one row per batch element: heads and queries broadcast
        lambda Sk: torch.randn(Sk),  # one row for all
        lambda Sk: torch.randn(2, 3, 8, Sk),  # as it is when Sk is even
    ],
    ids=["transposed", "offset", "keys broadcast", "per batch", "one row", "dense"],
)
def test_a_bias_is_bound_as_the_kernels_read_it(make, Sk):
    """Whatever its layout, the bound bias has the same values, keys adjacent from an aligned pair with an even
    row pitch (copied where needed, its broadcast dims left broadcast); `bind` re-pairs a view whose address only
    the launch knows (a traced call) the same way."""
    q = torch.zeros(2, 3, 8, 16, dtype=torch.float16)
    bias = make(Sk).to(torch.float16)
    (bound,) = scoremod.bind((ag.bias(),), q, Sk, bias=bias)
    view = bound.tensors()[0]
    assert scoremod.pairable(view) and torch.equal(view, bias.expand(2, 3, 8, Sk))
    *_, row, key = view.stride()
    assert key == 1 and row % 2 == 0 and view.data_ptr() % 4 == 0
    sizes = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    assert all(st == 0 for st, n in zip(view.stride()[:3], sizes) if n == 1)  # no copy along broadcast dims
    if bias.dim() == 4 and bias.is_contiguous() and Sk % 2 == 0:
        assert view.data_ptr() == bias.data_ptr()  # read in place, no copy

    # What the launch does with a view that passed on its strides alone: one element off a pair's address.
    odd = torch.randn(1, 3, 8, Sk + 2, dtype=torch.float16)[..., 1 : Sk + 1].expand(2, 3, 8, Sk)
    assert not scoremod.pairable(odd)
    plan = make_plan(ag.full(), head_dim=64, dtype="fp16", arch="sm_90", score_mods=(ag.bias(),))
    (again,) = Prepared.from_tensors(plan, [odd]).score_mod
    assert scoremod.pairable(again) and torch.equal(again, odd) and again.stride(0) == 0
    assert Prepared.from_tensors(plan, [view]).score_mod[0] is view  # a bound view is read as it is


@pytest.mark.parametrize("Sk", [8, 9])
def test_the_last_pair_of_a_row_stays_in_storage(Sk):
    """With Sk odd the kernels read one element past a row's last key: a view is read as it is only where that
    element is in its storage. Rows of pitch 10: the last row of a [3, 2, 10] tensor has two spare elements, the
    last row of a storage cut right after its last key has none."""
    padded = torch.randn(3, 2, 10, dtype=torch.float16)[..., :Sk].unsqueeze(0)
    assert scoremod.pairable(padded)
    cut = torch.randn(5 * 10 + Sk, dtype=torch.float16).as_strided((1, 3, 2, Sk), (0, 20, 10, 1))
    assert scoremod.pairable(cut) == (Sk % 2 == 0)
    assert torch.equal(scoremod.paired(cut), cut) and scoremod.pairable(scoremod.paired(cut))


def test_plan_of_a_bias_and_a_t5_table():
    """Their tensors are run-time arguments (a bias with its four strides), then where dL/ds goes; the bias's dtype
    is the structure, its values and strides are not."""
    mods = (ag.softcap(9.0), ag.rel_bias(32, 128), scoremod.Bias("float32"))
    p = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=mods)
    names = [a.name for a in p.runtime_args]
    assert names == ["rel_table", "bias", "bias_sb", "bias_sh", "bias_sq", "bias_sk", "score_grad"]
    assert p.score_grad and not p.score_grad_capped and p.mod_grad
    before = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=(ag.bias(), ag.softcap(9.0)))
    assert before.score_grad_capped and "const elem_t * __restrict__ bias" in map(str, before.runtime_args)
    assert "elem_t * __restrict__ score_grad" in map(str, before.runtime_args)  # written in the bias's dtype
    assert "float * __restrict__ score_grad" in map(str, p.runtime_args)  # summed in fp32 for the table


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "mods",
    [
        (ag.bias(),),
        (ag.rel_bias(32, 128),),
        (ag.rel_bias(16, 40, False), ag.softcap(5.0)),
        (ag.bias(), ag.softcap(5.0)),
    ],
    ids=["bias", "rel_bias", "rel_bias softcap", "bias softcap"],
)
def test_additive_kernels_compile_with_their_hooks_and_without_spills(mods, head_dim, arch):
    """A bias and a T5 table before any softcap: the kernels read them in apply, and the dK/dV kernel writes dL/ds.
    (After a softcap, the backward re-reads them to undo them before the softcap's derivative; those kernels can
    spill: docs/performance.md, Score modifications.)"""
    kern = ag.compile(ag.causal(), head_dim=head_dim, dtype="bf16", arch=arch, score_mod=mods)
    fwd, bwd = kern.source, kern.backward_source
    assert "struct ScoreMod" in fwd and "mod.store_grad(" in bwd and "* __restrict__ score_grad" in bwd
    assert ("bias_at(" in fwd) == isinstance(mods[0], scoremod.Bias) and ("rel_bucket(" in fwd) != ("bias_at(" in fwd)
    assert_no_spills(kern)


@pytest.mark.parametrize(("arch", "head_dim"), [("sm_80", 64), ("sm_80", 128), ("sm_90", 64), ("sm_90", 128)])
def test_a_bias_after_a_softcap_compiles_without_spills(arch, head_dim):
    """The backward undoes a bias that follows a softcap before the softcap's derivative, which costs registers; the
    sm_90a dQ at head dim 64 then steps to tiles of 64 keys (`tiling.leaner`) and keeps everything in registers;
    at head dim 128 with NVRTC 13.0, dK/dV steps to query steps of 32 rows."""
    kern = ag.compile(ag.causal(), head_dim=head_dim, dtype="bf16", arch=arch, score_mod=(ag.softcap(5.0), ag.bias()))
    assert_no_spills(kern)


@pytest.mark.parametrize(
    ("arch", "head_dim", "mods"),
    [
        ("sm_90", 128, (ag.alibi(SLOPES), ag.rel_bias(32, 128), ag.bias())),
        ("sm_80", 64, (ag.softcap(5.0), ag.alibi(SLOPES), ag.rel_bias(32, 128), ag.bias())),
    ],
    ids=["alibi rel_bias bias sm_90a D128", "softcap alibi rel_bias bias sm_80 D64"],
)
def test_three_additive_terms_compile_without_spills(arch, head_dim, mods):
    """The backward kernels step down to query steps of 32 rows (dK/dV; dQ to key steps of 64), where all three
    additive terms (and a softcap before them) fit in registers. (Still spilling: all four at sm_90a head dim 128,
    12 bytes in dK/dV with NVRTC 13.5, 64 with 13.0.)"""
    kern = ag.compile(ag.causal(), head_dim=head_dim, dtype="fp16", arch=arch, score_mod=mods)
    assert_no_spills(kern)
    final = kern.compiled.plan  # the tilings chosen, once the backward is built
    assert final.dkdv.block_m == 32 and (arch == "sm_90" or final.dq.block_n == 64)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
@pytest.mark.parametrize(
    "mods",
    [(ag.bias(),), (ag.softcap(2.0), ag.bias()), (ag.alibi(SLOPES), ag.rel_bias(8, 20), ag.bias(), ag.softcap(3.0))],
    ids=["bias", "softcap bias", "alibi rel_bias bias softcap"],
)
def test_calls_differentiate_the_bias_and_the_table(mods, compiled, reference_kernels):
    """Through the custom op (eager, and traced with fullgraph=True), the gradients of q, k, v, a broadcast bias and
    a T5 table equal the reference's (the kernels replaced by the float32 reference, dL/ds written as the dK/dV
    kernel writes it); a bias that needs no gradient gets none and no buffer is asked for."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, n, 32, generator=gen).to(torch.bfloat16).requires_grad_() for n in (9, 11, 11))
    bias = torch.randn(1, 4, 9, 11, generator=gen).requires_grad_()
    table = torch.randn(4, 8, generator=gen).requires_grad_()
    tensors = {"bias": bias} | ({"rel_table": table} if any(isinstance(m, scoremod.RelBias) for m in mods) else {})

    pat = ag.causal()  # built outside the compiled region

    def call(q, k, v, tensors):
        return ag.attention(q, k, v, pat, score_mod=mods, **tensors)

    fn = torch.compile(call, fullgraph=True, backend="eager") if compiled else call
    out = fn(q, k, v, tensors)
    ref, _ = reference.attention(q, k, v, ag.causal(), dtype=torch.float64, score_mod=mods, **tensors)
    assert (out.double() - ref).abs().max() < 2e-2
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    inputs = (q, k, v, *tensors.values())
    got, want = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout.double())
    for g, w in zip(got, want):
        assert g.shape == w.shape and ((g.double() - w).norm() / w.norm()) < 2e-2
    frozen = {name: t.detach() for name, t in tensors.items()}
    (dq,) = torch.autograd.grad(fn(q, k, v, frozen), (q,), dout)
    assert torch.allclose(dq, got[0], atol=1e-2)


# ---------------------------------------------------------------------------------------------- head scales


def _scales(requires_grad: bool = True) -> torch.Tensor:
    return torch.tensor([0.5, 1.0, 2.0, -1.5]).requires_grad_(requires_grad)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
@pytest.mark.parametrize(
    "order",
    ["scale", "scale softcap", "bias rel_bias scale softcap", "rel_bias scale bias", "alibi scale", "scale scale"],
)
def test_head_scales_fold_into_q_and_the_terms_before_them(order, compiled, reference_kernels):
    """s -> scales[h] · s anywhere before a softcap: out and the gradients of q, k, v, the bias, the T5 table and the
    scales equal the reference's, which applies the scale itself; the kernels are those without it."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, n, 32, generator=gen).to(torch.bfloat16).requires_grad_() for n in (9, 11, 11))
    bias = torch.randn(9, 11, generator=gen).requires_grad_()
    table = torch.randn(4, 8, generator=gen).requires_grad_()
    scales = _scales(requires_grad="alibi" not in order)
    make = {
        "scale": lambda: ag.head_scale(scales),
        "softcap": lambda: ag.softcap(3.0),
        "bias": ag.bias,
        "rel_bias": lambda: ag.rel_bias(8, 20),
        "alibi": lambda: ag.alibi(SLOPES),
    }
    mods = tuple(make[name]() for name in order.split())
    tensors = {"bias": bias} if "bias" in order.split() else {}
    tensors |= {"rel_table": table} if "rel_bias" in order else {}
    pat = ag.causal()

    def call(q, k, v, tensors):
        return ag.attention(q, k, v, pat, score_mod=mods, **tensors)

    fn = torch.compile(call, fullgraph=True, backend="eager") if compiled else call
    out = fn(q, k, v, tensors)
    assert all(not isinstance(m, scoremod.HeadScale) for m in reference_kernels.calls[-1].mods)
    ref, _ = reference.attention(q, k, v, pat, dtype=torch.float64, score_mod=mods, **tensors)
    assert (out.double() - ref).abs().max() < 3e-2
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    inputs = (q, k, v, *tensors.values(), *((scales,) if scales.requires_grad else ()))
    got, want = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout.double())
    for g, w in zip(got, want):
        assert g.shape == w.shape and ((g.double() - w).norm() / w.norm()) < 3e-2


def test_head_scale_reference_semantics():
    q, k = torch.randn(1, 4, 5, 8, dtype=torch.float64), torch.randn(1, 4, 6, 8, dtype=torch.float64)
    v = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    scales = _scales(False).double()
    out, lse = reference.attention(q, k, v, ag.full(), score_mod=ag.head_scale(scales))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8) * scales.view(1, 4, 1, 1)
    assert torch.allclose(lse, torch.logsumexp(s, -1)) and torch.allclose(out, torch.softmax(s, -1) @ v)


def test_head_scale_needs_no_kernel_of_its_own():
    plain = ag.compile(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mod=ag.softcap(5.0))
    scaled = ag.compile(
        ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mod=(ag.head_scale(_scales(False)), ag.softcap(5.0))
    )
    assert scaled.compiled is plain.compiled


@pytest.mark.parametrize(
    ("mods", "match"),
    [
        (lambda: (ag.softcap(5.0), ag.head_scale(_scales())), "head_scale after a softcap"),
        (lambda: (ag.alibi(SLOPES), ag.head_scale(_scales())), "takes no gradient"),
        (lambda: ag.head_scale(torch.ones(3)), r"one scale per query head .*\[4\]"),
        (lambda: ag.head_scale(torch.ones(4, 1)), "1-d float tensor"),
        (lambda: ag.head_scale(torch.ones(4, dtype=torch.int64)), "1-d float tensor"),
    ],
)
def test_what_head_scale_refuses(mods, match, reference_kernels):
    q = torch.randn(1, 4, 5, 32).to(torch.bfloat16)
    with pytest.raises(InputError, match=match):
        ag.attention(q, q, q, ag.causal(), score_mod=mods())


@pytest.mark.parametrize(
    ("tensors", "mod", "match"),
    [
        ({"bias": torch.randn(1, 3, 5, 5)}, ag.bias, r"bias= of shape \(1, 3, 5, 5\) does not broadcast"),
        ({"bias": torch.randn(1, 1, 1, 5, 5)}, ag.bias, r"bias= of shape \(1, 1, 1, 5, 5\) does not broadcast"),
        ({"bias": torch.ones(5, 5, dtype=torch.int32)}, ag.bias, "bias= must be a float tensor"),
        ({"rel_table": torch.randn(3, 8)}, lambda: ag.rel_bias(8, 20), r"rel_table= must be \[Hq, num_buckets\]"),
    ],
)
def test_a_head_scale_leaves_bad_tensors_for_bind_to_name(tensors, mod, match, reference_kernels):
    """Folding a head scale into a bias or a table bind would refuse leaves it as the call gave it: the error names
    the call's own tensor, never a broadcasting failure inside torch."""
    q = torch.randn(1, 4, 5, 32).to(torch.bfloat16)
    with pytest.raises(InputError, match=match):
        ag.attention(q, q, q, ag.causal(), score_mod=(mod(), ag.head_scale(_scales(False))), **tensors)
