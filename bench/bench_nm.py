"""Benchmark N:M attention (`nm(2, 4)`, `nm(1, 2)`: P·V on sparse tensor cores) in one process.

1. Against attngen's own dense kernels and SDPA (FlashAttention-2 and cuDNN back ends, dense): fp16, B=4, H=16,
   D 64/128, S 4096/16384; forward, and forward+backward against attngen dense forward+backward.
2. DFSS's own configuration (bf16, 4 heads, D 64, L 256..4096, batch 48, 24 at 4096): SDPA FA2 and cuDNN (dense),
   attngen dense, attngen 2:4, and the naive torch 2:4 (bmm, selection, softmax, bmm: the DFSS paper's baseline
   shape, and the only other way to run this rule).
Ratios are other / attngen-N:M time (above 1: the N:M kernel is faster). TFLOP/s count the work the pattern needs:
QKᵀ on every pair, P·V on the kept half. Writes JSON with every timing."""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attngen as ag

ROWS: list[dict] = []


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=80, return_mode="median")


def nm_flops(B: int, H: int, S: int, D: int, backward: bool) -> float:
    f = 2 * B * H * S * S * D * 1.5  # QKᵀ on every pair, P·V on half of them
    return f * 3.5 if backward else f


def record(out: str, case: str, ours: float, work: float, others: dict) -> None:
    row = dict(
        case=case,
        nm_ms=ours,
        nm_tflops=work / ours / 1e9,
        others_ms=others,
        ratios={k: v / ours for k, v in others.items() if v is not None},
    )
    ROWS.append(row)
    with open(out, "w") as f:  # rewritten after every row, so a cut-short run still leaves its numbers
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=ROWS), f, indent=1)
    rs = "  ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items())
    print(f"{case:40s} nm {ours:8.3f} ms {row['nm_tflops']:6.0f} TF   {rs}", flush=True)


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def naive_nm(q, k, v, n=2, m=4):
    """The plain torch way: scores, keep the n largest of every m (ties: torch.topk's order), softmax, P·V."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    g = s.unflatten(-1, (-1, m))
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(n, dim=-1).indices, True)
    p = torch.softmax(g.masked_fill(~keep, float("-inf")).flatten(-2), dim=-1)
    return torch.matmul(p.to(v.dtype), v)


def grad(fn, q, k, v, g):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_nm.json"))
    ap.add_argument("--quick", action="store_true", help="S=4096 only, DFSS table up to L=2048")
    args = ap.parse_args()
    torch.manual_seed(0)
    B, H = 4, 16
    for D in (64, 128):
        for S in (4096,) if args.quick else (4096, 16384):
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
            dense = bench(lambda: ag.attention(q, k, v, ag.full()))
            others = {
                "attngen_dense": dense,
                "sdpa_flash": bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v)),
                "sdpa_cudnn": bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)),
            }
            nm24 = bench(lambda: ag.attention(q, k, v, ag.nm(2, 4)))
            record(args.out, f"nm(2,4) fwd D{D} S{S}", nm24, nm_flops(B, H, S, D, False), others)
            nm12 = bench(lambda: ag.attention(q, k, v, ag.nm(1, 2)))
            record(args.out, f"nm(1,2) fwd D{D} S{S}", nm12, nm_flops(B, H, S, D, False), {**others, "nm(2,4)": nm24})
            causal = bench(lambda: ag.attention(q, k, v, ag.causal() & ag.nm(2, 4)))
            record(
                args.out,
                f"causal & nm(2,4) fwd D{D} S{S}",
                causal,
                nm_flops(B, H, S, D, False) / 2,
                {"attngen_causal": bench(lambda: ag.attention(q, k, v, ag.causal()))},
            )
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            g = torch.randn_like(q)
            ours = bench(grad(lambda q, k, v: ag.attention(q, k, v, ag.nm(2, 4)), qg, kg, vg, g))
            theirs = {
                "attngen_dense": bench(grad(lambda q, k, v: ag.attention(q, k, v, ag.full()), qg, kg, vg, g)),
                "sdpa_cudnn": bench(grad(sdpa(SDPBackend.CUDNN_ATTENTION), qg, kg, vg, g)),
            }
            record(args.out, f"nm(2,4) fwd+bwd D{D} S{S}", ours, nm_flops(B, H, S, D, True), theirs)

    # DFSS's benchmark configuration.
    H, D = 4, 64
    for L in (256, 512, 1024, 2048) if args.quick else (256, 512, 1024, 2048, 4096):
        B = 24 if L == 4096 else 48
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ours = bench(lambda: ag.attention(q, k, v, ag.nm(2, 4)))
        others = {
            "sdpa_flash": bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v)),
            "sdpa_cudnn": bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)),
            "attngen_dense": bench(lambda: ag.attention(q, k, v, ag.full())),
            "naive_torch_2:4": bench(lambda: naive_nm(q, k, v)),
        }
        record(args.out, f"DFSS bf16 B{B} H4 D64 L{L}", ours, nm_flops(B, H, L, D, False), others)


if __name__ == "__main__":
    main()
