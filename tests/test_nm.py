"""N:M selection on the scores (`attngen.nm`), without a GPU: `nm_keep` against a brute force written here (groups
by absolute key index, cut at Sk; sorted by (-score, index); forbidden keys never kept) on exact ties, near-ties,
signed zeros and infinities; the reference attention it defines (what it keeps, empty rows, gradients through the
kept entries only); the constructor's and the composition rules' errors; plans and the CLI parser."""

import random
import zlib

import pytest
import torch

import attngen as ag
from attngen import InputError, reference
from attngen.cli import parse_pattern
from attngen.plan import make_plan
from attngen.select import split_selection
from attngen.select.nm import NM, nm_keep

RULES = [(2, 4), (1, 2)]


def brute_keep(scores: torch.Tensor, allowed: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, in every group of m keys by j // m: the n allowed keys first in the order (-score, j)."""
    Sk = scores.shape[-1]
    s = scores.double().reshape(-1, Sk).tolist()  # float64 holds every float32 exactly, in order
    a = allowed.expand(scores.shape).reshape(-1, Sk).tolist()
    keep = [[False] * Sk for _ in s]
    for row, (srow, arow) in enumerate(zip(s, a)):
        for start in range(0, Sk, m):
            group = [j for j in range(start, min(start + m, Sk)) if arow[j]]
            for j in sorted(group, key=lambda j: (-srow[j], j))[:n]:  # -0.0 == 0.0: the lower index wins
                keep[row][j] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(scores.shape)


def _scores(kind: str, shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if kind == "continuous":
        return torch.randn(shape, generator=gen, dtype=dtype)
    if kind == "integers":  # many exact ties
        return torch.randint(-2, 3, shape, generator=gen).to(dtype)
    if kind == "near_ties":  # x and its neighbours one and two units in the last place away
        x = torch.tensor(0.7, dtype=dtype)
        up, down = torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)
        values = torch.stack([x, up, down, torch.nextafter(up, x + 1), torch.nextafter(down, x - 1)])
        return values[torch.randint(0, 5, shape, generator=gen)]
    if kind == "signed_zeros":
        values = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
        return values[torch.randint(0, 6, shape, generator=gen)]
    if kind == "extremes":
        big = torch.finfo(dtype).max
        values = torch.tensor([float("-inf"), float("inf"), -big, big, 0.0], dtype=dtype)
        return values[torch.randint(0, 5, shape, generator=gen)]
    raise ValueError(kind)


KINDS = ["continuous", "integers", "near_ties", "signed_zeros", "extremes"]
# Sk: shorter than a group, one key, multiples of 4 and lengths that cut the last group
KEY_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 13, 16, 33]


def _allowed(form: str, B: int, H: int, Sq: int, Sk: int, gen: torch.Generator) -> torch.Tensor:
    if form == "all":
        return torch.ones(1, 1, Sq, Sk, dtype=torch.bool)
    if form == "none":
        return torch.zeros(1, 1, Sq, Sk, dtype=torch.bool)
    if form == "random":
        return torch.rand(B, H, Sq, Sk, generator=gen) < 0.6
    if form == "sparse":  # most groups keep fewer allowed keys than n
        return torch.rand(B, H, Sq, Sk, generator=gen) < 0.2
    if form == "broadcast":  # one mask for every batch and head, as a positional pattern gives
        return torch.rand(1, 1, Sq, Sk, generator=gen) < 0.7
    if form == "key_padding":  # [B, 1, 1, Sk], as key_padding() gives; one batch with no key at all
        lengths = torch.randint(0, Sk + 1, (B,), generator=gen)
        lengths[0] = 0
        return (torch.arange(Sk) < lengths.view(-1, 1)).view(B, 1, 1, Sk)
    if form == "empty_rows":  # some rows with no allowed key
        allowed = torch.rand(B, H, Sq, Sk, generator=gen) < 0.7
        allowed[:, :, ::2] = False
        return allowed
    raise ValueError(form)


FORMS = ["all", "none", "random", "sparse", "broadcast", "key_padding", "empty_rows"]


@pytest.mark.parametrize("n,m", RULES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nm_keep_matches_brute_force(n, m, kind, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{n}{m}{kind}{dtype}".encode()))
    rng = random.Random(f"{n}{m}{kind}{dtype}")
    for Sk in KEY_LENGTHS:
        for form in FORMS:
            B, H, Sq = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 3, 9])
            scores = _scores(kind, (B, H, Sq, Sk), gen, dtype)
            allowed = _allowed(form, B, H, Sq, Sk, gen)
            got = nm_keep(scores, allowed, n, m)
            where = f"nm({n}, {m}) {kind} {dtype} Sk={Sk} allowed={form}"
            assert got.dtype == torch.bool and got.shape == scores.shape, where
            assert torch.equal(got, brute_keep(scores, allowed, n, m)), where
            assert torch.equal(NM(n, m).reference_keep(scores, allowed), got), where


@pytest.mark.parametrize("n,m", RULES)
def test_nm_keep_group_counts_and_ties(n, m):
    """What the brute force implies, checked directly: at most n per group, exactly min(n, allowed) per group,
    exact ties and signed zeros to the lower index, the group of key j is j // m."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    Sk = 4 * 7 + 3  # the last group is cut
    scores = torch.randn(4, 2, 11, Sk, generator=gen)
    allowed = torch.rand(4, 2, 11, Sk, generator=gen) < 0.5
    keep = nm_keep(scores, allowed, n, m)
    assert not (keep & ~allowed).any()
    pad = -Sk % m
    groups = lambda t: torch.nn.functional.pad(t.int(), (0, pad)).unflatten(-1, (-1, m)).sum(-1)
    assert torch.equal(groups(keep), groups(allowed).clamp(max=n))
    equal = torch.zeros(1, 1, 1, 2 * m)
    assert (
        nm_keep(equal, torch.ones_like(equal, dtype=torch.bool), n, m).flatten().tolist()
        == ([True] * n + [False] * (m - n)) * 2
    )
    zeros = torch.tensor([[[[-0.0, 0.0, -0.0, 0.0][:m]]]])
    assert nm_keep(zeros, torch.ones_like(zeros, dtype=torch.bool), n, m).flatten().tolist() == (
        [True] * n + [False] * (m - n)
    )
    # A key's group is fixed by its absolute index: a shorter Sk cuts the last group, never shifts the others.
    s = torch.randn(1, 1, 3, 4 * m, generator=gen)
    full = nm_keep(s, torch.ones(1, 1, 1, 4 * m, dtype=torch.bool), n, m)
    for Sk in range(1, 4 * m):
        cut = nm_keep(s[..., :Sk], torch.ones(1, 1, 1, Sk, dtype=torch.bool), n, m)
        whole = Sk // m * m
        assert torch.equal(cut[..., :whole], full[..., :whole]), Sk


def test_signed_score_not_magnitude():
    s = torch.tensor([[[[-5.0, 1.0, -0.5, 0.25]]]])
    keep = nm_keep(s, torch.ones_like(s, dtype=torch.bool), 2, 4)
    assert keep.flatten().tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------------------------- reference


def _scores_of(q, k, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale


@pytest.mark.parametrize("n,m", RULES)
@pytest.mark.parametrize("scale", [None, -0.3])
def test_reference_attention_keeps_the_rule(n, m, scale):
    """With Sk == D and V the identity, the output row i is the probability row P_i: it is nonzero exactly on
    the keys causal() allows and the rule keeps (computed independently here), at most n per group, and sums to 1."""
    gen = torch.Generator().manual_seed(n + m)
    B, Hq, Hkv, Sq, D = 2, 4, 2, 23, 16
    q = torch.randn(B, Hq, Sq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, D, D, generator=gen, dtype=torch.float64)
    v = torch.eye(D, dtype=torch.float64).expand(B, Hkv, D, D)
    pat = ag.causal() & ag.nm(n, m)
    out, lse = reference.attention(q, k, v, pat, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    causal = torch.arange(D)[None, :] <= torch.arange(Sq)[:, None]
    expect = brute_keep(_scores_of(q, k, D**-0.5 if scale is None else scale), causal, n, m)
    assert torch.equal(out > 0, expect)
    assert (out >= 0).all() and (out.unflatten(-1, (-1, m)) > 0).sum(-1).max() <= n
    assert torch.allclose(out.sum(-1), torch.ones(B, Hq, Sq, dtype=torch.float64))


def test_reference_rows_with_no_kept_key():
    gen = torch.Generator().manual_seed(5)
    B, H, S, D = 2, 2, 9, 8
    q, k, v = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([0, 6])
    for pat, rt, empty in [
        (ag.key_padding() & ag.nm(2, 4), {"key_lengths": lengths}, (slice(0, 1), slice(None), slice(None))),
        (~ag.causal() & ag.nm(1, 2), {}, (slice(None), slice(None), slice(S - 1, S))),
    ]:
        out, lse = reference.attention(q, k, v, pat, **rt)
        assert torch.isfinite(out).all(), repr(pat)
        assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all(), repr(pat)
        full = torch.ones_like(lse, dtype=torch.bool)
        full[empty] = False
        assert torch.isfinite(lse[full]).all(), repr(pat)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), repr(pat)


@pytest.mark.parametrize("n,m", RULES)
def test_reference_gradients_flow_through_kept_entries_only(n, m):
    gen = torch.Generator().manual_seed(17 * n + m)
    Sk, D = 13, 8
    q = torch.randn(1, 1, 1, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, Sk, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 1, 1, D, generator=gen, dtype=torch.float64)
    out, _ = reference.attention(q, k, v, ag.nm(n, m))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    kept = brute_keep(_scores_of(q.detach(), k.detach(), D**-0.5), torch.ones(1, Sk, dtype=torch.bool), n, m)
    kept = kept.flatten()
    assert 0 < kept.sum() < Sk
    assert (dk[0, 0, ~kept] == 0).all() and (dv[0, 0, ~kept] == 0).all()
    assert (dv[0, 0, kept].abs().sum(-1) > 0).all()
    # The same as attention with the choice as a fixed mask: the rule contributes no gradient of its own.
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    p = torch.softmax(s.masked_fill(~kept, float("-inf")), dim=-1)
    want = torch.autograd.grad(p @ v, (q, k, v), dout)
    for got, exp in zip((dq, dk, dv), want):
        assert torch.allclose(got, exp, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- API and plans


@pytest.mark.parametrize("n,m", [(3, 4), (2, 8), (1, 4), (4, 8), (0, 2), (2, 2)])
def test_unsupported_ratios_name_what_is_supported(n, m):
    with pytest.raises(InputError, match=r"2:4 and 1:2"):
        ag.nm(n, m)


@pytest.mark.parametrize("n,m", [(2.0, 4), (2, 4.0), (True, 4), (2, True), ("2", 4), (None, 4)])
def test_non_integer_arguments_are_refused(n, m):
    with pytest.raises(InputError, match=r"must be an integer.*2:4 and 1:2"):
        ag.nm(n, m)


def test_nm_is_a_pattern_leaf():
    rule = ag.nm(2, 4)
    assert isinstance(rule, ag.Pattern) and rule == ag.nm(2, 4) and hash(rule) == hash(ag.nm(2, 4))
    assert rule != ag.nm(1, 2)
    assert repr(rule) == "nm(2, 4)" and repr(ag.causal() & ag.nm(1, 2)) == "causal() & nm(1, 2)"
    assert (ag.causal() & rule).key == (ag.causal() & ag.nm(2, 4)).key != (ag.causal() & ag.nm(1, 2)).key
    assert rule.runtime_inputs == frozenset()
    assert (ag.documents() & rule).runtime_inputs == {"document_ids"}
    assert split_selection(ag.key_padding() & ag.causal() & rule) == (ag.key_padding() & ag.causal(), rule)


def test_complement_is_refused():
    with pytest.raises(InputError, match="complement"):
        ~ag.nm(2, 4)
    with pytest.raises(InputError, match="complement"):
        ~(ag.causal() & ag.nm(1, 2))


def _plan(pat, arch="sm_90"):
    return make_plan(pat, head_dim=64, dtype="fp16", arch=arch)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ag.nm(2, 4) | ag.causal(),
        lambda: ag.nm(2, 4) & ag.nm(1, 2),
        lambda: ag.causal() & (ag.nm(2, 4) | ag.full()),
    ],
    ids=["or", "two_rules", "nested"],
)
def test_unsupported_compositions_are_refused(build):
    """Refused when built or, at the latest, when planned or used by the reference."""
    with pytest.raises(InputError, match="supported"):
        _plan(build())
    with pytest.raises(InputError, match="supported"):
        x = torch.zeros(1, 1, 4, 8)
        reference.attention(x, x, x, build())


@pytest.mark.parametrize(
    "pat,text",
    [
        (ag.nm(2, 4), "nm(n=2, m=4)"),
        (ag.causal() & ag.nm(2, 4), "nm(n=2, m=4)"),
        (ag.documents() & ag.nm(1, 2), "nm(n=1, m=2)"),
        (ag.key_padding() & ag.causal() & ag.nm(2, 4), "nm(n=2, m=4)"),
    ],
    ids=["alone", "causal", "documents", "key_padding_causal"],
)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_supported_compositions_plan(pat, text, arch):
    p = _plan(pat, arch)
    positions = split_selection(pat)[0]
    assert text in str(p) and "sparse P·V" in str(p)
    assert p.select.rule == "nm" and p.select.sparse_pv and p.select.template == "select/nm.cuh.j2"
    assert p.positions == positions.structure()
    plain = _plan(positions, arch)  # the rule adds nothing to the position mask or the run-time arguments
    assert (p.mask_c, p.runtime_args) == (plain.mask_c, plain.runtime_args)
    assert plain.select.rule == "none"


def test_cli_parses_nm():
    assert parse_pattern("causal() & nm(2, 4)") == ag.causal() & ag.nm(2, 4)
    assert parse_pattern("documents() & nm(1, 2)") == ag.documents() & ag.nm(1, 2)
    with pytest.raises(InputError, match="2:4 and 1:2"):
        parse_pattern("causal() & nm(3, 4)")
