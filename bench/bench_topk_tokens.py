"""Benchmark top-k by token (`topk(k, scorer=...)`), every time including the selection pass (all of it inside
`attngen.attention`), against attngen's own dense causal attention and the naive torch way:

- exact `causal() & topk(256)`, fp16, head dim 64, B4 H16, S = 4096: attngen forward and forward+backward; the naive
  way materialises the scores, masks them causally, keeps each row's 256 largest (torch.topk) and takes a masked
  softmax; "selection" times `ag.selected_keys` alone; `causal() & threshold(0.01)` forward on the same inputs.
- DeepSeek-like indexer `causal() & topk(2048, scorer=indexer())`: 8 index heads of dim 64, 16 query heads of dim 128
  sharing one KV head, bf16, B1, S from 16k (`--indexer-lengths`); the selection feeds the gather kernels.
- DSA `causal() & topk(k, scorer=lowrank())` with r = 16 (P [D, r] from `random_projection`), fp16, head dim 64,
  B1 H16, S = 16384: the selection pass's time as a share of attngen's dense forward.

Reports medians (ms), ratios (other ÷ attngen) and TFLOP/s of the kept pairs (4·D flops a pair forward, 3.5 times
that forward+backward). Writes JSON with every timing."""

import argparse
import json
import math
import os

import torch
from timing import timed

import attngen as ag

ROWS: list[dict] = []


def _row(case: str, ms: float, **extra) -> None:
    ROWS.append(dict(case=case, ms=ms, **extra))
    shown = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    print(f"{case:48s} {ms:9.3f} ms  {shown}", flush=True)


def _naive_topk(q, k, v, n: int) -> torch.Tensor:
    """Scores materialised, causal mask, the n largest per row kept, masked softmax."""
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    S = q.shape[2]
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    kth = s.topk(min(n, S), dim=-1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    return (s.softmax(-1).to(v.dtype)) @ v


def exact(args) -> None:
    B, H, S, D, n = 4, 16, 4096, 64, 256
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    pat = ag.causal() & ag.topk(n)
    both = lambda f: lambda: torch.autograd.grad(f(), (q, k, v), g)
    kept = B * H * sum(min(i + 1, n) for i in range(S))
    t = {
        "attngen topk fwd": timed(lambda: ag.attention(q, k, v, pat), 5),
        "attngen topk fwd+bwd": timed(both(lambda: ag.attention(q, k, v, pat)), 5),
        "attngen topk selection": timed(lambda: ag.selected_keys(q, k, pat), 5),
        "attngen threshold(0.01) fwd": timed(lambda: ag.attention(q, k, v, ag.causal() & ag.threshold(0.01)), 5),
        "attngen dense causal fwd": timed(lambda: ag.attention(q, k, v, ag.causal()), 5),
        "attngen dense causal fwd+bwd": timed(both(lambda: ag.attention(q, k, v, ag.causal())), 5),
        "naive torch topk fwd": timed(lambda: _naive_topk(q, k, v, n), 3),
        "naive torch topk fwd+bwd": timed(both(lambda: _naive_topk(q, k, v, n)), 3),
    }
    for name, ms in t.items():
        f = 3.5 if "bwd" in name else 1
        plain = "selection" not in name and "dense" not in name and "threshold" not in name
        extra = dict(tflops=kept * 4 * D * f / ms / 1e9) if plain else {}
        _row(f"exact topk({n}) S{S} D{D} B{B} H{H}: {name}", ms, **extra)
    print(
        f"  naive / attngen: fwd {t['naive torch topk fwd'] / t['attngen topk fwd']:.1f}x, fwd+bwd "
        f"{t['naive torch topk fwd+bwd'] / t['attngen topk fwd+bwd']:.1f}x; attngen / own dense: fwd "
        f"{t['attngen topk fwd'] / t['attngen dense causal fwd']:.2f}x, fwd+bwd "
        f"{t['attngen topk fwd+bwd'] / t['attngen dense causal fwd+bwd']:.2f}x",
        flush=True,
    )


def indexer(args) -> None:
    Hq, Hkv, D, Hi, Di, n = 16, 1, 128, 8, 64, 2048
    pat = ag.causal() & ag.topk(n, scorer=ag.indexer())
    for S in args.indexer_lengths:
        torch.cuda.empty_cache()
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
        q = mk(1, Hq, S, D).requires_grad_()
        k, v = (mk(1, Hkv, S, D).requires_grad_() for _ in range(2))
        rt = dict(index_q=mk(1, S, Hi, Di), index_k=mk(1, S, Di), index_w=torch.rand(1, S, Hi, device="cuda"))
        g = torch.randn_like(q)
        both = lambda f: lambda: torch.autograd.grad(f(), (q, k, v), g)
        call = lambda: ag.attention(q, k, v, pat, **rt)
        dense = lambda: ag.attention(q, k, v, ag.causal())
        t = {
            "fwd": timed(call, 3),
            "fwd+bwd": timed(both(call), 3),
            "selection": timed(lambda: ag.selected_keys(q, k, pat, **rt), 3),
            "dense causal fwd": timed(dense, 3),
            "dense causal fwd+bwd": timed(both(dense), 3),
        }
        for name, ms in t.items():
            ratio = t["dense causal " + name] / ms if name in ("fwd", "fwd+bwd") else None
            _row(f"indexer topk({n}) S{S}: {name}", ms, **({"dense_over_attngen": ratio} if ratio else {}))


def lowrank(args) -> None:
    B, H, S, D, r, n = 1, 16, 16384, 64, 16, 1024
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
    pat = ag.causal() & ag.topk(n, scorer=ag.lowrank())
    proj = ag.random_projection(D, r, seed=0).cuda()
    sel = timed(lambda: ag.selected_keys(q, k, pat, proj=proj), 3)
    fwd = timed(lambda: ag.attention(q, k, v, pat, proj=proj), 3)
    dense = timed(lambda: ag.attention(q, k, v, ag.causal()), 5)
    _row(f"lowrank r{r} topk({n}) S{S} D{D} H{H}: selection", sel, share_of_dense_fwd=sel / dense)
    _row(f"lowrank r{r} topk({n}) S{S} D{D} H{H}: fwd", fwd, dense_over_attngen=dense / fwd)
    _row(f"dense causal S{S} D{D} H{H}: fwd", dense)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_topk_tokens.json"))
    ap.add_argument("--indexer-lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    kinds = ["exact", "indexer", "lowrank"]
    ap.add_argument("--only", choices=kinds, nargs="+", default=kinds)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.only:
        globals()[name](args)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()
