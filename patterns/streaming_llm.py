"""StreamingLLM: a causal sliding window plus a few "attention sink" tokens at the very start.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023). A model trained with full causal
attention puts much of its attention weight on the first few tokens whatever they say; dropping them (a plain
sliding window) breaks the model once the text outgrows the window. Keeping those `n_sinks` first keys visible
to every query, next to a window of the most recent `window` keys, lets the model run on unbounded streams with
a fixed cache. With `align="bottom_right"` the window ends at the last key, for decoding with Sq < Sk.

    PYTHONPATH=. python patterns/streaming_llm.py"""

import torch

import attngen


def pattern(window: int = 256, n_sinks: int = 4, align: str = "top_left") -> attngen.Pattern:
    """Keys in the `window` ending at the query, or among the first `n_sinks`; never a future key."""
    sinks = attngen.predicate(f"k < {n_sinks}")
    return attngen.causal(align=align) & (attngen.sliding_window(window, align=align) | sinks)


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"streaming_llm  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
