"""Block top-k scoring (`topk_blocks`), shared by the reference (float64, `pattern.dense_mask`) and the call-time
selection on the GPU (float32, `attngen.blockselect`): pooled means, block scores, the choice of the k best.

Blocks of `block` rows are aligned at 0; the last one, cut at the sequence end, averages the rows it has. For query
block a and key block c of query head h: score(a, c) = mean(q[a]) · mean(k[c]) with the key head of h's group.
Among the candidate key blocks, the k with the largest scores are kept, ties going to the lower block index; fewer
candidates than k: all of them."""

from __future__ import annotations

import math

import torch


def pooled(x: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., ceil(S / block), D] in `dtype`: the mean of each block's rows of x [..., S, D], summed in `dtype`
    without a full copy of x in it."""
    S, D = x.shape[-2], x.shape[-1]
    whole = S // block
    parts = []
    if whole:
        parts.append(x[..., : whole * block, :].reshape(*x.shape[:-2], whole, block, D).sum(-2, dtype=dtype) / block)
    if S % block:
        parts.append(x[..., whole * block :, :].sum(-2, keepdim=True, dtype=dtype) / (S % block))
    if not parts:
        return x.new_zeros(*x.shape[:-2], 0, D, dtype=dtype)
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hq, nbq, nbk] in `dtype`: mean(q block) · mean(k block) per query head, for q [B, Hq, Sq, D] and k
    [B, Hkv, Sk, D] (a query head scores its group's key head)."""
    return pooled_scores(pooled(q, block, dtype), pooled(k, block, dtype))


def pooled_scores(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """[B, Hq, nbq, nbk]: the block scores of pooled means pq [B, Hq, nbq, D] and pk [B, Hkv, nbk, D]."""
    (B, Hq, nbq, _), (Hkv, nbk) = pq.shape, pk.shape[1:3]
    s = pq.reshape(B, Hkv, (Hq // Hkv) * nbq, -1) @ pk.transpose(-1, -2)  # a group's query heads share one GEMM
    return s.view(B, Hq, nbq, nbk)


def choose(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, Hq, nbq, nbk]: per row, the `k` candidates with the largest scores, ties to the lower index;
    `candidates` broadcasts to `scores`. The row's k-th largest value t (torch.topk, whatever order it gives equal
    values in) keeps every candidate above t and, of those equal to t, the lowest-indexed ones that fill k."""
    s = scores.masked_fill(~candidates, -math.inf)
    if k >= s.shape[-1]:
        return candidates.expand(s.shape).clone()
    t = s.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = s > t
    at = s == t
    room = k - above.sum(-1, keepdim=True)
    keep = above | (at & (at.cumsum(-1) <= room))
    return keep & candidates  # a row with fewer than k candidates has t = -inf: every candidate is kept


def candidates_of(allowed: torch.Tensor, block: int, Sq: int, Sk: int) -> torch.Tensor:
    """bool [..., nbq, nbk]: the blocks of a dense mask broadcastable to [..., Sq, Sk] that hold an allowed pair."""
    allowed = allowed.expand(*allowed.shape[:-2], Sq, Sk)
    pad = (0, -Sk % block, 0, -Sq % block)
    a = torch.nn.functional.pad(allowed, pad, value=False) if any(pad) else allowed
    nbq, nbk = a.shape[-2] // block, a.shape[-1] // block
    return a.reshape(*a.shape[:-2], nbq, block, nbk, block).any(-1).any(-2)


def expand(grid: torch.Tensor, block: int, Sq: int, Sk: int) -> torch.Tensor:
    """The dense mask [..., Sq, Sk] of a block grid [..., nbq, nbk]."""
    return grid.repeat_interleave(block, -2)[..., :Sq, :].repeat_interleave(block, -1)[..., :Sk]
