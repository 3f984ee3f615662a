"""Context parallelism: one sequence's attention across the ranks of a torch.distributed group.

    import torch.distributed as dist, attngen as ag
    # each rank holds its shard of the sequence: q, k, v [B, H, S / world, D] (the chunks `layout` gives it)
    out = ag.distributed.attention(q, k, v, ag.causal() & ag.sliding_window(8192), group=dist.group.WORLD)
    out.sum().backward()

The sequence (Sq = Sk = S) is cut into chunks of equal length; each rank holds the chunks `layout` assigns it, in
order, concatenated: "contiguous" gives rank r chunk r, "zigzag" gives it chunks r and 2·world - 1 - r, which
balances causal work (`shard` and `unshard` convert a whole sequence to and from a rank's shard). Every (query
chunk, key chunk) block is classified on the CPU from the pattern (`schedule.tile_classes` on the chunk grid), so a
rank asks only the owners of the key chunks some block of its queries needs (a sliding window talks to its
neighbours only) and computes only those blocks, each with attngen's kernels on the pattern moved to the block
(`pattern.shifted`; a few distinct structures, compiled once). K and V travel point to point from owner to user,
all transfers posted at once, and the blocks whose keys are local run while the others arrive. Partial results merge
through the LSE the kernels return. The backward exchanges K and V again, runs each block's backward with the
merged output and LSE (which makes it that block's exact share of the gradient), and sends the dK, dV shares back
to their owners, who add them in a fixed order: deterministic, like the single-GPU backward.

Patterns: affine ones (causal, windows, local, prefix_lm, global_tokens, predicates), documents() and key_padding()
(their call-time data given for the whole sequence, as on one GPU, and sliced per block) with & | ~, and
`A & nm(n, m)` with chunks a multiple of m. Block layouts are refused for now."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import pattern as P
from .affine import EMPTY, FULL
from .errors import InputError

LAYOUTS = ("contiguous", "zigzag")


def chunks_of(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """The global chunk indices a rank holds under `layout`, in the order its shard concatenates them."""
    if layout == "contiguous":
        return (rank,)
    if layout == "zigzag":
        return (rank, 2 * world - 1 - rank)
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a whole sequence `x` (sequence along `dim`), as `attention` expects it."""
    n = world * len(chunks_of(layout, world, 0))
    if x.shape[dim] % n:
        raise InputError(f"a sequence of {x.shape[dim]} does not split into {n} equal chunks")
    parts = x.chunk(n, dim=dim)
    return torch.cat([parts[c] for c in chunks_of(layout, world, rank)], dim=dim)


def unshard(shards: list[torch.Tensor], layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard (e.g. the list `dist.all_gather` fills), inverse of `shard`."""
    world = len(shards)
    chunks: dict[int, torch.Tensor] = {}
    for rank, s in enumerate(shards):
        ids = chunks_of(layout, world, rank)
        chunks.update(zip(ids, s.chunk(len(ids), dim=dim)))
    return torch.cat([chunks[c] for c in sorted(chunks)], dim=dim)


@dataclass(frozen=True)
class Block:
    """One (query chunk, key chunk) pair a rank computes: chunk positions within the two shards, and the pattern
    moved to the block."""

    q_slot: int  # which of the rank's own chunks holds the queries
    owner: int  # the rank holding the keys
    k_slot: int  # which of the owner's chunks
    q_chunk: int  # the two chunks' places in the whole sequence
    k_chunk: int
    pattern: P.Pattern


@dataclass(frozen=True)
class Plan:
    """Who computes which blocks and who sends K and V to whom, for one pattern, world size, layout and length."""

    world: int
    chunk: int  # sequence positions per chunk
    layout: str
    blocks: tuple[tuple[Block, ...], ...]  # per rank, owners in increasing order, local keys first

    @property
    def length(self) -> int:
        """Positions in the whole sequence."""
        return self.chunk * self.world * len(chunks_of(self.layout, self.world, 0))

    def needs(self, rank: int) -> tuple[int, ...]:
        """The other ranks whose K and V `rank` receives, in the order it uses them."""
        return tuple(dict.fromkeys(b.owner for b in self.blocks[rank] if b.owner != rank))

    def users(self, rank: int) -> tuple[int, ...]:
        """The other ranks that receive `rank`'s K and V."""
        return tuple(r for r in range(self.world) if r != rank and rank in self.needs(r))


@functools.lru_cache(maxsize=64)
def plan(pattern: P.Pattern, world: int, shard_len: int, layout: str = "contiguous") -> Plan:
    """The blocks of every rank: all (query chunk, key chunk) pairs the pattern does not rule out, classified on the
    chunk grid of the whole sequence (exact for affine patterns, conservative otherwise)."""
    from .schedule import tile_classes
    from .select import split_selection

    n_own = len(chunks_of(layout, world, 0))
    if shard_len % n_own:
        raise InputError(f"a shard of {shard_len} positions does not split into the layout's {n_own} chunks")
    chunk = shard_len // n_own
    S = chunk * world * n_own
    positions, rule = split_selection(pattern)
    if any(not isinstance(leaf, (P.Affine, P.Documents, P.KeyPadding)) for leaf in positions.leaves()):
        raise InputError(
            f"{pattern!r}: context parallelism takes affine patterns (causal, windows, local, prefix_lm, "
            "global_tokens, predicate), documents() and key_padding() with & | ~, and `A & nm(n, m)`; block "
            "layouts, buckets, lsh and keep masks not yet"
        )
    if rule is not None and chunk % getattr(rule, "m", chunk + 1):
        raise InputError(f"{rule!r} needs chunks of a multiple of {rule.m} positions, got {chunk}")
    # Blocks are classified on the chunk grid of the whole sequence by the affine part of the pattern (documents and
    # key padding, call-time data, can only drop more keys: a block they empty is computed, and gives nothing).
    classes = tile_classes(_affine_bound(positions), chunk, chunk, S, S, "cpu", {})[0, 0]
    affine_only = all(isinstance(leaf, P.Affine) for leaf in positions.leaves())  # then FULL is exact
    where = {c: (r, i) for r in range(world) for i, c in enumerate(chunks_of(layout, world, r))}
    per_rank = []
    for rank in range(world):
        blocks = []
        for q_slot, a in enumerate(chunks_of(layout, world, rank)):
            for b in range(S // chunk):
                if classes[a, b] == EMPTY:
                    continue
                owner, k_slot = where[b]
                if classes[a, b] == FULL and affine_only:  # every pair allowed: the structure of full() (or the rule)
                    moved = rule if rule is not None else P.full()
                else:
                    moved = P.shifted(pattern, a * chunk, b * chunk, S, S, sliced_data=True)
                blocks.append(Block(q_slot, owner, k_slot, a, b, moved))
        # Local keys first (they need no transfer), then the owners in a fixed order.
        blocks.sort(key=lambda bl: (bl.owner != rank, bl.owner, bl.q_slot, bl.k_slot))
        per_rank.append(tuple(blocks))
    return Plan(world, chunk, layout, tuple(per_rank))


def _affine_bound(pat: P.Pattern) -> P.Pattern:
    """An affine pattern that allows every position `pat` allows (call-time leaves read as allowing everything where
    that is sound, and a complement of them as allowing everything too)."""
    if isinstance(pat, P.Affine):
        return pat
    if isinstance(pat, (P.And, P.Or)):
        parts = tuple(_affine_bound(p) for p in pat.parts)
        return P.And(parts) if isinstance(pat, P.And) else P.Or(parts)
    if isinstance(pat, P.Not) and all(isinstance(leaf, P.Affine) for leaf in pat.leaves()):
        return pat
    return P.full()


def _block_inputs(pattern: P.Pattern, bl: Block, chunk: int, document_ids, key_lengths) -> dict:
    """The call-time tensors of one block: its query and key chunks' document ids, key lengths less the key chunk's
    start (clipped to the chunk)."""
    need = pattern.runtime_inputs
    inputs = {"document_ids": None, "key_lengths": None}
    if "document_ids" in need:
        ids = document_ids
        inputs["document_ids"] = (
            ids[..., bl.q_chunk * chunk : (bl.q_chunk + 1) * chunk],
            ids[..., bl.k_chunk * chunk : (bl.k_chunk + 1) * chunk],
        )
    if "key_lengths" in need:
        inputs["key_lengths"] = (key_lengths - bl.k_chunk * chunk).clamp(0, chunk)
    return inputs


# ------------------------------------------------------------------------------------- the kernels of one block


def _block_forward(q, k, v, pat: P.Pattern, scale: float, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block with attngen's forward kernel."""
    from .launch import attention

    return attention(q, k, v, pat, scale=scale, return_lse=True, **inputs)


def _block_backward(dout, q, k, v, out, lse, pat: P.Pattern, scale: float, inputs: dict):
    """(dq, dk, dv) of one block, given the merged output and LSE of its queries: P = exp(s - lse) and
    Δ = rowsum(dO ∘ O) are then those of the whole row, so these are the block's exact shares."""
    from . import op
    from .prepare import prepare

    prep = prepare(pat, q, k, inputs)
    with op._device_of(q):
        return op.backward(op._compiled_for(pat.key, q), dout, q, k, v, out, lse, None, scale, prep)


# ------------------------------------------------------------------------------------------ exchanges and merges


class _Transfers:
    """Point-to-point transfers in flight: `get(rank)` waits once for what comes from `rank` (this rank's own
    tensors need no wait), `finish()` waits for this rank's sends."""

    def __init__(self, own: int, tensors: tuple, recvs: dict, sends: list):
        self._ready = {own: tensors}
        self._recvs, self._sends = recvs, sends

    def get(self, rank: int) -> tuple:
        if rank not in self._ready:
            bufs, works = self._recvs.pop(rank)
            for w in works:
                w.wait()
            self._ready[rank] = bufs
        return self._ready[rank]

    def finish(self) -> None:
        for w in self._sends:
            w.wait()
        self._sends = []


def _transfer(send: dict[int, tuple], recv: dict[int, tuple], own: int, tensors: tuple, group) -> _Transfers:
    """Post every receive (into the given buffers, by source) and every send (by destination) at once."""
    to_global = functools.partial(dist.get_global_rank, group)
    recvs = {r: (bufs, [dist.irecv(b, src=to_global(r), group=group) for b in bufs]) for r, bufs in recv.items()}
    sends = [dist.isend(t, dst=to_global(r), group=group) for r, ts in send.items() for t in ts]
    return _Transfers(own, tensors, recvs, sends)


def _exchange(tensors: tuple[torch.Tensor, ...], p: Plan, rank: int, group) -> _Transfers:
    """This rank's `tensors` (K, V) to every user of its keys; theirs from every owner this rank needs."""
    recv = {owner: tuple(torch.empty_like(t) for t in tensors) for owner in p.needs(rank)}
    return _transfer({user: tensors for user in p.users(rank)}, recv, rank, tensors, group)


def _merge(out, lse, o, lse_o):
    """Fold a block's (o, lse_o) into the running (out, lse) of the same queries; rows with nothing kept stay 0 and
    -inf."""
    new = torch.logaddexp(lse, lse_o)
    finite = torch.isfinite(new)
    a = torch.where(finite, torch.exp(lse - new), 0.0).unsqueeze(-1)
    b = torch.where(finite, torch.exp(lse_o - new), 0.0).unsqueeze(-1)
    return out * a + o.to(out.dtype) * b, new


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: Plan, scale: float, group, pattern, document_ids, key_lengths):
        rank = dist.get_rank(group)
        k, v = k.contiguous(), v.contiguous()
        kv = _exchange((k, v), p, rank, group)
        acc = torch.promote_types(q.dtype, torch.float32)  # partial results add up in fp32 (or wider)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        for bl in p.blocks[rank]:
            kk, vv = kv.get(bl.owner)
            rows = slice(bl.q_slot * p.chunk, (bl.q_slot + 1) * p.chunk)
            keys = slice(bl.k_slot * p.chunk, (bl.k_slot + 1) * p.chunk)
            inputs = _block_inputs(pattern, bl, p.chunk, document_ids, key_lengths)
            o, lse_o = _block_forward(q[:, :, rows], kk[:, :, keys], vv[:, :, keys], bl.pattern, scale, inputs)
            out[:, :, rows], lse[:, :, rows] = _merge(out[:, :, rows], lse[:, :, rows], o, lse_o)
        kv.finish()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.group = p, scale, group
        ctx.inputs = (pattern, document_ids, key_lengths)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        p, scale, group = ctx.plan, ctx.scale, ctx.group
        pattern, document_ids, key_lengths = ctx.inputs
        rank = dist.get_rank(group)
        dout = dout.contiguous()
        kv = _exchange((k, v), p, rank, group)
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        shares: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # owner -> this rank's dK, dV shares of its keys
        for bl in p.blocks[rank]:
            kk, vv = kv.get(bl.owner)
            if bl.owner not in shares:
                shares[bl.owner] = tuple(torch.zeros(k.shape, dtype=acc, device=k.device) for _ in "kv")
            rows = slice(bl.q_slot * p.chunk, (bl.q_slot + 1) * p.chunk)
            keys = slice(bl.k_slot * p.chunk, (bl.k_slot + 1) * p.chunk)
            inputs = _block_inputs(pattern, bl, p.chunk, document_ids, key_lengths)
            gq, gk, gv = _block_backward(
                dout[:, :, rows], q[:, :, rows], kk[:, :, keys], vv[:, :, keys], out[:, :, rows],
                lse[:, :, rows].contiguous(), bl.pattern, scale, inputs,
            )  # fmt: skip
            dq[:, :, rows] += gq
            shares[bl.owner][0][:, :, keys] += gk
            shares[bl.owner][1][:, :, keys] += gv
        kv.finish()
        # The shares go back to their owners, who add them in rank order: deterministic.
        zero = torch.zeros(k.shape, dtype=acc, device=k.device)
        recv = {user: (torch.empty_like(zero), torch.empty_like(zero)) for user in p.users(rank)}
        back = _transfer({owner: shares[owner] for owner in p.needs(rank)}, recv, rank, (), group)
        dk, dv = (t.clone() for t in shares.get(rank, (zero, zero)))
        for user in sorted(recv):
            sk, sv = back.get(user)
            dk += sk
            dv += sv
        back.finish()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: P.Pattern | None = None,
    *,
    group=None,
    layout: str = "contiguous",
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a sequence sharded across `group` (default: the world): this rank's q, k, v [B, H, S / world,
    D] hold the chunks `layout` ("contiguous" or "zigzag") assigns it; returns this rank's rows of the output, in
    the same order. Differentiable with respect to q, k, v. Every rank calls it with the same pattern and shapes.
    `document_ids` ([B, S] or [S]) and `key_lengths` ([B]) describe the whole sequence, as for a single GPU (each
    rank holds them whole: they are small); every block gets its slice."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("attngen.distributed.attention needs torch.distributed initialised (init_process_group)")
    group = group if group is not None else dist.group.WORLD
    pattern = P.full() if pattern is None else pattern
    if not isinstance(pattern, P.Pattern):
        raise InputError(f"pattern must be an attngen pattern, got {type(pattern).__name__}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[0] != k.shape[0]:
        raise InputError(
            f"q [B, Hq, S, D] and k, v [B, Hkv, S, D] shards of one sequence expected, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    p = plan(pattern, dist.get_world_size(group), q.shape[2], layout)
    S = p.length
    need = pattern.runtime_inputs
    for name, value in (("document_ids", document_ids), ("key_lengths", key_lengths)):
        if (value is None) == (name in need):
            raise InputError(
                f"{name}= is {'missing' if value is None else 'given'} but pattern {pattern!r} "
                f"{'needs' if value is None else 'does not use'} it"
            )
    if document_ids is not None and (not isinstance(document_ids, torch.Tensor) or document_ids.shape[-1] != S):
        raise InputError(f"document_ids must be a tensor [B, {S}] or [{S}] for the whole sequence of {S} positions")
    if key_lengths is not None and (
        not isinstance(key_lengths, torch.Tensor) or tuple(key_lengths.shape) != (q.shape[0],)
    ):
        raise InputError(f"key_lengths must be a tensor [{q.shape[0]}] of the whole sequence's key lengths")
    if document_ids is not None:
        p = skip_unrelated_documents(p, pattern, document_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ContextParallel.apply(q, k, v, p, scale, group, pattern, document_ids, key_lengths)


def skip_unrelated_documents(p: Plan, pattern: P.Pattern, document_ids: torch.Tensor) -> Plan:
    """`p` without the blocks whose query and key chunks share no document, where the pattern requires a shared
    one (`documents()` in its top-level &): each chunk's ids span [min, max] (per batch), and disjoint spans share
    none. Decided from the whole sequence's ids, which every rank holds: every rank drops the same blocks, so the
    exchanges still pair up. One host sync per call."""
    from .select import split_selection

    positions, _ = split_selection(pattern)
    parts = positions.parts if isinstance(positions, P.And) else (positions,)
    if not any(isinstance(part, P.Documents) for part in parts):
        return p
    ids = document_ids.reshape(-1, document_ids.shape[-1]).unflatten(-1, (-1, p.chunk))  # [B', chunks, chunk]
    lo, hi = ids.amin(-1).cpu(), ids.amax(-1).cpu()  # [B', chunks]
    # Chunks a and b may share a document only where their spans overlap, in some batch element.
    meet = ((lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])).any(0)
    blocks = tuple(tuple(bl for bl in rank if meet[bl.q_chunk, bl.k_chunk]) for rank in p.blocks)
    return Plan(p.world, p.chunk, p.layout, blocks)
