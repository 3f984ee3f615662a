"""Top-k by token: how much of the exact top-k a low-rank prediction (DSA's) finds, as its rank grows.

    python examples/09_topk_recall.py
    python examples/09_topk_recall.py --seq 1024 --top 64 --ranks 8 32 128

`causal() & topk(k)` keeps, for every query row, the k earlier keys of largest q·k; `causal() & topk(k,
scorer=lowrank())` ranks them by (q P)·(k P) instead, with P [D, r] given at call time as `proj=` (DSA, Liu et al.,
arXiv 2110.11299; `attngen.random_projection(D, r, seed)` draws its sparse P of -1, 0, +1), which costs r multiply-adds
a pair instead of D. For one set of random queries and keys, the script builds both selections as the float64
reference masks (`pattern.mask(Sq, Sk, q=q, k=k, proj=P)`) and prints, for each rank r, the recall (the share of the
exact top-k keys that the prediction keeps too) and the softmax weight the kept keys carry (the mean over rows of the
share of each row's causal attention weight, scale 1/√D), over the rows with more than k earlier keys (the others
keep all of theirs either way). The first line is the exact top-k, the last what k keys drawn at random would give
in expectation. The queries and keys are standard normal, with no structure for the prediction to follow; trained
models' are not, so measure on yours: the same masks take any q and k, and on a GPU `attngen.selected_keys(q, k,
pattern, proj=P)` gives the lists a call uses. CPU only, a few seconds; `attngen.attention(q, k, v, pattern, proj=P)`
runs the attention over the kept keys on a GPU, with one compiled kernel for every k and every P."""

import argparse

import torch

import attngen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512, help="queries and keys per head")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--top", type=int, default=32, help="k: keys kept per query row")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="ranks r of P to try")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    S, D, top = args.seq, args.head_dim, args.top
    if not 0 < top < S:
        parser.error(f"--top must be between 1 and --seq - 1, got {top}")

    gen = torch.Generator().manual_seed(args.seed)
    q, k = (torch.randn(1, args.heads, S, D, generator=gen) for _ in range(2))
    causal = attngen.causal().mask(S, S)
    weights = torch.softmax((q.double() @ k.double().transpose(-1, -2) / D**0.5).masked_fill(~causal, -torch.inf), -1)
    rows = torch.arange(S) >= top  # rows with more than `top` candidates

    exact_pattern = attngen.causal() & attngen.topk(top)
    exact = exact_pattern.mask(S, S, q=q, k=k)[..., rows, :]

    def measure(kept: torch.Tensor) -> tuple[float, float]:
        recall = (kept & exact).sum().item() / exact.sum().item()
        return recall, (weights[..., rows, :] * kept).sum(-1).mean().item()

    predicted = attngen.causal() & attngen.topk(top, scorer=attngen.lowrank())
    print(f"{args.heads} heads of {S} random queries and keys, head dim {D}; rows {top} to {S - 1}")
    print(f"exact: {exact_pattern!r}   predicted: {predicted!r}, proj=random_projection({D}, r)\n")
    print(f"{'selection':<28}{'recall':>8}{'weight kept':>13}")
    print(f"{'exact q·k':<28}{1:>8.3f}{measure(exact)[1]:>13.3f}")
    for r in args.ranks:
        proj = attngen.random_projection(D, r, seed=args.seed)
        recall, weight = measure(predicted.mask(S, S, q=q, k=k, proj=proj)[..., rows, :])
        print(f"{f'lowrank, r = {r}':<28}{recall:>8.3f}{weight:>13.3f}")
    chance = (top / torch.arange(top + 1, S + 1, dtype=torch.float64)).mean().item()  # k of the i + 1 earlier keys
    print(f"{f'{top} random earlier keys':<28}{chance:>8.3f}{chance:>13.3f}")


if __name__ == "__main__":
    main()
