"""Longformer: every token sees a band of neighbours on both sides; a few global tokens see and are seen by all.

Beltagy, Peters and Cohan, "Longformer: The Long-Document Transformer" (2020). Each token attends to `window`
neighbours split evenly before and after it, which keeps the cost linear in the length. Tokens that need the
whole document (the [CLS] token for classification, the question for QA) get global attention in both
directions. Here the global tokens are the first `n_global` positions: put them at the front of the sequence.

    PYTHONPATH=. python patterns/longformer.py"""

import torch

import attngen


def pattern(window: int = 512, n_global: int = 16) -> attngen.Pattern:
    """Band of `window // 2` keys on each side of the query, or either position among the first `n_global`."""
    return attngen.local(window // 2, window // 2) | attngen.global_tokens(n_global)


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"longformer  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
