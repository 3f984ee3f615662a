"""Neighbourhood attention (NATTEN): each token attends to a fixed-size window of its neighbours, on a 1-D sequence
or on a 2-D grid of tokens (an image's patches).

Hassani et al., "Neighborhood Attention Transformer" (2023). Token (i, j) of an H x W grid, stored row by row
(position q = i·W + j), attends to the kh x kw keys around it; at the borders the window shifts inwards instead
of shrinking, so every query sees exactly kh·kw keys. In attngen this is a predicate on q // W and q % W (row and
column), which the tile classifier bounds like any other, so tiles outside every window are never visited:

    ag.attention(q, k, v, pattern(64, 64, 7, 7))         # 64 x 64 patches, 7 x 7 neighbourhoods

    PYTHONPATH=. python patterns/natten.py"""

import torch

import attngen


def _window(qi: str, ki: str, size: int, n: str) -> str:
    """Key coordinate `ki` in the `size`-wide window of query coordinate `qi` among `n`, shifted inside [0, n):
    start = min(max(qi - size // 2, 0), n - size), start <= ki < start + size."""
    r = size // 2
    return (
        f"(({ki} >= {qi} - {r}) | ({ki} >= {n} - {size})) & (({ki} <= {qi} - {r} + {size - 1}) | ({ki} <= {size - 1}))"
    )


def pattern(height: int = 16, width: int = 16, kernel_h: int = 5, kernel_w: int = 5) -> attngen.Pattern:
    """2-D neighbourhood attention on a `height` x `width` grid stored row by row, `kernel_h` x `kernel_w` keys."""
    if not (0 < kernel_h <= height and 0 < kernel_w <= width):
        raise ValueError(f"a {kernel_h} x {kernel_w} neighbourhood does not fit a {height} x {width} grid")
    rows = _window(f"q // {width}", f"k // {width}", kernel_h, str(height))
    cols = _window(f"q % {width}", f"k % {width}", kernel_w, str(width))
    return attngen.predicate(f"({rows}) & ({cols})")


def pattern_1d(kernel: int = 7) -> attngen.Pattern:
    """1-D neighbourhood attention over Sk keys (Sq == Sk): the `kernel` keys around each query, shifted inwards."""
    return attngen.predicate(_window("q", "k", kernel, "Sk"))


def main(side: int = 8) -> None:
    p, seq_len = pattern(side, side, 3, 3), side * side  # one character per position: 3 x 3 neighbourhoods, 8 x 8
    print(f"natten  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
