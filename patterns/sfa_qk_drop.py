"""SFA query/key dropping: causal attention among the queries and keys that are kept, per head.

Pagliardini et al., "Fast Attention Over Long Sequences With Dynamic Sparse Flash Attention" (NeurIPS 2023; arXiv
2306.01160, first titled "Faster Causal Attention Over Large Sequences Through Sparse Flash Attention"). Each
head drops some of its queries and some of its keys, chosen per sequence (in the paper's experiments at random,
each token of each head with a fixed probability), and the rest attend causally as usual. A dropped key is seen
by no query; a dropped query attends to nothing and outputs 0 (LSE -inf), and its gradients are 0. The paper
extends FlashAttention to run on the kept tokens only, compacted, with their original positions for the causal
mask. Here `keep()` takes the kept queries and keys as bool masks at call time (`query_keep=` [B, Hq, S],
`key_keep=` [B, Hkv, S], True = kept); `attngen.attention` moves the dropped tokens of every head to the end,
skips the tiles they fill, and applies the causal mask to the original positions. The kernels depend only on the
pattern, so new masks at every step (from `random_keep`, say) reuse them. The mask drawn below drops half the
queries and half the keys of a 64-token sequence.

    PYTHONPATH=. python patterns/sfa_qk_drop.py"""

import torch

import attngen


def pattern() -> attngen.Pattern:
    """Keys not after the query, among the kept queries and keys (pass `query_keep=`, `key_keep=`)."""
    return attngen.causal() & attngen.keep()


def random_keep(
    batch: int, heads: int, seq_len: int, rate: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Bool [batch, heads, seq_len], True = kept: each token of each head dropped independently with probability
    `rate`. Draw query masks with the query heads and key masks with the key/value heads."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be between 0 and 1, got {rate}")
    device = device if device is not None else generator.device if generator is not None else "cpu"
    return torch.rand(batch, heads, seq_len, generator=generator, device=device) >= rate


def main(seq_len: int = 1024) -> None:
    p = pattern()
    gen = torch.Generator().manual_seed(0)
    query_keep, key_keep = (random_keep(1, 1, 64, 0.5, gen) for _ in range(2))
    print(f"sfa_qk_drop  {p!r}")
    picture = p.draw(64, 64, query_keep=query_keep, key_keep=key_keep)
    print(f"half of 64 queries and keys dropped (█ kept, · not):\n{picture}")
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
