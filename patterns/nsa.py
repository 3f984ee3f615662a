"""NSA-like selection: each query block attends to its best key blocks and to a sliding window, causally.

Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention" (2025; arXiv
2502.11089). NSA runs three branches and gates their outputs: compressed tokens, selected blocks (the top n blocks of
64 keys by an importance score shared by the query heads of a KV group) and a sliding window of 512. The selected and
sliding branches attend to a union of keys, which one pattern expresses as `causal() & (topk_blocks(16, block=64) |
sliding_window(512))`: the blocks are scored by mean(q of the query block) · mean(k of the key block) per query head
(NSA derives its scores from the compressed branch's attention instead), then the window adds its keys. The
compressed branch and the gate are ordinary layers outside the kernel. Selected per call on the GPU; one compiled
kernel serves every number of blocks.

    PYTHONPATH=. python patterns/nsa.py"""

import torch

import attngen


def pattern(top: int = 16, block: int = 64, window: int = 512) -> attngen.Pattern:
    """Causal attention to the `top` best key blocks of every query block, and to the last `window` keys."""
    return attngen.causal() & (attngen.topk_blocks(top, block=block) | attngen.sliding_window(window))


def main(seq_len: int = 32768) -> None:
    p = pattern(top=2, window=128)  # small enough to see on a 64 x 64 drawing
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1024, 64, generator=gen) for _ in range(2))
    print(f"nsa  {pattern()!r}")
    print(f"compiled as {pattern().structure()!r}: the blocks are chosen from q and k at each call")
    print(f"{p!r} on 1024 random queries and keys, 16 x 16 positions a cell (█ kept, ▒ some, · none):")
    print(p.draw(1024, 1024, q=q, k=k))
    print(attngen.compile(pattern(), head_dim=128, dtype=torch.bfloat16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
