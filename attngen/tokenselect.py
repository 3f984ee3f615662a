"""Call-time stage, in `prepare`: a `topk(k)` leaf's choice -> key-index lists, int32 [B, H', Sq, min(k, Sk)]
(increasing, -1 pads), which then run as a key_indices() leaf's lists do (`keyindex.sorted_lists`): one list per
query head (exact scores, lowrank) or one per token shared by the heads (indexer; H' = the KV heads, each holding
the same lists, so that the gather kernels give a KV head's query heads one list).

The pass never holds anything S x S: query rows a chunk at a time (at most CHUNK scores, counting the indexer's
heads), each chunk's scores in fp32 (`tokentopk`), the leaf's &-context evaluated on the chunk's pairs
(`blockselect.allowed`; for a shared selection, a key is a candidate where the context allows it for some head), and
per row the k best candidates with ties to the lower key index (`blocktopk.choose`)."""

from __future__ import annotations

import torch

from . import blockselect, blocktopk, tokentopk
from . import pattern as P

CHUNK = 1 << 26  # scores held at once


@torch.compiler.disable  # chunked host loop: a graph break under torch.compile
def select(pattern: P.Pattern, q: torch.Tensor, k: torch.Tensor, runtime, inputs: dict) -> torch.Tensor:
    """The lists of the pattern's `topk` leaf for this call. `runtime` holds the context's call-time tensors (a
    `prepare.Prepared` without the lists), `inputs` the scorer's (checked)."""
    leaf, structure = P.token_leaf(pattern), pattern.structure()
    selected = next(x for x in structure.leaves() if isinstance(x, P.SelectedKeys))
    context = P.context_of(structure, selected)  # its layout slots number as the pattern's do
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    heads = 1 if leaf.shared else Hq
    width = min(leaf.k, Sk)
    lists = torch.full((B, heads, Sq, width), -1, dtype=torch.int32, device=q.device)
    if lists.numel():
        q, k = q.detach(), k.detach()
        keys = tokentopk.keys_of(leaf.scorer, k, inputs, Hq, torch.float32)
        per_row = B * heads * Sk * (inputs["index_q"].shape[2] + 1 if leaf.shared else 1)
        rows = max(1, CHUNK // per_row)
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(Hq, device=q.device).view(1, -1, 1, 1)
        kj = torch.arange(Sk, device=q.device).view(1, 1, 1, -1)
        for r0 in range(0, Sq, rows):
            r1 = min(Sq, r0 + rows)
            qi = torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1)
            cand = blockselect.allowed(context, b, h, qi, kj, Sq, Sk, runtime, Hq)
            cand = cand.any(1, keepdim=True) if leaf.shared else cand
            cols = torch.nonzero(cand.flatten(0, -2).any(0)).flatten()  # keys some row may take (one host sync)
            if cols.numel() == 0:
                continue  # the chunk's rows have no candidate: their lists stay empty
            c0, c1 = int(cols[0]), int(cols[-1]) + 1  # scored only there: causal rows skip the keys after them
            s = tokentopk.scores(leaf.scorer, q, keys, inputs, slice(r0, r1), slice(c0, c1), torch.float32)
            best = _best(s, cand[..., c0:c1], leaf.k)
            lists[:, :, r0:r1, : best.shape[-1]] = torch.where(best >= 0, best + c0, -1)
    return lists.expand(B, Hkv, Sq, width) if leaf.shared else lists


def _best(s: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., min(k, C)]: per row of scores [..., C], the columns of its k best candidates in no particular
    order, -1 where fewer exist. One torch.topk; where it left out a candidate equal to the k-th value (it may take
    any of equal values, the rule the lowest-indexed), the row is chosen again exactly (`blocktopk.choose`)."""
    s = s.masked_fill(~cand, float("-inf"))
    vals, idx = s.topk(min(k, s.shape[-1]), dim=-1, sorted=False)
    kth = vals.amin(-1, keepdim=True)
    tied = ((s == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[..., 0])
    idx = torch.where(vals > float("-inf"), idx, -1).to(torch.int32)
    redo = tied.nonzero(as_tuple=True)  # one host sync; rows of distinct scores need none
    if redo[0].numel():
        keep = blocktopk.choose(s[redo], cand.expand_as(s)[redo], k)
        idx[redo] = tokentopk.lists_of(keep, k)
    return idx
