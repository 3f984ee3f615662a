"""Benchmark key-index lists (`key_indices()`), DeepSeek-like: per query token 2048 keys among the keys causal()
allows (fewer where fewer exist), one list per KV head shared by its 16 query heads, head dim 128, bf16, batch 1,
`causal() & key_indices()`, which runs the gather kernels. Two kinds of lists: "random" keys (the worst case for
the dK/dV kernel, whose key tiles of 16 then share few tokens) and "blocks", 32 runs of 64 consecutive keys
(NSA-like block selections). attngen times include preparing the lists (sorted, bits; inverse lists in the
backward), all inside `attngen.attention`; "lists" times that preparation alone. Reported: the time, TFLOP/s of
the kept pairs (4·D flops per pair forward, 3.5 times that forward+backward) and that rate as a share of attngen's
dense causal rate. Writes JSON with every timing."""

import argparse
import json
import os

import torch
from timing import timed

import attngen as ag
from attngen import keyindex

ROWS: list[dict] = []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_key_indices.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--kinds", nargs="+", default=["random", "blocks"], choices=["random", "blocks"])
    args = ap.parse_args()
    torch.manual_seed(0)
    B, Hq, Hkv, D, n = 1, 16, 1, 128, args.topk
    pat = ag.causal() & ag.key_indices()
    for S in args.lengths:
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn_like(q)
        dense_pairs = B * Hq * S * (S + 1) // 2
        both = lambda f: lambda: torch.autograd.grad(f(), (q, k, v), g)
        runs = {
            "dense causal fwd": (timed(lambda: ag.attention(q, k, v, ag.causal()), 5), dense_pairs, 1),
            "dense causal fwd+bwd": (timed(both(lambda: ag.attention(q, k, v, ag.causal())), 5), dense_pairs, 3.5),
        }
        for kind in args.kinds:
            idx = _lists(kind, S, n).expand(B, Hkv, S, n)
            kept = _kept(idx[0, 0]) * B * Hq
            call = lambda: ag.attention(q, k, v, pat, key_indices=idx)
            runs[f"{kind} fwd"] = (timed(call, 5), kept, 1)
            runs[f"{kind} fwd+bwd"] = (timed(both(call), 5), kept, 3.5)
            runs[f"{kind} lists"] = (timed(lambda: keyindex.sorted_lists(idx, S, "cuda"), 5), 0, 0)
        rate = {name: pairs * 4 * D * f / ms / 1e9 for name, (ms, pairs, f) in runs.items()}
        for name, (ms, _, _) in runs.items():
            dense = rate["dense causal " + name.split()[-1]] if not name.endswith("lists") else 0
            share = rate[name] / dense if dense else None
            row = dict(case=f"{name} S{S} k{n}", ms=ms, tflops=rate[name], share_of_dense=share)
            ROWS.append(row)
            tail = f"{rate[name]:6.0f} TF  {share:.0%} of dense" if share is not None else ""
            print(f"{row['case']:36s} {ms:9.3f} ms {tail}", flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=ROWS), f, indent=1)


def _lists(kind: str, S: int, n: int) -> torch.Tensor:
    """int32 [1, 1, S, n]: per query, n keys <= the query (all of them where fewer exist, else -1 pads)."""
    rows = torch.arange(S, device="cuda").view(-1, 1)
    if kind == "random":
        idx = (torch.rand(S, n, device="cuda") * (rows + 1)).long().clamp(max=rows)
    else:  # n / 64 blocks of 64 consecutive keys, each starting at a random key <= the query
        starts = (torch.rand(S, n // 64, 1, device="cuda") * (rows.view(-1, 1, 1) + 1)).long()
        idx = (starts + torch.arange(64, device="cuda")).flatten(1).clamp(max=rows)
    idx = torch.where(torch.arange(n, device="cuda") <= rows, idx, -1)  # rows with fewer keys: -1 pads
    return idx.to(torch.int32).view(1, 1, S, n)


def _kept(idx: torch.Tensor) -> int:
    """Distinct listed keys summed over the rows of [S, n] lists (-1 ignored, a key listed twice counts once)."""
    s = idx.long().sort(-1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return int((first & (s >= 0)).sum())


if __name__ == "__main__":
    main()
