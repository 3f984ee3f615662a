"""Benchmark bucket attention and query/key dropping (Sparse Flash Attention's benchmark) in one process.

SFA's configuration: B=4, H=48, head dim 64, bf16, causal, forward+backward with hashing / sorting / gathering /
scattering included (all of it is inside `attngen.attention`); uniformly random buckets n in {2, ..., 64}, `lsh(16)`
(the hash included), and 50% of queries and keys dropped at random; then the same at head dim 128 in fp16. Ratios
are other / bucketed time (above 1: the bucketed call is faster) against attngen's dense causal forward+backward
(and SDPA's cuDNN back end, dense causal). TFLOP/s count the work the pattern needs: 4·D flops per kept pair
forward, 3.5 times that forward+backward. Writes JSON with every timing."""

import argparse
import os

import torch
import torch.nn.functional as F
from timing import Results, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen as ag


def kept_pairs(qb: torch.Tensor, kb: torch.Tensor) -> int:
    """Pairs (i, j) with j <= i and equal buckets, summed over batch and heads (Hq == Hkv here)."""
    S = qb.shape[-1]
    pos = torch.arange(S, device=qb.device)
    keys = torch.sort(kb.long() * S + pos).values
    hi = torch.searchsorted(keys, (qb.long() * S + pos).contiguous(), right=True)
    lo = torch.searchsorted(keys, (qb.long() * S).contiguous(), right=False)
    return int((hi - lo).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_buckets.json"))
    ap.add_argument("--quick", action="store_true", help="S 8192 and 16384, n in {4, 16}")
    ap.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: 4096 to 32768)")
    ap.add_argument("--counts", type=int, nargs="+", help="bucket counts (default: 2 to 64)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="64 (bf16) and/or 128 (fp16)")
    args = ap.parse_args()
    results = Results(args.out)
    torch.manual_seed(0)
    B, H = 4, 48
    lengths = args.lengths or ((8192, 16384) if args.quick else (4096, 8192, 16384, 32768))
    counts = args.counts or ((4, 16) if args.quick else (2, 4, 8, 16, 32, 64))
    for D, dtype in ((d, torch.bfloat16 if d == 64 else torch.float16) for d in args.head_dims):
        for S in lengths:
            reps = 5 if S >= 16384 else 10
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)

            def step(pat, **rt):
                return lambda: torch.autograd.grad(ag.attention(q, k, v, pat, **rt), (q, k, v), g)

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)

            dense = timed(step(ag.causal()), reps)
            others = {"attngen_causal": dense, "sdpa_cudnn_causal": timed(cudnn, reps)}
            tag = f"{str(dtype)[6:]} D{D} S{S}"
            all_pairs = B * H * S * (S + 1) // 2
            results.add(f"dense causal fwd+bwd {tag}", dense, all_pairs, D, True, {})
            for n in counts:
                qb = torch.randint(0, n, (B, H, S), device="cuda", dtype=torch.int32)
                kb = torch.randint(0, n, (B, H, S), device="cuda", dtype=torch.int32)
                rt = dict(query_buckets=qb, key_buckets=kb)
                ms = timed(step(ag.causal() & ag.buckets(), **rt), reps)
                results.add(f"causal&buckets n={n} fwd+bwd {tag}", ms, kept_pairs(qb, kb), D, True, others)
                if n == 16:
                    fwd = timed(lambda: ag.attention(q, k, v, ag.causal() & ag.buckets(), **rt), reps)
                    dense_fwd = timed(lambda: ag.attention(q, k, v, ag.causal()), reps)
                    results.add(
                        f"causal&buckets n=16 fwd {tag}",
                        fwd,
                        kept_pairs(qb, kb),
                        D,
                        False,
                        {"attngen_causal": dense_fwd},
                    )
                    qb2, kb2 = ag.lsh_buckets(q, k, 16, seed=0)
                    ms = timed(step(ag.causal() & ag.lsh(16, seed=0)), reps)
                    results.add(f"causal&lsh(16) fwd+bwd {tag}", ms, kept_pairs(qb2, kb2), D, True, others)
            drop = [torch.rand(B, H, S, device="cuda") < 0.5 for _ in range(2)]
            keep = dict(query_keep=drop[0], key_keep=drop[1])
            ms = timed(step(ag.causal() & ag.keep(), **keep), reps)
            qk, kk = keep["query_keep"].int(), keep["key_keep"].int()
            pairs = kept_pairs(torch.where(qk > 0, 0, -1), torch.where(kk > 0, 0, -2))
            results.add(f"causal&keep 50%/50% fwd+bwd {tag}", ms, pairs, D, True, others)


if __name__ == "__main__":
    main()
