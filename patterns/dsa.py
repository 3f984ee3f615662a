"""DSA: each query attends to the k keys its low-rank predicted scores rank highest.

Liu et al., "Transformer Acceleration with Dynamic Sparse Attention" (2021; arXiv 2110.11299). The attention pattern of
a trained model depends on its input, so DSA predicts it per input: queries and keys are projected to a small rank r by
a sparse random matrix P (entries -1, 0, +1), the predicted scores (q P)·(k P) cost r instead of D multiply-adds a pair,
and each query row keeps the keys they rank highest; the attention is then exact over the kept keys. `topk(k,
scorer=lowrank())` is that selection: per batch, query head and row, the k keys with the largest (q P)·(k P) among the
keys the rest of the pattern allows (`causal()` here; `causal=False` for an encoder), ties to the lower key, with P
given at call time as `proj=` [D, r] or one per query head [Hq, D, r] (`attngen.random_projection(D, r, seed)` draws the
sparse one). Selected per call in fp32 (rows in chunks, nothing S x S); the per-head lists run on the flash kernels as
one bit per (query, key). One compiled kernel serves every k and every P. `examples/09_topk_recall.py` measures how much
of the exact top-k the prediction finds as r grows.

    PYTHONPATH=. python patterns/dsa.py"""

import torch

import attngen


def pattern(top: int = 256, causal: bool = True) -> attngen.Pattern:
    """Each query's `top` keys by the low-rank prediction, among the keys not after it (`causal`) or among all."""
    select = attngen.topk(top, scorer=attngen.lowrank())
    return attngen.causal() & select if causal else select


def main(seq_len: int = 16384, size: int = 64, top: int = 8, rank: int = 16) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, size, 64, generator=gen) for _ in range(2))
    proj = attngen.random_projection(64, rank, seed=0)  # [64, rank] of -1, 0, +1
    p, small, exact = pattern(), pattern(top), attngen.causal() & attngen.topk(top)
    predicted = small.mask(size, size, q=q, k=k, proj=proj)[0, 0]
    best = exact.mask(size, size, q=q, k=k)[0, 0]
    rows = slice(top, None)  # rows with more than `top` candidates: the earlier ones keep all of theirs
    found = (predicted & best)[rows].sum().item() / best[rows].sum().item()
    print(f"dsa  {p!r}")
    print(f"compiled as {p.structure()!r}: the keys are chosen from q, k and proj at each call")
    print(f"{small!r} on {size} random queries and keys of dim 64, proj of rank {rank} (█ kept, · not):")
    print(small.draw(size, size, q=q, k=k, proj=proj))
    print(f"the prediction finds {found:.0%} of the exact top {top} by q·k ({exact!r}) on rows {top} and after")
    print(attngen.compile(p, head_dim=128, dtype=torch.bfloat16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
