"""Prefix LM: bidirectional attention over a prefix (the prompt), causal attention over the rest.

Used by T5's prefix-LM objective, UniLM and PaLI-style vision-language models (Raffel et al., 2020; Dong et al.,
2019): the conditioning text (or image tokens) is read as a whole, as an encoder would, while the continuation
is generated left to right. Every query sees the whole prefix; after it, a key is visible from its own
position on.

    PYTHONPATH=. python patterns/prefix_lm.py"""

import torch

import attngen


def pattern(prefix: int = 256) -> attngen.Pattern:
    """Keys in the first `prefix` positions, or keys not after the query."""
    return attngen.prefix_lm(prefix)


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"prefix_lm  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
