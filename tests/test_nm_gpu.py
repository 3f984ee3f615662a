"""GPU: the N:M selection rule (`nm(2, 4)`, `nm(1, 2)`) in both kernel families, forward and backward.

- Against attngen.reference: q and k on a grid of quarters, so every dot product is exact in fp32 and the kernels
  and the reference choose the same keys (exact ties to the lower key index); output, LSE and dq, dk, dv at the
  dtype's tolerance, and every output row within a bound of its own.
- The backward makes the forward's choice: with Sk = D and V the identity the forward's output rows are its P rows,
  and on inputs built so that fp32 rounding decides between keys of exactly equal score, dV, dK and dQ must follow
  from that P.
- Fidelity on long random inputs (L = 4096): the keys the kernels keep (read back with one-hot values, 64 keys a
  call) against float64 scores of the same 16-bit inputs; near-ties may flip a few choices, under 0.5% of them.

Outputs are poisoned (ATTNGEN_POISON_OUTPUTS=1). Skipped cleanly without a CUDA GPU."""

import zlib
from dataclasses import replace

import pytest
import torch
from test_kernels_gpu import DTYPES, FWD_TOL, GPU_TESTS, _check_grads, _rel

import attngen as ag
from attngen import bind, kernel, plan, prepare, reference, tiling
from attngen.select.nm import nm_keep

pytestmark = GPU_TESTS
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


RULES = {"2:4": (2, 4), "1:2": (1, 2)}
POSITIONS = {"alone": None, "causal": ag.causal(), "documents": ag.documents(), "key_padding": ag.key_padding()}
EPS = {"fp16": 2.0**-11, "bf16": 2.0**-8}  # the inputs' unit roundoff
# Per row: ||out_i - ref_i|| <= ROW_TOL * sum_j P_ij ||v_j|| (rounding of P and of the output, both relative);
# one key chosen wrongly in a short row moves a row by a few percent of that.
ROW_TOL = {"fp16": 8 * EPS["fp16"], "bf16": 8 * EPS["bf16"]}
LENGTHS = [(1, 1), (5, 3), (77, 77), (1000, 1000), (1031, 1031), (300, 517), (517, 300)]
SHORT = [(5, 3), (77, 77), (300, 517), (517, 300)]
GRID = 4  # q, k in {-1, -3/4, ..., 1}


def pattern(rule: str, positions: str) -> ag.Pattern:
    nm, pos = ag.nm(*RULES[rule]), POSITIONS[positions]
    return nm if pos is None else pos & nm


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _runtime(pat: ag.Pattern, B: int, Sq: int, Sk: int, gen: torch.Generator) -> dict:
    rt = {}
    if "document_ids" in pat.runtime_inputs:  # random segments, a few per sequence; the query ids run over them

        def ids(n):
            return (torch.rand(B, n, generator=gen) < 4.0 / n).cumsum(-1).to(torch.int32).cuda()

        rt["document_ids"] = ids(Sq) if Sq == Sk else (ids(Sq), ids(Sk))
    if "key_lengths" in pat.runtime_inputs:
        lens = torch.randint(0, Sk + 1, (B,), generator=gen)
        lens[0] = 0 if B > 1 else lens[0]  # a batch with no keys at all: every row empty
        rt["key_lengths"] = lens.to(torch.int32).cuda()
    return rt


def _grid(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randint(-GRID, GRID + 1, shape, generator=gen) / GRID


def _grid_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, gen):
    """q, k on the grid (exact scores), v and dout normal; q, k, v leaves that require grad."""
    q = _grid(gen, B, Hq, Sq, D)
    k = _grid(gen, B, Hkv, Sk, D)
    v = torch.randn(B, Hkv, Sk, D, generator=gen)
    dout = torch.randn(B, Hq, Sq, D, generator=gen).to("cuda", dtype)
    return (*(t.to("cuda", dtype).requires_grad_() for t in (q, k, v)), dout)


def _forced_mma_sync(pat: ag.Pattern, D: int, dtype: str) -> kernel.Compiled:
    """The mma.sync kernels of `pat` (what GPUs other than Hopper run), compiled for sm_90 and launched directly."""
    p = plan.make_plan(pat, head_dim=D, dtype=dtype, arch="sm_90")
    p = replace(p, fwd=tiling.forward_tiles(D), dkdv=tiling.dkdv_tiles(D), dq=tiling.dq_tiles(D))
    kern = kernel.Compiled(p)
    assert not kern.forward_binary.arch.endswith("a")
    return kern


class Runner:
    """Forward (out, lse) and backward (dq, dk, dv) through attngen.attention ("auto") or the forced mma.sync
    kernels ("mma_sync")."""

    def __init__(self, pat: ag.Pattern, D: int, dtype: str, family: str):
        self.pat, self.family = pat, family
        self.kern = _forced_mma_sync(pat, D, dtype) if family == "mma_sync" else None

    def forward(self, q, k, v, rt, scale=None):
        if self.kern is None:
            return ag.attention(q, k, v, self.pat, scale=scale, return_lse=True, **rt)
        self.prep = prepare.prepare(self.pat, q, k, {"document_ids": None, "key_lengths": None, **rt})
        self.scale = q.shape[-1] ** -0.5 if scale is None else scale
        return bind.forward(self.kern, q.detach(), k.detach(), v.detach(), self.scale, self.prep)

    def backward(self, q, k, v, out, lse, dout):
        if self.kern is None:
            return torch.autograd.grad(out, (q, k, v), dout)
        d = (q.detach(), k.detach(), v.detach())
        return bind.backward(self.kern, dout, *d, out, lse, None, self.scale, self.prep)


def _check_forward(out, lse, ref, ref_lse, ref_abs, dtype: str, where: str) -> None:
    empty = torch.isinf(ref_lse)
    assert torch.isfinite(out).all(), f"non-finite output: {where}"
    assert (out[empty] == 0).all(), f"rows with no allowed key must be 0: {where}"
    assert torch.equal(torch.isinf(lse), empty), f"LSE -inf exactly on empty rows: {where}"
    assert torch.allclose(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-4), f"LSE: {where}"
    if empty.all():
        return
    assert _rel(out, ref) < FWD_TOL[dtype], f"output error {_rel(out, ref):.2e}: {where}"
    row = (out.float() - ref.float()).norm(dim=-1) / ref_abs.squeeze(-1).float().clamp_min(1e-30)
    worst = row[~empty].max().item()
    assert worst < ROW_TOL[dtype], f"a row's error {worst:.2e} >= {ROW_TOL[dtype]:.2e}: {where}"


def _compare(pat: ag.Pattern, family: str, dtype: str, D: int, lengths, gen, B=2, Hq=8, Hkv=2) -> None:
    run = Runner(pat, D, dtype, family)
    for Sq, Sk in lengths:
        q, k, v, dout = _grid_inputs(B, Hq, Hkv, Sq, Sk, D, DTYPES[dtype], gen)
        rt = _runtime(pat, B, Sq, Sk, gen)
        where = f"{pat!r} {family} {dtype} D={D} Sq={Sq} Sk={Sk}"
        out, lse = run.forward(q, k, v, rt)
        ref, ref_lse = reference.attention(q, k, v, pat, dtype=torch.float32, **rt)
        with torch.no_grad():  # sum_j P_ij ||v_j||: each row's scale for its own error bound
            ref_abs, _ = reference.attention(q, k, v.norm(dim=-1, keepdim=True), pat, dtype=torch.float32, **rt)
        _check_forward(out, lse, ref, ref_lse, ref_abs, dtype, where)
        got = run.backward(q, k, v, out, lse, dout)
        _check_grads(got, torch.autograd.grad(ref, (q, k, v), dout), dtype, where)


# (rule, positions, dtype, head dim): every rule with every positional part, each dtype and head dim 64 / 128 twice
MAIN = [
    ("2:4", "alone", "fp16", 64),
    ("2:4", "causal", "bf16", 128),
    ("2:4", "documents", "fp16", 128),
    ("2:4", "key_padding", "bf16", 64),
    ("1:2", "alone", "bf16", 128),
    ("1:2", "causal", "fp16", 64),
    ("1:2", "documents", "bf16", 64),
    ("1:2", "key_padding", "fp16", 128),
]


@pytest.mark.parametrize("rule,positions,dtype,D", MAIN, ids=["-".join(map(str, c)) for c in MAIN])
def test_against_reference(rule, positions, dtype, D):
    _compare(pattern(rule, positions), "auto", dtype, D, LENGTHS, _gen("main", rule, positions, dtype, D))


# Head dims 32 and 96 (mma.sync everywhere) and 256 (on Hopper: wgmma forward, mma.sync backward).
OTHER_HEAD_DIMS = [("2:4", "causal", "fp16", 32), ("1:2", "key_padding", "bf16", 96), ("2:4", "documents", "bf16", 256)]


@pytest.mark.parametrize(
    "rule,positions,dtype,D", OTHER_HEAD_DIMS, ids=["-".join(map(str, c)) for c in OTHER_HEAD_DIMS]
)
def test_other_head_dims(rule, positions, dtype, D):
    _compare(pattern(rule, positions), "auto", dtype, D, SHORT, _gen("other", rule, positions, dtype, D))


MMA_SYNC = [("2:4", "causal", "fp16", 64), ("1:2", "documents", "bf16", 128), ("2:4", "key_padding", "bf16", 128)]


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (elsewhere every kernel is mma.sync)")
@pytest.mark.parametrize("rule,positions,dtype,D", MMA_SYNC, ids=["-".join(map(str, c)) for c in MMA_SYNC])
def test_mma_sync_family_on_hopper(rule, positions, dtype, D):
    _compare(pattern(rule, positions), "mma_sync", dtype, D, [*SHORT, (1031, 1031)], _gen("mma", rule, dtype, D))


# ------------------------------------------------------------------------------------------ consistency


def _tied_inputs(n: int, m: int, B: int, H: int, Sq: int, D: int, dtype, gen):
    """Normal q, k with Sk = D, where in every other group of m keys the first min(3, m) keys have exactly equal
    scores for every query, reached by different orders of the same products: key j + 1 is key j with coordinates
    0 and D - 1 swapped, key j + 2 with 1 and D - 2 swapped, and q is equal on each swapped pair. Which of them
    fp32 rounding ranks first depends on the order the kernel sums in."""
    q = torch.randn(B, H, Sq, D, generator=gen)
    k = torch.randn(B, H, D, D, generator=gen)
    q[..., D - 1], q[..., D - 2] = q[..., 0], q[..., 1]
    swaps = [(0, D - 1), (1, D - 2)][: min(3, m) - 1]
    for start in range(0, D, 2 * m):
        for offset, (a, b) in enumerate(swaps, 1):
            order = torch.arange(D)
            order[[a, b]] = torch.tensor([b, a])
            k[:, :, start + offset] = k[:, :, start][..., order]
    return q.to("cuda", dtype), k.to("cuda", dtype)


CONSISTENCY = [
    ("2:4", "fp16", 64, "auto"),
    ("1:2", "bf16", 128, "auto"),
    ("2:4", "bf16", 256, "auto"),
    ("2:4", "fp16", 64, "mma_sync"),
    ("1:2", "bf16", 128, "mma_sync"),
]


@pytest.mark.parametrize("rule,dtype,D,family", CONSISTENCY, ids=["-".join(map(str, c)) for c in CONSISTENCY])
def test_backward_makes_the_forwards_choice(rule, dtype, D, family):
    """Sk = D and V = I: the forward's output row i is its P row (kept keys: out > 0). dV must be Pᵀ dO for that P,
    and dQ, dK must follow from dS = P (dP - Δ) on the same kept set, with dP = dO Vᵀ = dO."""
    if family == "mma_sync" and not HOPPER:
        pytest.skip("needs a Hopper GPU (elsewhere every kernel is mma.sync)")
    n, m = RULES[rule]
    gen = _gen("consistency", rule, dtype, D, family)
    B, H, Sq, t = 8, 8, 64, DTYPES[dtype]
    pat = ag.nm(n, m)
    q, k = _tied_inputs(n, m, B, H, Sq, D, t, gen)
    v = torch.eye(D, dtype=t, device="cuda").expand(B, H, D, D)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn(B, H, Sq, D, generator=gen).to("cuda", t)
    run = Runner(pat, D, dtype, family)
    out, lse = run.forward(q, k, v, {})
    where = f"{pat!r} {family} {dtype} D={D}"
    assert torch.isfinite(out).all() and (out >= 0).all(), f"output: {where}"
    kept = out > 0
    per_group = kept.unflatten(-1, (-1, m)).sum(-1)
    assert (per_group == n).all(), f"groups keeping other than {n} keys: {int((per_group != n).sum())}: {where}"
    assert torch.allclose(out.float().sum(-1), torch.ones(B, H, Sq, device="cuda"), atol=8 * EPS[dtype]), where
    dq, dk, dv = run.backward(q, k, v, out, lse, dout)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv)), f"gradients: {where}"

    p, do = out.float(), dout.float()
    scale = D**-0.5
    delta = (do * p).sum(-1, keepdim=True)
    ds = p * (do - delta)  # zero off the kept set, as p
    ds_abs = p * (do.abs() + delta.abs())
    kf, qf = k.detach().float(), q.detach().float()
    tol = 8 * EPS[dtype]
    checks = {
        "dv": (dv, p.transpose(-1, -2) @ do, p.transpose(-1, -2) @ do.abs()),
        "dq": (dq, scale * ds @ kf, scale * ds_abs @ kf.abs()),
        "dk": (dk, scale * ds.transpose(-1, -2) @ qf, scale * ds_abs.transpose(-1, -2) @ qf.abs()),
    }
    for name, (got, want, bound) in checks.items():
        err = (got.float() - want).abs()
        bad = err > tol * bound + 1e-6
        assert not bad.any(), (
            f"{name} departs from the forward's choice at {int(bad.sum())} elements, first at "
            f"{[int(i) for i in bad.nonzero()[0]]} (|error| {err[bad].max().item():.3e}): {where}"
        )


# --------------------------------------------------------------------------------------------- fidelity


def _kept_by_kernel(pat, q, k, rt, chunk: int) -> torch.Tensor:
    """bool [B, H, Sq, Sk]: the keys the forward kernel keeps, `chunk` (= D) keys a call: V holds 2^14 on the
    diagonal of that chunk's keys and 0 elsewhere, so the output is 2^14 P over the chunk (no underflow)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    kept = torch.zeros(B, H, Sq, Sk, dtype=torch.bool, device=q.device)
    for start in range(0, Sk, chunk):
        v = torch.zeros(B, k.shape[1], Sk, D, dtype=q.dtype, device=q.device)
        width = min(chunk, Sk - start)
        v[:, :, start : start + width, :width] = 2.0**14 * torch.eye(width, dtype=q.dtype, device=q.device)
        out = ag.attention(q, k, v, pat, **rt)
        assert torch.isfinite(out).all()
        kept[..., start : start + width] = out[..., :width] > 0
    return kept


@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "key_padding_20pct"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B", [1, 4])
def test_fidelity_against_float64_selection(B, dtype, masked):
    """Long random inputs: the kernels' choices against float64 scores of the same 16-bit inputs. Near-ties may go
    either way (the kernels' scores are fp32); fewer than 0.5% of the (row, group) choices may differ."""
    n, m, L, D, H = 2, 4, 4096, 64, 2
    gen = _gen("fidelity", dtype, masked, B)
    q, k = (torch.randn(B, H, L, D, generator=gen).to("cuda", DTYPES[dtype]) for _ in range(2))
    pat = ag.key_padding() & ag.nm(n, m) if masked else ag.nm(n, m)
    rt = {"key_lengths": torch.full((B,), int(0.8 * L), dtype=torch.int32, device="cuda")} if masked else {}
    allowed = torch.arange(L, device="cuda") < (rt["key_lengths"][0] if masked else L)
    got = _kept_by_kernel(pat, q, k, rt, D)
    scores = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    want = nm_keep(scores, allowed.view(1, 1, 1, L), n, m)
    assert not (got & ~allowed).any(), "a masked key kept"
    groups = lambda t: t.unflatten(-1, (-1, m))
    choosing = groups(allowed).sum(-1) > n  # groups where the rule has a choice
    assert torch.equal(groups(got).sum(-1), groups(allowed).sum(-1).clamp(max=n).expand_as(groups(got).sum(-1)))
    differ = (groups(got) != groups(want)).any(-1)
    assert not differ[..., ~choosing].any()
    share = differ.sum().item() / choosing.expand_as(differ).sum().item()
    assert share < 0.005, f"{share:.4%} of the choices differ from float64 ({dtype}, masked={masked})"
