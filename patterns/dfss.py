"""DFSS: dynamic N:M sparse attention, keeping the 2 largest scores of every 4 consecutive keys.

Chen et al., "Dynamic N:M Fine-Grained Structured Sparse Attention Mechanism" (PPoPP 2023, arXiv 2203.00091).
Most of a softmax row's weight sits on a few keys, so the small scores can be dropped on the fly: after QKᵀ each
query row keeps, in every group of 4 adjacent keys, the 2 with the highest scores (or 1 of every 2). That shape is
what sparse tensor cores take, so P·V runs on half the keys at the dense rate, and nothing is precomputed or stored:
the choice follows the scores of each input. The paper reports that a short fine-tune with the sparse attention (or
none at all) brings a pretrained model back to its dense accuracy. Here the rule composes with the positions a
pattern allows: `causal() & nm(2, 4)` for a decoder, `nm(2, 4)` alone for an encoder as in the paper. The mask
drawn below is what the rule keeps for one head of random queries and keys: it depends on the scores, so the
kernels' tile schedule is that of the positional part.

    PYTHONPATH=. python patterns/dfss.py"""

import torch

import attngen
from attngen import reference


def pattern(n: int = 2, m: int = 4, causal: bool = True) -> attngen.Pattern:
    """The n largest scores of every m consecutive keys, among the keys not after the query (`causal`) or all."""
    rule = attngen.nm(n, m)
    return attngen.causal() & rule if causal else rule


def kept(p: attngen.Pattern, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Bool [size, size]: the keys `p` keeps for one head of random queries and keys. With head dim = keys = `size`
    and V the identity, each output row of the reference is that query's row of attention probabilities."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, size, size, generator=gen) for _ in range(2))
    probs, _ = reference.attention(q, k, torch.eye(size).expand(1, 1, size, size), p)
    return probs[0, 0] > 0


def main(seq_len: int = 1024) -> None:
    p = pattern()
    picture = "\n".join("".join("█" if x else "·" for x in row) for row in kept(p).tolist())  # █ kept, · not
    print(f"dfss  {p!r}\n{picture}")
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
