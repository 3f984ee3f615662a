"""DeepSeek Sparse Attention: a lightning indexer scores the keys; each query attends to its 2048 best.

DeepSeek-AI, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse Attention" (2025). A small
indexer with its own heads (64 of dim 128 in V3.2-Exp, run in FP8) scores query token i against key token j as
I(i, j) = Σₕ w[i, h] · ReLU(q̃[i, h] · k̃[j]), with index queries q̃ and weights w computed from the query token
and one index key k̃ per token; each query token then attends to the 2048 keys of largest I among those not after
it. The choice is made once per token and shared by every query head (V3.2-Exp runs its MLA in the MQA form, one
latent key and value per token). `causal() & topk(2048, scorer=indexer())` is that selection, with index_q [B, Sq,
Hi, Di], index_k [B, Sk, Di] and index_w [B, Sq, Hi] given at call time (the indexer's projections, RoPE and
quantisation are the model's, outside the kernel); ties go to the lower key, and a row with fewer than 2048
candidates keeps them all. Selected per call in fp32 (rows in chunks, nothing S x S): one sorted list of keys per
token, which the gather kernels walk (cp.async gathers of the listed K and V rows, one warp per query token and up
to 16 heads sharing its list; dK/dV over the inverted lists, deterministic). The indexer's own training (its KL
loss against the attention) is outside it: no gradient flows through the scores.

    PYTHONPATH=. python patterns/deepseek_indexer.py"""

import torch

import attngen
from attngen.prepare import prepare


def pattern(top: int = 2048) -> attngen.Pattern:
    """Each query's `top` keys by the indexer's scores, among the keys not after it."""
    return attngen.causal() & attngen.topk(top, scorer=attngen.indexer())


def indexer_inputs(size: int = 64, heads: int = 4, dim: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random call-time inputs for one sequence of `size` tokens: index_q [1, size, heads, dim], index_k
    [1, size, dim] and index_w [1, size, heads], standard normal, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "index_q": torch.randn(1, size, heads, dim, generator=gen),
        "index_k": torch.randn(1, size, dim, generator=gen),
        "index_w": torch.randn(1, size, heads, generator=gen),
    }


def main(seq_len: int = 32768, size: int = 64, top: int = 8) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, size, 64, generator=gen)  # 16 query heads on one KV head: all share the selection
    k = torch.randn(1, 1, size, 64, generator=gen)
    inputs = indexer_inputs(size)
    p, small = pattern(), pattern(top)
    reference = small.mask(size, size, q=q, k=k, **inputs)  # float64, [1, 1, size, size]: one for every head
    lists = prepare(small, q, k, inputs).key_lists  # the call's fp32 pass: int32 [1, 1, size, top], -1 pads
    listed = attngen.key_indices().mask(size, size, key_indices=lists, q=q)  # [1, 16, size, size]
    agree = (listed == reference).all(-1).all(1).sum().item()  # rows chosen alike for every head
    print(f"deepseek_indexer  {p!r}")
    print(f"compiled as {p.structure()!r}: the keys are chosen from index_q, index_k and index_w at each call")
    print(f"{small!r} on {size} tokens, 4 index heads of dim 32, random inputs (█ kept, · not):")
    print(small.draw(size, size, q=q, k=k, **inputs))
    print(f"mask shape {tuple(reference.shape)}: one selection for all {q.shape[1]} query heads")
    for row in (3, size // 2, size - 1):
        print(f"  query {row:2d} attends to keys {[j for j in lists[0, 0, row].tolist() if j >= 0]}")
    print(
        f"the call's fp32 lists (attngen.selected_keys on a GPU) match the float64 reference on {agree} of {size} rows"
    )
    print(attngen.compile(p, head_dim=128, dtype=torch.bfloat16, arch="sm_90").explain(seq_len, seq_len))


if __name__ == "__main__":
    main()
