"""T5: relative-position buckets instead of position embeddings (T5, Flan-T5, mT5, UL2).

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (2020). Each
head adds a learned scalar to its scores, chosen by the bucket of the relative position k - q: distances below
num_buckets / 4 (bidirectional) get a bucket each, longer ones share log-spaced buckets up to max_distance, and
beyond it one bucket. The encoder is bidirectional (later keys have their own buckets), the decoder's
self-attention causal with one direction. T5 does not scale its scores, so calls pass scale=1.0. In attngen the
mask is a pattern and the bias a score modification whose table, [heads, num_buckets], is a call-time tensor with a
gradient:

    out = attngen.attention(q, k, v, pattern(), scale=1.0, score_mod=score_mod(), rel_table=table)

    PYTHONPATH=. python patterns/t5.py"""

import torch

import attngen


def pattern(decoder: bool = True) -> attngen.Pattern:
    """The decoder's self-attention is causal; the encoder's sees every key."""
    return attngen.causal() if decoder else attngen.full()


def score_mod(num_buckets: int = 32, max_distance: int = 128, decoder: bool = True):
    """rel_table[h, bucket(k - q)] added to head h's scores (T5's defaults: 32 buckets, max distance 128)."""
    return attngen.rel_bias(num_buckets, max_distance, bidirectional=not decoder)


def table_of(embedding: torch.nn.Embedding) -> torch.Tensor:
    """The table of a T5 layer's `relative_attention_bias` (an embedding [num_buckets, heads]) as rel_table=
    [heads, num_buckets], sharing its gradient."""
    return embedding.weight.t()


def main(seq_len: int = 1024) -> None:
    p = pattern()
    print(f"t5  {p!r}\n{p.draw(seq_len, seq_len)}")  # █ kept, ▒ partly kept, · masked
    kern = attngen.compile(p, head_dim=64, dtype=torch.bfloat16, arch="sm_90", score_mod=score_mod())
    print(kern.explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
