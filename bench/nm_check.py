"""GPU check of the N:M kernels, both families, printing one line per case and a summary (exit 1 on a failure).

    python bench/nm_check.py [--quick]

Exact cases: q and k on a grid of multiples of 1/2 (scores exact in fp32, so ties are exact and resolve by key index
in kernel and reference alike), v random; out, LSE and dq, dk, dv against attngen.reference in float32.
Consistency cases: continuous random q, k (near-ties everywhere), Sk = D and V = identity, so the forward's output
row is its P row; dV from the backward must be Pᵀ dO for that P and dQ must follow from the same kept set: a
backward that chose differently from the forward on a near-tie shows here."""

from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import replace

import torch

import attngen as ag
from attngen import bind, kernel, plan, prepare, reference, tiling
from attngen.nvrtc import device_arch

FAIL: list[str] = []


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def compiled(pat, D: int, dt: str, family: str) -> kernel.Compiled:
    if family == "auto":
        return kernel.compiled(pat.structure(), D, dt, device_arch(0))
    p = plan.make_plan(pat.structure(), head_dim=D, dtype=dt, arch=device_arch(0))
    return kernel.Compiled(replace(p, fwd=tiling.forward_tiles(D), dkdv=tiling.dkdv_tiles(D), dq=tiling.dq_tiles(D)))


def _compile_job(job) -> str | None:
    """Compile one kernel set into the disk cache (run in a worker process before the checks)."""
    name, D, dt, family = job
    try:
        kern = compiled(PATTERNS[name][0], D, dt, family)
        kern.forward_binary  # noqa: B018
        kern.backward_binary  # noqa: B018
    except Exception as e:
        return f"{job}: {type(e).__name__}: {e}"
    return None


def run(pat, q, k, v, dout, family, runtime):
    """(out, lse, dq, dk, dv) from the family's kernels ("auto": what attention() picks; "mma": mma.sync forced)."""
    if family == "auto":
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = ag.attention(qg, kg, vg, pat, return_lse=True, **runtime)
        return (out, lse, *torch.autograd.grad(out, (qg, kg, vg), dout))
    D, dt = q.shape[-1], "fp16" if q.dtype == torch.float16 else "bf16"
    kern = compiled(pat, D, dt, family)
    prep = prepare.prepare(pat, q, k, {"document_ids": None, "key_lengths": None, **runtime})
    scale = D**-0.5
    out, lse = bind.forward(kern, q, k, v, scale, prep)
    return (out, lse, *bind.backward(kern, dout, q, k, v, out, lse, None, scale, prep))


def exact_case(name, pat, B, Hq, Hkv, Sq, Sk, D, dtype, family, runtime=None, strided=False):
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    runtime = runtime or {}
    grid = lambda *s: torch.randint(-2, 3, s, device="cuda", generator=g).to(dtype) / 2
    q, k = grid(B, Hq, Sq, D), grid(B, Hkv, Sk, D)
    v = torch.randn(B, Hkv, Sk, D, device="cuda", generator=g).to(dtype)
    if strided:  # K and V stored [B, S, H, D], as models lay them out: the sparse forward copies K for its map
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        name += " strided"
    dout = torch.randn(B, Hq, Sq, D, device="cuda", generator=g).to(dtype)
    got = run(pat, q, k, v, dout, family, runtime)
    qc, kc, vc = (t.float().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qc, kc, vc, pat, dtype=torch.float32, **runtime)
    want = (ref, ref_lse, *torch.autograd.grad(ref, (qc, kc, vc), dout.float()))
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    errs = []
    empty = torch.isinf(ref_lse)
    if not torch.equal(torch.isinf(got[1]), empty):
        errs.append("LSE -inf rows differ")
    for nm_, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = (a.masked_fill(empty, 0) if nm_ == "lse" else a), (b.masked_fill(empty, 0) if nm_ == "lse" else b)
        if not torch.isfinite(a).all():
            errs.append(f"{nm_} not finite")
        elif b.abs().max() > 0 and rel(a, b) > tol:
            errs.append(f"{nm_} {rel(a, b):.1e}")
    report(f"exact {name} {family} B{B} H{Hq}/{Hkv} {Sq}x{Sk} D{D} {dtype}".replace("torch.", ""), errs)


def consistency_case(pat, D, dtype, family, Sq=200):
    g = torch.Generator(device="cuda").manual_seed(D)
    q = torch.randn(1, 2, Sq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, 2, D, D, device="cuda", generator=g).to(dtype)
    v = torch.eye(D, device="cuda").to(dtype).expand(1, 2, D, D).contiguous()
    dout = torch.randn(1, 2, Sq, D, device="cuda", generator=g).to(dtype)
    out, _lse, dq, _dk, dv = run(pat, q, k, v, dout, family, {})
    P = out.float()  # the forward's probabilities (V = I); kept set: P > 0
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    errs = []
    want_dv = P.transpose(-1, -2) @ dout.float()
    if rel(dv, want_dv) > tol:
        errs.append(f"dV {rel(dv, want_dv):.1e}")
    dP = dout.float() @ v.float().transpose(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdim=True))
    want_dq = dS @ k.float() * D**-0.5
    if rel(dq, want_dq) > tol:
        errs.append(f"dQ {rel(dq, want_dq):.1e}")
    kept = (P > 0).float().unflatten(-1, (-1, 4)).sum(-1)
    if kept.max() > 2:
        errs.append(f"a group keeps {int(kept.max())} keys")
    report(f"consistency {pat} {family} D{D} {dtype}".replace("torch.", ""), errs)


PATTERNS = {
    "nm24": (ag.nm(2, 4), None),
    "causal&nm24": (ag.causal() & ag.nm(2, 4), None),
    "nm12": (ag.nm(1, 2), None),
    "pad&causal&nm24": (ag.key_padding() & ag.causal() & ag.nm(2, 4), "pad"),
    "docs&nm12": (ag.documents() & ag.nm(1, 2), "docs"),
}


def report(case: str, errs: list[str]) -> None:
    print(f"{'FAIL' if errs else 'ok  '} {case}  {'; '.join(errs)}", flush=True)
    if errs:
        FAIL.append(case)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    hopper = device_arch(0).startswith("sm_90")
    dims = (64, 128) if args.quick else (32, 64, 96, 128, 256)
    # On Hopper the wgmma kernels serve head dims 64, 128 (and 256's forward); mma.sync is forced there too.
    runs = [("auto", D) for D in dims] + [("mma", D) for D in dims if hopper and D in (64, 128, 256)]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = [(n, D, dt, f) for f, D in runs for n in PATTERNS for dt in ("fp16", "bf16")]
    with ProcessPoolExecutor(max_workers=16, mp_context=get_context("spawn")) as pool:
        for err in pool.map(_compile_job, jobs):
            if err:
                report(f"compile {err}", ["compile failed"])
    for family, D in runs:
        for name, (pat, rt) in PATTERNS.items():
            for dtype in (torch.float16, torch.bfloat16):
                B, Sq, Sk = 2, 333, 517
                runtime = {}
                if rt == "pad":
                    runtime = {"key_lengths": torch.tensor([517, 301], dtype=torch.int32)}
                if rt == "docs":
                    Sk = Sq
                    runtime = {"document_ids": (torch.arange(Sq) // 97).to(torch.int32).expand(B, Sq)}
                exact_case(name, pat, B, 4, 2, Sq, Sk, D, dtype, family, runtime)
        exact_case("nm24", PATTERNS["nm24"][0], 2, 4, 2, 200, 301, D, torch.float16, family, strided=True)
        for dtype in (torch.float16, torch.bfloat16):
            for pat in (ag.nm(2, 4), ag.nm(1, 2)):
                consistency_case(pat, D, dtype, family)
    print(f"nm_check: {'all passed' if not FAIL else f'{len(FAIL)} FAILED'}")
    return 1 if FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
