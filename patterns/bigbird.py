"""BigBird: a block-sparse mix of a sliding window, global blocks and a few random blocks per query block.

Zaheer et al., "Big Bird: Transformers for Longer Sequences" (2020). The sequence is cut into blocks; each query
block sees the blocks around it (the window), the global blocks (which also see everything), and
`random_blocks` other key blocks drawn at random, which shortens the path between any two tokens. The random
choice is drawn once from a seeded generator, so the same arguments always give the same pattern (and the same
compiled kernel). With `heads`, every head gets its own random blocks, as in the paper. The paper's ITC
variant makes the first and the last block global; here the global blocks are the first `global_blocks`.

    PYTHONPATH=. python patterns/bigbird.py"""

import math

import torch

import attngen


def layout(
    seq_len: int, block_size: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int, heads: int
) -> torch.Tensor:
    """Bool [heads, n, n] block grid of the window and the random blocks (n = blocks covering seq_len)."""
    n = math.ceil(seq_len / block_size)
    qb, kb = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (qb - kb).abs() <= window_blocks // 2
    grid = window.repeat(heads, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    for h in range(heads):
        for row in range(global_blocks, n):  # global rows see everything already
            candidates = torch.nonzero(~window[row] & (kb[0] >= global_blocks)).flatten()
            picked = candidates[torch.randperm(len(candidates), generator=gen)[:random_blocks]]
            grid[h, row, picked] = True
    return grid


def pattern(
    seq_len: int = 4096,
    block_size: int = 64,
    window_blocks: int = 3,
    global_blocks: int = 2,
    random_blocks: int = 3,
    seed: int = 0,
    heads: int | None = None,
) -> attngen.Pattern:
    """The first `global_blocks` blocks are global; the window and random blocks form a block layout that
    covers sequences up to `seq_len` (per head when `heads` is given)."""
    grid = layout(seq_len, block_size, window_blocks, global_blocks, random_blocks, seed, heads or 1)
    return attngen.global_tokens(global_blocks * block_size) | attngen.block_layout(
        grid if heads else grid[0], block_size
    )


def main(seq_len: int = 1024) -> None:
    p = pattern(seq_len=seq_len)  # random blocks drawn among the blocks that are on screen
    print(f"bigbird  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
