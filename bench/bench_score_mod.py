"""Score modifications against FlexAttention (score_mod and block_mask, compiled with dynamic=False: Flex at its
best), same process: ALiBi + causal and softcap(50) + sliding_window(1024), fp16, B4 H16, head dims 64 and 128,
S 4096 and 16384, forward and forward+backward. Ratios are Flex / attngen (above 1: attngen is faster).

    python bench/bench_score_mod.py [--out results.json] [--lengths 4096 16384]"""

import argparse
import os

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
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    args = ap.parse_args()
    results = Results(args.out)
    slopes = torch.tensor([2.0 ** -(8 * (h + 1) / H) for h in range(H)], device="cuda")  # ALiBi's slopes for H heads
    for name, case in cases(slopes).items():
        for D in (64, 128):
            for S in args.lengths:
                run(results, name, case, D, S)


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


if __name__ == "__main__":
    main()
