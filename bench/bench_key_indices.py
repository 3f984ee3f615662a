"""Benchmark key-index lists (`key_indices()`), DeepSeek-like: per query token 2048 keys (random among the keys
causal() allows; fewer where fewer exist), one list per KV head shared by its 16 query heads, head dim 128, bf16,
batch 1, `causal() & key_indices()`. attngen times include turning the lists into bits and the schedules (all of
it is inside `attngen.attention`). Reported: the time, TFLOP/s of the kept pairs (4·D flops per pair forward, 3.5
times that forward+backward) and that rate as a share of attngen's dense causal rate, the figure the key-index
kernels aim to keep above 60%. Writes JSON with every timing."""

import argparse
import json
import os

import torch
from timing import timed

import attngen as ag

ROWS: list[dict] = []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_key_indices.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--topk", type=int, default=2048)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, Hq, Hkv, D, n = 1, 16, 1, 128, args.topk
    pat = ag.causal() & ag.key_indices()
    for S in args.lengths:
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn_like(q)
        rows = torch.arange(S, device="cuda").view(-1, 1)
        idx = (torch.rand(S, n, device="cuda") * (rows + 1)).long().clamp(max=rows)  # keys <= the query
        idx = torch.where(torch.arange(n, device="cuda") <= rows, idx, -1)  # rows with fewer keys: -1 pads
        idx = idx.to(torch.int32).expand(B, Hkv, S, n)
        kept = _kept(idx[0, 0]) * B * Hq
        dense_pairs = B * Hq * S * (S + 1) // 2
        both = lambda f: lambda: torch.autograd.grad(f(), (q, k, v), g)
        runs = {
            "dense causal fwd": (timed(lambda: ag.attention(q, k, v, ag.causal()), 5), dense_pairs, 1),
            "dense causal fwd+bwd": (timed(both(lambda: ag.attention(q, k, v, ag.causal())), 5), dense_pairs, 3.5),
            "key_indices fwd": (timed(lambda: ag.attention(q, k, v, pat, key_indices=idx), 5), kept, 1),
            "key_indices fwd+bwd": (timed(both(lambda: ag.attention(q, k, v, pat, key_indices=idx)), 5), kept, 3.5),
        }
        rate = {name: pairs * 4 * D * f / ms / 1e9 for name, (ms, pairs, f) in runs.items()}
        for name, (ms, _, _) in runs.items():
            dense = rate[name.replace("key_indices", "dense causal")]
            row = dict(case=f"{name} S{S} k{n}", ms=ms, tflops=rate[name], share_of_dense=rate[name] / dense)
            ROWS.append(row)
            share = row["share_of_dense"]
            print(f"{row['case']:36s} {ms:9.3f} ms {rate[name]:6.0f} TF  {share:.0%} of dense", flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=ROWS), f, indent=1)


def _kept(idx: torch.Tensor) -> int:
    """Distinct listed keys summed over the rows of [S, n] lists (-1 ignored, a key listed twice counts once)."""
    s = idx.long().sort(-1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return int((first & (s >= 0)).sum())


if __name__ == "__main__":
    main()
