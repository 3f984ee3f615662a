"""Gemma 2: sliding-window and global layers alternating, with attention logits soft-capped.

Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size" (2024). Every other layer attends
within a local sliding window of 4096 tokens, the others to the whole causal prefix, and every layer caps its
attention logits with s -> 50 · tanh(s / 50) before the softmax. In attngen the window is the pattern and the
cap is a score modification passed with the call:

    out = attngen.attention(q, k, v, pattern(layer), score_mod=score_mod())

    PYTHONPATH=. python patterns/gemma2.py"""

import torch

import attngen


def pattern(layer: int = 0, window: int = 4096) -> attngen.Pattern:
    """Layer `layer`'s mask: a causal sliding window of `window` keys on even layers, causal on odd ones."""
    return attngen.sliding_window(window) if layer % 2 == 0 else attngen.causal()


def score_mod(cap: float = 50.0):
    """Gemma 2's attention logit soft-capping, s -> cap · tanh(s / cap)."""
    return attngen.softcap(cap)


def main(seq_len: int = 1024) -> None:
    p = pattern(window=256)
    print(f"gemma2  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    kern = attngen.compile(p, head_dim=64, dtype=torch.bfloat16, arch="sm_90", score_mod=score_mod())
    print(kern.explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
