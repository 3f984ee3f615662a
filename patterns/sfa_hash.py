"""SFA hash attention: a query attends only to the earlier keys that fall in its own angular-LSH bucket.

Pagliardini et al., "Fast Attention Over Long Sequences With Dynamic Sparse Flash Attention" (NeurIPS 2023; arXiv
2306.01160, first titled "Faster Causal Attention Over Large Sequences Through Sparse Flash Attention"). Every
query and key is hashed into one of n buckets by angular LSH, as in Reformer: per key/value head a random D x n/2
matrix R of standard-normal entries, bucket(x) = argmax([xR, -xR]), so that vectors at a small angle tend to
share a bucket. Reformer sorts the tokens by bucket and cuts them into chunks of a fixed size; the paper instead
extends FlashAttention to buckets of any size, skipping the tiles of tokens in different buckets. In its language
models the causal mask is strict (a token does not attend to itself; there, as in Reformer, the keys are the
normalised queries), so the first token has no key and outputs 0, and R is drawn afresh at every training step.
Here `lsh(n)` hashes q and k on each call of `attngen.attention` (a new R per call without `seed`, a fixed one
with it), sorts the tokens of every head by bucket and skips the empty tiles; the other leaves apply to the
original positions. The compiled kernels are those of `predicate("k < q") & buckets()` and serve every n and
seed. The mask drawn below is what `lsh(8, seed=0)` keeps for one head of 64 random queries and keys.

    PYTHONPATH=. python patterns/sfa_hash.py"""

import torch

import attngen


def pattern(n_buckets: int = 16, seed: int | None = None) -> attngen.Pattern:
    """Keys strictly before the query, in the query's LSH bucket (of `n_buckets`, an even number). Without `seed`
    every call draws a new hash; with one, the hash is fixed (needed to draw the mask)."""
    return attngen.predicate("k < q") & attngen.lsh(n_buckets, seed=seed)


def random_qk(size: int = 64, head_dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [1, 1, size, head_dim] of standard-normal entries, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 1, size, head_dim, generator=gen) for _ in range(2))


def main(seq_len: int = 1024) -> None:
    p = pattern(n_buckets=8, seed=0)
    q, k = random_qk()
    print(f"sfa_hash  {p!r}")
    print(f"compiled as {p.structure()!r}: the buckets come from q and k at each call")
    print(f"{p!r} on 64 random queries and keys (█ kept, · not):\n{p.draw(64, 64, q=q, k=k)}")
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
