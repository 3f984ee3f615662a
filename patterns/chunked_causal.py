"""Chunked causal: the sequence is cut into fixed chunks; a token sees the earlier tokens of its own chunk only.

The local layers of Llama 4 (Meta, 2025) attend within chunks of 8192 tokens, interleaved with global layers
that see everything; the chunks bound the key-value cache of those layers and make the model extrapolate to
lengths never seen in training. Unlike a sliding window, the first token of a chunk starts afresh. The chunks
are the diagonal of a block layout of `chunk`-sized blocks, intersected with the causal rule.

    PYTHONPATH=. python patterns/chunked_causal.py"""

import math

import torch

import attngen


def pattern(chunk: int = 256, seq_len: int = 16384) -> attngen.Pattern:
    """Causal within each `chunk` tokens (the layout covers sequences up to `seq_len`)."""
    n = math.ceil(seq_len / chunk)
    return attngen.causal() & attngen.block_layout(torch.eye(n, dtype=torch.bool), chunk)


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"chunked_causal  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
