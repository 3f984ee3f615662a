"""Call-time stage, in `prepare`: a `topk_blocks` leaf's selection on the GPU -> uint8 grid [B, Hq, nbq, nbk] of the
key blocks each query block keeps, which the kernels read like a block layout (`blocks` in the plan's run-time
arguments) and the schedules classify at tile granularity.

The pass never holds anything S x S: pooled means of q and k in fp32, one small GEMM per key head, then per row a
stable descending sort of nbk block scores (`blocktopk`). The candidates are the key blocks where the leaf's
&-context allows some pair: the context's tile classes at block granularity (`schedule.classes`, exact for the
blocks it calls FULL or EMPTY), with the blocks it calls PARTIAL checked pair by pair on the GPU (Kleene logic may
call an empty block partial). A context that reads no run-time tensor has its candidates cached per length."""

from __future__ import annotations

import functools

import torch

from . import affine, blocktopk, keyindex, schedule
from . import pattern as P
from .affine import EMPTY, PARTIAL

# Pairs checked at once when the context's partial blocks are evaluated element by element.
CHUNK_PAIRS = 1 << 24


def select(pattern: P.Pattern, q: torch.Tensor, k: torch.Tensor, runtime) -> torch.Tensor:
    """uint8 [B, Hq, nbq, nbk]: the key blocks each (batch, query head, query block) keeps. `runtime` holds the
    context's call-time tensors (a `prepare.Prepared` without the grid)."""
    leaf, structure = P.topk_leaf(pattern), pattern.structure()
    context = P.context_of(structure, P.topk_leaf(structure))  # its layout slots number as the pattern's do
    Sq, Sk = q.shape[2], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # no query, key or batch: nothing to choose
        B, Hq = q.shape[:2]
        return torch.zeros(B, Hq, -(-Sq // leaf.block), -(-Sk // leaf.block), dtype=torch.uint8, device=q.device)
    if context.runtime_inputs or any(isinstance(x, P.LayoutSlot) for x in context.leaves()):
        cand = candidates(context, leaf.block, Sq, Sk, q.device, runtime, heads=q.shape[1])
    else:
        cand = _static_candidates(context, leaf.block, Sq, Sk, str(q.device))
    scores = blocktopk.block_scores(q.detach(), k.detach(), leaf.block, torch.float32)
    return blocktopk.choose(scores, cand, leaf.k).to(torch.uint8)


@torch.compiler.disable  # host work on the pattern, cached; under torch.compile a graph break
@functools.lru_cache(maxsize=64)
def _static_candidates(context: P.Pattern, block: int, Sq: int, Sk: int, device: str) -> torch.Tensor:
    return candidates(context, block, Sq, Sk, torch.device(device), None)


@torch.compiler.disable  # counts its partial blocks on the host: a graph break under torch.compile
def candidates(context: P.Pattern, block: int, Sq: int, Sk: int, device, runtime, heads=None) -> torch.Tensor:
    """bool [LB, LH, nbq, nbk]: the blocks where the positional structure `context` allows some pair (`heads`: the
    call's query heads, where key-index lists per KV head serve their groups)."""
    cls = schedule.classes(context, block, block, Sq, Sk, device, runtime, heads)
    cand = cls > EMPTY
    partial = (cls == PARTIAL).nonzero()  # [n, 4]: (batch, head, query block, key block); a device-to-host sync
    if len(partial):
        cand[tuple(partial.T)] = _any_allowed(context, partial, block, Sq, Sk, runtime, heads)
    return cand


def _any_allowed(context, blocks: torch.Tensor, block: int, Sq: int, Sk: int, runtime, heads) -> torch.Tensor:
    """bool [n]: whether `context` allows some pair of each listed block, evaluated pair by pair in chunks."""
    out = []
    offs = torch.arange(block, device=blocks.device)
    for chunk in blocks.split(max(1, CHUNK_PAIRS // (block * block))):
        b, h = chunk[:, 0].view(-1, 1, 1), chunk[:, 1].view(-1, 1, 1)
        qi = (chunk[:, 2:3] * block + offs).unsqueeze(-1)  # [n, block, 1]
        kj = (chunk[:, 3:4] * block + offs).unsqueeze(-2)  # [n, 1, block]
        ok = (qi < Sq) & (kj < Sk) & allowed(context, b, h, qi, kj, Sq, Sk, runtime, heads)
        out.append(ok.flatten(1).any(-1))
    return torch.cat(out)


def allowed(pat: P.Pattern, b, h, qi, kj, Sq: int, Sk: int, runtime, heads=None) -> torch.Tensor:
    """Whether a positional structure allows the pairs (qi, kj) of batch b, query head h (broadcasting tensors;
    indices past Sq or Sk are clamped, the caller masks them)."""
    sub = functools.partial(allowed, b=b, h=h, qi=qi, kj=kj, Sq=Sq, Sk=Sk, runtime=runtime, heads=heads)
    if isinstance(pat, (P.And, P.Or)):
        parts = [sub(p) for p in pat.parts]
        return functools.reduce(torch.logical_and if isinstance(pat, P.And) else torch.logical_or, parts)
    if isinstance(pat, P.Not):
        return ~sub(pat.part)
    qc, kc = qi.clamp(max=max(Sq - 1, 0)), kj.clamp(max=max(Sk - 1, 0))
    if isinstance(pat, P.Affine):
        value = affine.evaluate(pat.expr, {"q": qc, "k": kc, "Sq": Sq, "Sk": Sk})
        return torch.as_tensor(value, device=qi.device).expand(torch.broadcast_shapes(qi.shape, kj.shape))
    if isinstance(pat, P.LayoutSlot):
        lay, bs = runtime.layouts[pat.index], pat.block_size
        lay = lay if lay.dim() == 4 else lay[None]  # [B or 1, H or 1, nbq, nbk]
        return lay[b.clamp(max=lay.shape[0] - 1), h.clamp(max=lay.shape[1] - 1), qc // bs, kc // bs] != 0
    if isinstance(pat, (P.Documents, P.InDocument)):
        qd, kd, *within = runtime.document_ids
        bq, bk = b.clamp(max=qd.shape[0] - 1), b.clamp(max=kd.shape[0] - 1)
        same = qd[bq, qc] == kd[bk, kc]
        if isinstance(pat, P.InDocument):
            env = {"q": within[0][bq, qc].long(), "k": within[1][bk, kc].long()}
            same = same & torch.as_tensor(affine.evaluate(pat.expr, env), device=qi.device)
        return same
    if isinstance(pat, P.KeyPadding):
        return kc < runtime.key_lengths[b]
    if isinstance(pat, P.KeyIndices):
        bits = runtime.key_bits
        return keyindex.listed(bits, b, h, qc, kc, (heads or bits.shape[1]) // bits.shape[1])
    raise P.InputError(f"{pat!r} cannot be the context of a top-k leaf")
