"""GPU: tensors with more than 2**31 elements (element offsets past int32), forward and backward.

Each test keeps the reference cheap: the pattern lets only a few keys (or rows) matter, so attngen.reference runs
in float32 on a slice of the big tensors with an equivalent pattern, and the rest of the kernel's output is checked
exactly (0 where the pattern allows nothing). About 25 GB of GPU memory per test; skipped with less than 40 GB
free, and without CUDA."""

import pytest
import torch

import attngen as ag
from attngen import reference


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and _free_bytes() < 40e9, reason="needs ~40 GB of free GPU memory"),
]

INT32_LIMIT = 2**31
FWD_TOL, BWD_TOL = 2e-3, 5e-3  # fp16, as tests/test_kernels_gpu.py


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _nonzero(t: torch.Tensor, dim: int = 1) -> int:
    """count_nonzero one slice at a time along `dim` (no temporary the size of the whole tensor)."""
    return sum(int(torch.count_nonzero(s)) for s in t.unbind(dim))


def _randn(*shape, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)


def test_long_keys_past_int32():
    """K and V of more than 2**31 elements each (GQA: 80 query heads over 40 KV heads, 2**20 + 77 keys, D=64); a
    short query (256 rows) with a bottom-right sliding window sees only the last 767 keys, which lie past element
    2**31 for the last heads. Output and LSE match the reference on the sliced keys; dK/dV match on the window and
    are exactly 0 everywhere before it (read at offsets past 2**31)."""
    B, Hq, Hkv, Sq, Sk, D, W = 1, 80, 40, 256, 2**20 + 77, 64, 512
    assert B * Hkv * Sk * D > INT32_LIMIT
    gen = torch.Generator("cuda").manual_seed(0)
    q = _randn(B, Hq, Sq, D, gen=gen).requires_grad_()
    k = _randn(B, Hkv, Sk, D, gen=gen).requires_grad_()
    v = _randn(B, Hkv, Sk, D, gen=gen).requires_grad_()
    dout = _randn(B, Hq, Sq, D, gen=gen)
    pat = ag.sliding_window(W, align="bottom_right")

    out, lse = ag.attention(q, k, v, pat, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    # Row i (of Sq) sees keys (i + Sk - Sq - W, i + Sk - Sq]: all of them among the last Sq + W - 1 keys. The same
    # bottom-right pattern on the last L keys is the same mask.
    L = Sq + W
    ks = k.detach()[:, :, Sk - L :].clone().requires_grad_()
    vs = v.detach()[:, :, Sk - L :].clone().requires_grad_()
    qs = q.detach().clone().requires_grad_()
    ref, ref_lse = reference.attention(qs, ks, vs, pat, dtype=torch.float32)
    assert torch.isfinite(out).all() and not torch.isinf(ref_lse).any()
    assert _rel(out, ref) < FWD_TOL, f"output error {_rel(out, ref):.2e}"
    assert torch.allclose(lse, ref_lse, atol=2e-3, rtol=1e-4), "LSE"
    # the last KV head's last rows start past element 2**31
    last = out[:, -2:].float()  # query heads of the last KV head
    assert _rel(last, ref[:, -2:]) < FWD_TOL, "output of the heads whose keys lie past 2**31"

    rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), dout.float())
    assert _rel(dq, rq) < BWD_TOL, f"dq error {_rel(dq, rq):.2e}"
    for name, g, r in (("dk", dk, rk), ("dv", dv, rv)):
        win = g[:, :, Sk - L :]
        assert torch.isfinite(win).all(), f"{name} not finite on the window"
        assert _rel(win, r) < BWD_TOL, f"{name} error {_rel(win, r):.2e} on the window"
        assert _rel(win[:, -1], r[:, -1]) < BWD_TOL, f"{name} error on the last head (offsets past 2**31)"
        assert _nonzero(g[:, :, : Sk - L]) == 0, f"{name} must be exactly 0 on keys no query sees"
        assert (Hkv - 1) * Sk * D > INT32_LIMIT  # the last head's gradient was written and read past 2**31


def test_long_queries_past_int32():
    """Q (and O, dO, dQ) of more than 2**31 elements (40 heads x (2**20 + 77) rows, D=64) over 77 keys (GQA 5:1):
    every row sees the first 8 keys (sinks), and the last rows also a bottom-right window of 48 keys. Rows at the end
    (past element 2**31) and in the middle match the reference on sliced queries; LSE too; dQ on those rows; dK and
    dV (sums over all 2**20 rows) against a float32 reference computed one head at a time, to the error
    that reference makes when computed in fp16."""
    B, Hq, Hkv, Sq, Sk, D, R = 1, 40, 8, 2**20 + 77, 77, 64, 256
    assert B * Hq * Sq * D > INT32_LIMIT
    gen = torch.Generator("cuda").manual_seed(1)
    q = _randn(B, Hq, Sq, D, gen=gen).requires_grad_()
    k = _randn(B, Hkv, Sk, D, gen=gen).requires_grad_()
    v = _randn(B, Hkv, Sk, D, gen=gen).requires_grad_()
    dout = _randn(B, Hq, Sq, D, gen=gen)
    sinks = ag.predicate("k < 8")
    pat = ag.sliding_window(48, align="bottom_right") | sinks

    out, lse = ag.attention(q, k, v, pat, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert _nonzero(out) > 0 and all(torch.isfinite(o).all() for o in out.unbind(1)), "output finite"

    # The last R rows: the bottom-right window is the same for R rows as for Sq rows (it is anchored at the end).
    # Rows in the middle (far from the end): only the sinks.
    for label, rows, rpat in (
        ("last rows", slice(Sq - R, Sq), pat),
        ("middle rows", slice(Sq // 2, Sq // 2 + R), sinks),
    ):
        qs = q.detach()[:, :, rows].clone().requires_grad_()
        ks, vs = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
        ref, ref_lse = reference.attention(qs, ks, vs, rpat, dtype=torch.float32)
        o = out[:, :, rows]
        assert _rel(o, ref) < FWD_TOL, f"{label}: output error {_rel(o, ref):.2e}"
        assert _rel(o[:, -1], ref[:, -1]) < FWD_TOL, f"{label}: last head (offsets past 2**31)"
        assert torch.allclose(lse[:, :, rows], ref_lse, atol=2e-3, rtol=1e-4), f"{label}: LSE"
        (rq,) = torch.autograd.grad(ref, (qs,), dout[:, :, rows].float())
        assert _rel(dq[:, :, rows], rq) < BWD_TOL, f"{label}: dq error {_rel(dq[:, :, rows], rq):.2e}"

    # dK, dV: every query row contributes; the float32 reference one query head at a time (GQA: head h -> h // g).
    # A sink's gradient is a sum over 5 * 2**20 rows: there the fp16 tolerance is measured, not assumed. The same
    # reference computed in fp16 (fp16 operands, tensor-core products summed in fp32) gives the error any fp16
    # kernel makes on this sum; attngen's must be within twice that, or within BWD_TOL.
    g = Hq // Hkv
    sums = {name: torch.zeros(B, Hkv, Sk, D, device="cuda") for name in ("rk", "rv", "hk", "hv")}
    for h in range(Hq):
        for dtype, (gk_name, gv_name) in ((torch.float32, ("rk", "rv")), (torch.float16, ("hk", "hv"))):
            kh = k.detach()[:, h // g : h // g + 1].to(dtype).requires_grad_()
            vh = v.detach()[:, h // g : h // g + 1].to(dtype).requires_grad_()
            ref, _ = reference.attention(q.detach()[:, h : h + 1], kh, vh, pat, dtype=dtype)
            gk, gv = torch.autograd.grad(ref, (kh, vh), dout[:, h : h + 1].to(dtype))
            sums[gk_name][:, h // g] += gk[:, 0].float()
            sums[gv_name][:, h // g] += gv[:, 0].float()
            del ref, gk, gv
    for name, got, ref, fp16 in (("dk", dk, sums["rk"], sums["hk"]), ("dv", dv, sums["rv"], sums["hv"])):
        err, fp16_err = _rel(got, ref), _rel(fp16, ref)
        assert err < max(BWD_TOL, 2 * fp16_err), f"{name} error {err:.2e}; the fp16 reference's {fp16_err:.2e}"
