"""ALiBi: attention with linear biases instead of position embeddings (BLOOM, MPT).

Press, Smith and Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation"
(2022). Each head h adds slopes[h] · (k - q) to its causal attention scores: a penalty growing with the distance
to the key, steeper in some heads than in others. The slopes are the geometric sequence 2^(-8 i / n) for n heads
(a power of two; otherwise those of the next lower power of two, then every other slope of twice that many).
In attngen the mask is `causal()` and the bias a score modification whose slopes are a call-time tensor:

    out = attngen.attention(q, k, v, pattern(), score_mod=score_mod(heads, device="cuda"))

    PYTHONPATH=. python patterns/alibi.py"""

import math

import torch

import attngen


def slopes(heads: int) -> list[float]:
    """ALiBi's head slopes, from the paper's construction."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if heads & (heads - 1) == 0:
        return power_of_two(heads)
    lower = 2 ** math.floor(math.log2(heads))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: heads - lower]


def pattern() -> attngen.Pattern:
    """ALiBi models are causal; the bias is the score modification."""
    return attngen.causal()


def score_mod(heads: int = 16, device: str = "cpu"):
    """slopes[h] · (k - q) added to head h's scores."""
    return attngen.alibi(torch.tensor(slopes(heads), device=device))


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"alibi  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    kern = attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90", score_mod=score_mod())
    print(kern.explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
