"""MoBA: each query block attends to the key blocks its mean query scores highest on, causally.

Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs" (2025; arXiv 2502.13189). The keys are cut into
blocks; a gate scores each block by the dot product of the query with the block's mean key and keeps the top k, the
query's own block always among them, all under the causal mask. FlashMoBA computes the gate per query block of the
same size (the mean query of the block against each mean key), which is what `topk_blocks(k, block)` does: per
batch, query head and query block, the k key blocks with the largest mean(q) · mean(k) among the blocks that causal()
allows for it (the query's own block is one of them when it scores among the k best; MoBA's forced current block is
`causal() & (topk_blocks(k - 1) | local(block, 0))`-like, not this). Selected per call on the GPU from pooled means;
the compiled kernels are those of the structure and serve every k. FlashMoBA's configuration is block 128, top 8.

    PYTHONPATH=. python patterns/moba.py"""

import torch

import attngen


def pattern(top: int = 8, block: int = 128) -> attngen.Pattern:
    """Causal attention to the `top` best key blocks of `block` keys of every query block."""
    return attngen.causal() & attngen.topk_blocks(top, block=block)


def main(seq_len: int = 8192) -> None:
    p = pattern(top=3, block=64)  # small enough to see on a 64 x 64 drawing
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1024, 64, generator=gen) for _ in range(2))
    print(f"moba  {pattern()!r}")
    print(f"compiled as {pattern().structure()!r}: the blocks are chosen from q and k at each call")
    print(f"{p!r} on 1024 random queries and keys, 16 x 16 positions a cell (█ kept, ▒ some, · none):")
    print(p.draw(1024, 1024, q=q, k=k))
    print(attngen.compile(pattern(), head_dim=128, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
