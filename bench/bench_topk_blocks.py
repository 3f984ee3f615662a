"""Benchmark block top-k (`topk_blocks`) in one process: FlashMoBA's configuration and an NSA-like one.

MoBA: fp16, head dim 128, 16 heads, batch 2, `causal() & topk_blocks(8, block=128)`, S from 4k to 64k. NSA-like:
`causal() & (topk_blocks(16, block=64) | sliding_window(512))`, bf16, head dim 128, 64 query heads on 4 KV heads,
batch 1. Every attngen time includes the selection pass (pooled means, block scores, top-k, schedules): all of it
is inside `attngen.attention`. Ratios are other / top-k time (above 1: top-k is faster) against attngen's dense
causal, SDPA's FlashAttention-2 and cuDNN back ends (dense causal), and FlexAttention (compiled, dynamic=False)
given attngen's selection as its block mask (so Flex's time excludes the selection). TFLOP/s count the work the
pattern needs: 4·D flops per kept pair forward, 3.5 times that forward+backward. Writes JSON with every timing."""

import argparse
import os

import torch
import torch.nn.functional as F
from timing import Results, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen as ag


def kept_pairs(grid: torch.Tensor, block: int, window: int) -> int:
    """Pairs kept by causal & (selected blocks | sliding_window(window)) for S a multiple of `block`: a selected
    block a >= c holds its causal pairs; an unselected one near the diagonal the window's."""
    nb = grid.shape[2]
    i = torch.arange(block, device=grid.device).view(-1, 1)
    a, c = torch.arange(nb, device=grid.device).view(-1, 1), torch.arange(nb, device=grid.device).view(1, -1)
    d = a - c
    causal = torch.where(d > 0, block * block, torch.where(d == 0, block * (block + 1) // 2, 0))
    total = int((grid.long() * causal).sum())
    for off in range(0, window // block + 2):  # window pairs of blocks `off` below the diagonal
        diff = off * block + i - i.T  # query - key
        win = int(((diff >= 0) & (diff < window)).sum())
        total += win * int(((~grid.bool()) & (d == off)).sum())
    return total


def flex_with(grid: torch.Tensor, block: int, window: int, S: int):
    """FlexAttention (compiled, dynamic=False) over attngen's selection, at its own 128 x 128 tiles: a block mask of
    the tiles the selection or the window touch, those wholly kept listed as full (no mask_mod), and
    causal & (selected | window) as the mask_mod of the others."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    F_ = 128  # Flex's default tile
    sel = grid.bool()
    r = F_ // block  # selection blocks per Flex tile side
    nb = S // F_
    tiles = sel.view(*sel.shape[:2], nb, r, nb, r)
    some, every = tiles.any(-1).any(-2), tiles.all(-1).all(-2)
    a = torch.arange(nb, device=sel.device)
    d = a.view(-1, 1) - a.view(1, -1)  # query tile - key tile
    near = (d >= 0) & (d * F_ - (F_ - 1) < window)  # the window reaches into the tile
    inside = (d >= 1) & (d * F_ + F_ - 1 < window)  # the window covers the tile
    touched = (some | near) & (d >= 0)
    full = (every | inside) & (d >= 1)
    partial = touched & ~full

    def listed(blocks):
        count = blocks.sum(-1, dtype=torch.int32)
        return count, torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (sel[b, h, qi // block, kj // block] | (qi - kj < window))

    (pc, pi), (fc, fi) = listed(partial), listed(full)
    mask = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=F_, mask_mod=mask_mod, seq_lengths=(S, S))
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def run(results, name, pat, B, Hq, Hkv, S, D, dtype, block, window, reps, flex: bool) -> None:
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn_like(q)
    gqa = Hq != Hkv
    grid = ag.selected_blocks(q, k, pat)
    pairs = kept_pairs(grid, block, window)
    dense_pairs = B * Hq * S * (S + 1) // 2
    tag = f"{str(dtype)[6:]} D{D} H{Hq}/{Hkv} B{B} S{S}"

    def both(f):
        return lambda: torch.autograd.grad(f(), (q, k, v), g)

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        return f

    fwd, fwd_bwd = {}, {}
    fwd["attngen_causal"] = timed(lambda: ag.attention(q, k, v, ag.causal()), reps)
    fwd_bwd["attngen_causal"] = timed(both(lambda: ag.attention(q, k, v, ag.causal())), reps)
    for label, backend in (("sdpa_fa2", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            fwd[label] = timed(sdpa(backend), reps)
            fwd_bwd[label] = timed(both(sdpa(backend)), reps)
        except RuntimeError as e:  # a back end that does not take this shape (FA2 has no GQA before torch 2.5 ...)
            print(f"  {label}: {str(e).splitlines()[0][:80]}")
    if flex:
        f = flex_with(grid, block, window, S)
        with torch.no_grad():  # the same attention, or the comparison means nothing
            got, want = f(q, k, v).float(), ag.attention(q, k, v, pat).float()
            print(f"  flex vs attngen: relative difference {((got - want).norm() / want.norm()).item():.1e}")
        fwd["flex_same_selection"] = timed(lambda: f(q, k, v), reps)
        fwd_bwd["flex_same_selection"] = timed(both(lambda: f(q, k, v)), reps)
    results.add(f"dense causal fwd {tag}", fwd["attngen_causal"], dense_pairs, D, False, {})
    select_ms = timed(lambda: ag.selected_blocks(q, k, pat), reps)
    results.add(f"{name} selection pass {tag}", select_ms, 0, D, False, {"attngen_causal_fwd": fwd["attngen_causal"]})
    results.add(f"{name} fwd {tag}", timed(lambda: ag.attention(q, k, v, pat), reps), pairs, D, False, fwd)
    ms = timed(both(lambda: ag.attention(q, k, v, pat)), reps)
    results.add(f"{name} fwd+bwd {tag}", ms, pairs, D, True, fwd_bwd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_topk_blocks.json"))
    ap.add_argument("--lengths", type=int, nargs="+", help="MoBA lengths (default 4096 to 65536)")
    ap.add_argument("--flex", action="store_true", help="also FlexAttention with the same selection (compiles)")
    ap.add_argument("--skip-nsa", action="store_true")
    args = ap.parse_args()
    results = Results(args.out)
    torch.manual_seed(0)
    moba = ag.causal() & ag.topk_blocks(8, block=128)
    for S in args.lengths or (4096, 8192, 16384, 32768, 65536):
        reps = 5 if S >= 32768 else 10
        run(results, "moba top8/128", moba, 2, 16, 16, S, 128, torch.float16, 128, 0, reps, args.flex)
    if not args.skip_nsa:
        nsa = ag.causal() & (ag.topk_blocks(16, block=64) | ag.sliding_window(512))
        run(results, "nsa top16/64|win512", nsa, 1, 64, 4, 32768, 128, torch.bfloat16, 64, 512, 5, args.flex)


if __name__ == "__main__":
    main()
