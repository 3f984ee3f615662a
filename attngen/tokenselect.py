"""Call-time stage, in `prepare`: a `topk(k)` leaf's choice -> key-index lists, int32 [B, H', Sq, min(k, Sk)]
(-1 pads), which then run as a key_indices() leaf's lists do (`keyindex.sorted_lists`): one list per
query head (exact scores, lowrank) or one per token shared by the heads (indexer; H' = the KV heads, each holding
the same lists, so that the gather kernels give a KV head's query heads one list).

The pass never holds anything S x S: query rows a chunk at a time (at most CHUNK scores, counting the indexer's
heads where torch computes them), scored in fp32 only over the keys some row of the chunk may take (the &-context's
tile classes), exact scores then scaled and modified as the softmax sees them (the call's score modifications,
applied at the chunk's place: `scoremod.Window`), masked by the context evaluated pair by pair where its tiles are
not full (`blockselect.allowed`; for a shared selection, a key is a candidate where the context allows it for some
head), then per row the k best candidates with ties to the lower key index (a -inf score is never taken).
On CUDA two kernels do the work: the indexer's scores on tensor cores (`device.indexer_scores`; the others are
GEMMs with fp32 accumulation, `tokentopk.scores`) and a radix select per row (`device.topk_rows`); elsewhere torch
(one torch.topk, `blocktopk.choose` for rows with ties at the k-th value)."""

from __future__ import annotations

import torch

from . import blockselect, blocktopk, device, schedule, scoremod, tokentopk
from . import pattern as P
from .affine import EMPTY, FULL

CHUNK = 1 << 26  # scores held at once
SPAN = 64  # keys: the granularity at which a chunk's candidate keys are bounded


@torch.compiler.disable  # chunked host loop: a graph break under torch.compile
def select(
    pattern: P.Pattern,
    q: torch.Tensor,
    k: torch.Tensor,
    runtime,
    inputs: dict,
    scale: float,
    mods: tuple = (),
    q0: int = 0,
) -> torch.Tensor:
    """The lists of the pattern's `topk` (or `threshold`) leaf for this call. `runtime` holds the context's call-time
    tensors (a `prepare.Prepared` without the lists), `inputs` the scorer's (checked). Exact scores are ranked as the
    softmax sees them: at the attention's `scale`, with the score modifications `mods` (bound: `scoremod.bind`; q's
    rows at positions from `q0` on, for their positional terms)."""
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
        fused = q.is_cuda  # the kernels: indexer scores (where they apply) and the per-row top-k
        torch_indexer = leaf.shared and not fused  # holds [R, Hi, C] logits besides the scores
        per_row = B * heads * Sk * (inputs["index_q"].shape[2] + 1 if torch_indexer else 1)
        rows = max(1, CHUNK // per_row)
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(Hq, device=q.device).view(1, -1, 1, 1)
        # The keys some row of each chunk may take, from the context's tile classes (a superset at SPAN keys):
        # scored only there, so that causal rows skip the keys after them. One host sync for the whole call.
        # The pairs are evaluated only over the spans that are not FULL for every batch and head (the diagonal band
        # of causal rows), and the scores masked there.
        cls = schedule.classes(context, rows, SPAN, Sq, Sk, q.device, runtime, Hq).flatten(0, 1)
        spans, full = (cls > EMPTY).any(0).cpu(), (cls == FULL).all(0).cpu()  # [chunks, key spans]
        for chunk, r0 in enumerate(range(0, Sq, rows)):
            taken = torch.nonzero(spans[chunk]).flatten()
            if taken.numel() == 0:
                continue  # the chunk's rows have no candidate: their lists stay empty
            t0, t1 = int(taken[0]), int(taken[-1]) + 1
            c0, c1 = t0 * SPAN, min(Sk, t1 * SPAN)
            r1 = min(Sq, r0 + rows)
            s = None
            if fused and leaf.shared:
                s = device.indexer_scores(*(inputs[n] for n in leaf._inputs), slice(r0, r1), slice(c0, c1))
                s = s.unsqueeze(1) if s is not None else None
            if s is None:
                s = tokentopk.scores(leaf.scorer, q, keys, inputs, slice(r0, r1), slice(c0, c1), torch.float32)
            if leaf.scorer is None and (mods or leaf.t is not None):  # the exact scores as the softmax sees them
                at = scoremod.Window(Sq, Sk, slice(r0, r1), slice(c0, c1), q0)  # (a positive scale alone ranks alike)
                s = scoremod.reference(mods, s.mul_(scale), at)
            mixed = torch.nonzero(~full[chunk, t0:t1]).flatten()
            if mixed.numel():
                p0, p1 = c0 + int(mixed[0]) * SPAN, min(Sk, c0 + (int(mixed[-1]) + 1) * SPAN)
                qi = torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1)
                kj = torch.arange(p0, p1, device=q.device).view(1, 1, 1, -1)
                cand = blockselect.allowed(context, b, h, qi, kj, Sq, Sk, runtime, Hq)
                cand = cand.any(1, keepdim=True) if leaf.shared and cand.shape[1] > 1 else cand
                s[..., p0 - c0 : p1 - c0].masked_fill_(~cand, float("-inf"))
            if leaf.t is not None:  # the chunk holds every candidate of its rows: their softmax is the row's
                s.masked_fill_(~tokentopk.kept_by_threshold(s, leaf.t), float("-inf"))
            if fused:
                best = device.topk_rows(s.view(-1, c1 - c0), leaf.k, c0).view(*s.shape[:3], -1)
            else:
                best = _best(s, s > float("-inf"), leaf.k)
                best = torch.where(best >= 0, best + c0, -1)
            lists[:, :, r0:r1, : best.shape[-1]] = best
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
