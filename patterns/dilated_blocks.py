"""Dilated blocks: causal block-sparse attention to the nearest blocks and to every `dilation`-th block before.

The "strided" factorisation of Sparse Transformers (Child et al., "Generating Long Sequences with Sparse
Transformers", 2019), taken at block granularity as block-sparse kernels do (DeepSpeed sparse attention, Triton's
block-sparse matmul): a query block sees its `local_blocks` nearest blocks and then every `dilation`-th block
further back, so information crosses the sequence in two hops at about 1/dilation of the dense cost. Inside a
block the usual causal rule applies.

    PYTHONPATH=. python patterns/dilated_blocks.py"""

import math

import torch

import attngen


def layout(seq_len: int, block_size: int, local_blocks: int, dilation: int) -> torch.Tensor:
    """Bool [n, n] block grid: key block j <= query block i, either near i or a multiple of `dilation` away."""
    n = math.ceil(seq_len / block_size)
    back = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # how many blocks the key lies behind
    return (back >= 0) & ((back < local_blocks) | (back % dilation == 0))


def pattern(seq_len: int = 8192, block_size: int = 128, local_blocks: int = 2, dilation: int = 3) -> attngen.Pattern:
    """Causal, restricted to the dilated block layout (which covers sequences up to `seq_len`). Blocks of 128
    match the kernels' 128-row query tiles, so most visited tiles run without evaluating the mask."""
    return attngen.causal() & attngen.block_layout(layout(seq_len, block_size, local_blocks, dilation), block_size)


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"dilated_blocks  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
