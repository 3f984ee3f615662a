"""Dilated sliding window: a causal window of `window` keys taken every `dilation`-th position.

Beltagy et al., "Longformer: The Long-Document Transformer" (2020), section 3.1: some heads attend to a window with
gaps, which widens the receptive field to window · dilation positions at the cost of `window` keys. In attngen it
is one predicate, (q - k) % dilation == 0 within the reach; the `%` is classified per tile like any affine
predicate (no list of diagonals, no per-call data):

    ag.attention(q, k, v, pattern(128, 4))

    PYTHONPATH=. python patterns/dilated_window.py"""

import torch

import attngen


def pattern(window: int = 16, dilation: int = 4) -> attngen.Pattern:
    """Keys q, q - dilation, ..., q - (window - 1)·dilation."""
    return attngen.sliding_window(window * dilation) & attngen.predicate(f"(q - k) % {dilation} == 0")


def main(seq_len: int = 64) -> None:  # one character per position
    p = pattern()
    print(f"dilated_window  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
