"""Score modifications against FlexAttention (score_mod and block_mask, compiled with dynamic=False: Flex at its
best), same process: ALiBi + causal and softcap(50) + sliding_window(1024), fp16, B4 H16, head dims 64 and 128,
S 4096 and 16384, forward and forward+backward; a bias [1, H, S, S] + causal and T5's rel_bias(32, 128) + full at
S 4096 (--additive-lengths), forward and forward+backward with the bias's / table's gradient; NATTEN's 2-D
neighbourhood (13 x 13 keys on a square grid of 64 or 128 a side, patterns/natten.py; --natten-sides), a mask
only. Ratios are Flex / attngen (above 1: attngen is faster).

    python bench/bench_score_mod.py [--out results.json] [--lengths 4096 16384] [--additive-lengths 4096]
                                    [--natten-sides 64 128]"""

import argparse
import importlib.util
import os
from pathlib import Path

import torch
from timing import Results, timed
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attngen as ag

B, H, WINDOW, CAP = 4, 16, 1024, 50.0


def cases(slopes: torch.Tensor) -> dict:
    """name -> (attngen pattern, attngen score_mod, Flex score_mod, Flex mask_mod, allowed pairs at S)."""

    def alibi(score, b, h, i, j):
        return score + slopes[h] * (j - i)

    def softcap(score, b, h, i, j):
        return CAP * torch.tanh(score / CAP)

    return {
        "alibi + causal": (ag.causal(), ag.alibi(slopes), alibi, lambda b, h, i, j: i >= j, lambda S: S * (S + 1) // 2),
        f"softcap({CAP:g}) + sliding_window({WINDOW})": (
            ag.sliding_window(WINDOW),
            ag.softcap(CAP),
            softcap,
            lambda b, h, i, j: (i >= j) & (i - j < WINDOW),
            lambda S: sum(min(i + 1, WINDOW) for i in range(S)),
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_score_mod.json"))
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--additive-lengths", type=int, nargs="*", default=[4096])
    ap.add_argument("--no-rel-bias", action="store_true", help="skip T5's buckets")
    ap.add_argument("--natten-sides", type=int, nargs="*", default=[64, 128], help="grid sides of the 2-D case")
    args = ap.parse_args()
    results = Results(args.out)
    slopes = torch.tensor([2.0 ** -(8 * (h + 1) / H) for h in range(H)], device="cuda")  # ALiBi's slopes for H heads
    for name, case in cases(slopes).items():
        for D in (64, 128):
            for S in args.lengths:
                run(results, name, case, D, S)
    for D in (64, 128):
        for S in args.additive_lengths:
            run_bias(results, D, S)
            if not args.no_rel_bias:
                run_rel_bias(results, D, S)
    for D in (64, 128):
        for side in args.natten_sides:
            run(results, f"natten 2-D {NATTEN_KERNEL}x{NATTEN_KERNEL} on {side}x{side}", natten_case(side), D, side**2)


NATTEN_KERNEL = 13


def natten_case(side: int) -> tuple:
    """patterns/natten.py's 2-D neighbourhood and the same mask for Flex (windows shifted inside the grid); every
    query sees NATTEN_KERNEL² keys."""
    spec = importlib.util.spec_from_file_location("natten", Path(__file__).resolve().parents[1] / "patterns/natten.py")
    natten = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(natten)
    n, r = NATTEN_KERNEL, NATTEN_KERNEL // 2

    def mask_mod(b, h, i, j):
        r0 = torch.clamp(i // side - r, 0, side - n)
        c0 = torch.clamp(i % side - r, 0, side - n)
        kr, kc = j // side, j % side
        return (kr >= r0) & (kr < r0 + n) & (kc >= c0) & (kc < c0 + n)

    return natten.pattern(side, side, n, n), None, None, mask_mod, lambda S: S * n * n


def run(results: Results, name: str, case: tuple, D: int, S: int) -> None:
    pat, mod, flex_mod, mask_mod, pairs = case
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v, g = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    bm = create_block_mask(mask_mod, None, None, S, S)
    ours = lambda: ag.attention(q, k, v, pat, score_mod=mod)
    theirs = lambda: flex(q, k, v, score_mod=flex_mod, block_mask=bm)
    n = B * H * pairs(S)
    with torch.no_grad():
        results.add(f"{name} fwd D{D} S{S}", timed(ours, 20), n, D, False, {"flex": timed(theirs, 20)})
    grad = lambda fn: lambda: torch.autograd.grad(fn(), (q, k, v), g)
    results.add(f"{name} fwd+bwd D{D} S{S}", timed(grad(ours), 10), n, D, True, {"flex": timed(grad(theirs), 10)})


def run_bias(results: Results, D: int, S: int) -> None:
    """bias() [1, H, S, S] fp16 + causal; forward+backward also differentiates the bias."""
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v, g = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(4))
    bias = torch.randn(1, H, S, S, device="cuda", dtype=torch.float16)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S)
    ours = lambda: ag.attention(q, k, v, ag.causal(), score_mod=ag.bias(), bias=bias)
    theirs = lambda: flex(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[0, h, i, j], block_mask=bm)
    _add(results, f"bias [1,H,S,S] + causal D{D} S{S}", ours, theirs, inputs, g, B * H * S * (S + 1) // 2, D)


def run_rel_bias(results: Results, D: int, S: int) -> None:
    """T5's rel_bias(32, 128) + full; forward+backward also differentiates the table."""
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v, g = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(4))
    spec = ag.rel_bias(32, 128)
    table = torch.randn(H, 32, device="cuda")
    inputs = tuple(t.requires_grad_() for t in (q, k, v, table))
    buckets = spec.bucket(torch.arange(-(S - 1), S, device="cuda"))  # by k - q + S - 1
    ours = lambda: ag.attention(q, k, v, score_mod=spec, rel_table=table)
    theirs = lambda: flex(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h, buckets[j - i + S - 1]])
    _add(results, f"rel_bias(32, 128) + full D{D} S{S}", ours, theirs, inputs, g, B * H * S * S, D)


def _add(results: Results, name: str, ours, theirs, inputs: tuple, g, pairs: int, D: int) -> None:
    with torch.no_grad():
        results.add(f"{name} fwd", timed(ours, 20), pairs, D, False, _baseline(theirs, 20))
    grad = lambda fn: lambda: torch.autograd.grad(fn(), inputs, g)
    results.add(f"{name} fwd+bwd", timed(grad(ours), 10), pairs, D, True, _baseline(grad(theirs), 10))


def _baseline(fn, reps: int) -> dict:
    """{"flex": its milliseconds}, or {} where Flex cannot run the case (said on stdout)."""
    try:
        return {"flex": timed(fn, reps)}
    except Exception as e:  # e.g. Inductor finds no kernel configuration that fits shared memory
        print(f"    flex failed: {type(e).__name__}: {str(e).splitlines()[-1][:160]}", flush=True)
        return {}


if __name__ == "__main__":
    main()
