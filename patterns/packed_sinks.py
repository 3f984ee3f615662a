"""Sliding window with attention sinks, restarting in each document of a packed sequence.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023) keeps a causal
window of recent keys plus the first few tokens of the text, on which softmax mass collects ("sinks"). Trained on
packed sequences, each document is its own text: its window and its sinks start at its first token, and nothing
crosses documents. `in_document` evaluates the pattern on positions within each document, so the sinks are the
first tokens of every document, wherever it starts in the pack. The document ids are a call-time tensor:
`attngen.attention(q, k, v, pattern(), document_ids=ids)`, ids [B, S] or [S], one kernel for every packing.

    PYTHONPATH=. python patterns/packed_sinks.py"""

import torch

import attngen


def pattern(window: int = 1024, sinks: int = 4) -> attngen.Pattern:
    """Within each document: causal, and the key among the last `window` positions or the first `sinks`."""
    return attngen.in_document(attngen.causal() & (attngen.sliding_window(window) | attngen.predicate(f"k < {sinks}")))


def document_ids(lengths: list[int]) -> torch.Tensor:
    """int32 ids [sum(lengths)] numbering the documents 0, 1, ... for documents packed in this order."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


def main(seq_len: int = 1024) -> None:
    p = pattern(window=96, sinks=16)
    lengths = [seq_len // 2, seq_len // 8, seq_len // 4]
    lengths.append(seq_len - sum(lengths))
    picture = p.draw(seq_len, seq_len, document_ids=document_ids(lengths))  # █ kept, ▒ partly kept, · masked
    print(f"packed_sinks  {p!r}\n{picture}")
    print(attngen.compile(p, head_dim=64, dtype=torch.bfloat16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
