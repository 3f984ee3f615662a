"""Document-causal: causal attention inside each document of a packed sequence, nothing across documents.

Training on many short texts packs them end to end into one long sequence so no compute is spent on padding;
a token must then see only the earlier tokens of its own document (as in the "intra-document" masking of Llama
3 and of variable-length FlashAttention). The document ids are a call-time tensor, so one compiled kernel
serves every packing: `attngen.attention(q, k, v, pattern(), document_ids=ids)` with ids [B, S] or [S].

    PYTHONPATH=. python patterns/document_causal.py"""

import torch

import attngen


def pattern() -> attngen.Pattern:
    """Query and key in the same document, and the key not after the query."""
    return attngen.documents() & attngen.causal()


def document_ids(lengths: list[int]) -> torch.Tensor:
    """int32 ids [sum(lengths)] numbering the documents 0, 1, ... for documents packed in this order."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


def main(seq_len: int = 1024) -> None:
    p = pattern()
    lengths = [seq_len // 4, seq_len // 8, seq_len // 2]
    lengths.append(seq_len - sum(lengths))
    picture = p.draw(seq_len, seq_len, document_ids=document_ids(lengths))  # █ kept, ▒ partly kept, · masked
    print(f"document_causal  {p!r}\n{picture}")
    print(attngen.compile(p, head_dim=64, dtype=torch.float16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
