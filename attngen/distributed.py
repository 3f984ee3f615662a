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
neighbours only) and computes only those blocks, each trimmed to the rectangle of rows and keys where the pattern
allows anything and run with attngen's kernels on the pattern moved to it (`pattern.shifted`; a few distinct
structures, compiled once). K and V travel point to point from owner to user, only the span of positions the
user's blocks read (a window's last `window` keys), all transfers posted at once, and the blocks whose keys are
local run while the others arrive. Partial results merge through the LSE the kernels return, in fp32 over the rows
more than one block reaches. The backward exchanges K and V again, runs each block's backward with the
merged output and LSE (which makes it that block's exact share of the gradient), and sends the dK, dV shares back
to their owners, who add them in a fixed order: deterministic, like the single-GPU backward.

Patterns: affine ones (causal, windows, local, prefix_lm, global_tokens, predicates), documents(), in_document()
(positions within documents counted on the whole sequence) and key_padding() (their call-time data given for the
whole sequence, as on one GPU, and sliced per block), key_indices() (each rank gives its own rows' lists; a block
gets its rows' lists less its first key, and where the lists are in the pattern's top-level &, blocks no row lists
a key of are dropped by every rank alike after one all-reduce) with & | ~, and
`A & nm(n, m)` with chunks a multiple of m; block layouts with chunks a multiple of their block size (a chunk pair
the layout keeps no block of is neither computed nor exchanged); `topk_blocks(k, block)` with chunks a multiple of
its block (and of any block layout's in its &-context): chosen as on one GPU, each rank for its own query blocks
over the whole sequence's key blocks (the pooled key means all-gathered), and run per block as that block's share of
the choice, a block layout per batch element and head (chunk pairs nothing chose are dropped, after one all-reduce);
`topk(k)` and `threshold(t)` (exact scores, lowrank or indexer), likewise: each rank chooses its rows' keys against
the whole sequence's keys (K or index_k all-gathered), as on one GPU, and the choice runs as key_indices() lists;
buckets() and keep() (each rank gives its own rows' and keys' ids and flags; the keys' are all-gathered) and
lsh(n, seed=s) (each rank hashes its own tokens), each block sorted by bucket as one GPU does. Score modifications
(softcap, alibi, a bias of each rank's rows, head scales) on the whole sequence's positions: a block's alibi term
differs from the whole's by a constant per head, which moves the block's LSE only (`_block_terms`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
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
    """One (query chunk, key chunk) pair a rank computes: the chunks' places, the rectangle of rows and keys within
    them that holds every pair the pattern allows, and the pattern moved to that rectangle."""

    q_slot: int  # which of the rank's own chunks holds the queries
    owner: int  # the rank holding the keys
    k_slot: int  # which of the owner's chunks
    q_chunk: int  # the two chunks' places in the whole sequence
    k_chunk: int
    rows: tuple[int, int]  # [start, stop) within the query chunk
    keys: tuple[int, int]  # [start, stop) within the key chunk
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

    def span(self, owner: int, user: int) -> tuple[int, int]:
        """The positions [start, stop) of `owner`'s shard that `user`'s blocks read: all `owner` sends it."""
        if owner == user:
            return 0, self.chunk * len(chunks_of(self.layout, self.world, owner))
        keys = [(b.k_slot * self.chunk + b.keys[0], b.k_slot * self.chunk + b.keys[1]) for b in self.blocks[user]
                if b.owner == owner]  # fmt: skip
        return min(a for a, _ in keys), max(b for _, b in keys)


TILE = 128  # granularity of the rectangles blocks are trimmed to


@functools.lru_cache(maxsize=64)
def plan(pattern: P.Pattern, world: int, shard_len: int, layout: str = "contiguous", tile: int = TILE) -> Plan:
    """The blocks of every rank: all (query chunk, key chunk) pairs the pattern does not rule out, classified on the
    chunk grid of the whole sequence (exact for affine patterns, conservative otherwise), each trimmed to the rows
    and keys (in steps of `tile`) where the pattern allows anything."""
    from .schedule import tile_classes
    from .select import split_selection

    n_own = len(chunks_of(layout, world, 0))
    if shard_len % n_own:
        raise InputError(f"a shard of {shard_len} positions does not split into the layout's {n_own} chunks")
    chunk = shard_len // n_own
    S = chunk * world * n_own
    positions, rule = split_selection(pattern)
    leaves = (P.Affine, P.Documents, P.InDocument, P.KeyPadding, P.BlockLayout, P.KeyIndices, P.Buckets, P.Keep)
    if any(not isinstance(leaf, leaves) or isinstance(leaf, P.SelectedKeys) for leaf in positions.leaves()):
        raise InputError(
            f"{pattern!r}: context parallelism takes affine patterns (causal, windows, local, prefix_lm, "
            "global_tokens, predicate), documents(), in_document(), key_padding(), key_indices(), buckets(), keep() "
            "and block layouts with & | ~, `A & nm(n, m)`, and topk_blocks, topk and lsh through attention()"
        )
    layouts = [leaf for leaf in positions.leaves() if isinstance(leaf, P.BlockLayout)]
    for bs in sorted({leaf.block_size for leaf in layouts}):
        if chunk % bs:
            raise InputError(f"a block layout of {bs}-position blocks needs chunks of a multiple of {bs}, got {chunk}")
    tile = math.lcm(tile, *(leaf.block_size for leaf in layouts))  # trimmed blocks start on layout blocks
    if rule is not None and chunk % getattr(rule, "m", chunk + 1):
        raise InputError(f"{rule!r} needs chunks of a multiple of {rule.m} positions, got {chunk}")
    if rule is not None and tile % getattr(rule, "m", 1):
        raise InputError(f"blocks trimmed in steps of {tile} would split the groups of {rule!r}")
    # Blocks are classified on the chunk grid of the whole sequence by the affine part of the pattern (documents and
    # key padding, call-time data, can only drop more keys: a block they empty is computed, and gives nothing).
    bound = _affine_bound(positions)
    classes = tile_classes(bound, chunk, chunk, S, S, "cpu", {})[0, 0]
    affine_only = all(isinstance(leaf, P.Affine) for leaf in positions.leaves())  # then FULL is exact
    where = {c: (r, i) for r in range(world) for i, c in enumerate(chunks_of(layout, world, r))}
    per_rank = []
    for rank in range(world):
        blocks = []
        for q_slot, a in enumerate(chunks_of(layout, world, rank)):
            for b in range(S // chunk):
                if classes[a, b] == EMPTY or not _layouts_reach(positions, a * chunk, b * chunk, chunk):
                    continue
                owner, k_slot = where[b]
                if classes[a, b] == FULL and affine_only:  # every pair allowed: the structure of full() (or the rule)
                    rows = keys = (0, chunk)
                    moved = rule if rule is not None else P.full()
                else:
                    rows, keys = _trimmed(bound, a * chunk, b * chunk, chunk, S, tile)
                    moved = P.shifted(pattern, a * chunk + rows[0], b * chunk + keys[0], S, S, sliced_data=True)
                blocks.append(Block(q_slot, owner, k_slot, a, b, rows, keys, moved))
        # Local keys first (they need no transfer), then the owners in a fixed order.
        blocks.sort(key=lambda bl: (bl.owner != rank, bl.owner, bl.q_slot, bl.k_slot))
        per_rank.append(tuple(blocks))
    return Plan(world, chunk, layout, tuple(per_rank))


def _layouts_reach(positions: P.Pattern, q0: int, k0: int, chunk: int) -> bool:
    """False where a block layout among the pattern's top-level & parts keeps no block of this chunk pair."""
    parts = positions.parts if isinstance(positions, P.And) else (positions,)
    for lay in (p for p in parts if isinstance(p, P.BlockLayout)):
        bs = lay.block_size
        if not lay.grid[..., q0 // bs : math.ceil((q0 + chunk) / bs), k0 // bs : math.ceil((k0 + chunk) / bs)].any():
            return False
    return True


def _trimmed(bound: P.Pattern, q0: int, k0: int, chunk: int, S: int, tile: int):
    """The rows and keys, in steps of `tile`, of the block at (q0, k0) where the affine `bound` allows some pair."""
    from .schedule import tile_classes

    moved = P.shifted(bound, q0, k0, S, S)
    by_rows = tile_classes(moved, tile, chunk, chunk, chunk, "cpu", {})[0, 0, :, 0] != EMPTY
    by_keys = tile_classes(moved, chunk, tile, chunk, chunk, "cpu", {})[0, 0, 0, :] != EMPTY

    def extent(live: torch.Tensor) -> tuple[int, int]:
        idx = live.nonzero().flatten()
        return int(idx[0]) * tile, min(chunk, (int(idx[-1]) + 1) * tile)

    return extent(by_rows), extent(by_keys)


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


def _block_inputs(pattern: P.Pattern, bl: Block, chunk: int, runtime: dict) -> dict:
    """The call-time tensors of one block (`runtime`, the call's): its rows' and keys' document ids (and, for
    in_document(), their positions within documents, `within`, counted on the whole sequence), key lengths less the
    block's first key (clipped to its keys), its rows' key lists (this rank's, `key_indices`) less the block's
    first key (keys outside the block then fall outside [0, keys) and are ignored), and its rows' and keys' bucket
    ids and keep flags."""
    document_ids, key_lengths, within = runtime["document_ids"], runtime["key_lengths"], runtime["within"]
    need = pattern.runtime_inputs
    inputs = {"document_ids": None, "key_lengths": None}
    q0, k0 = bl.q_chunk * chunk + bl.rows[0], bl.k_chunk * chunk + bl.keys[0]
    rows, keys = slice(q0, q0 + bl.rows[1] - bl.rows[0]), slice(k0, k0 + bl.keys[1] - bl.keys[0])
    local = slice(bl.q_slot * chunk + bl.rows[0], bl.q_slot * chunk + bl.rows[1])  # its rows in this rank's shard
    if "key_indices" in need:
        inputs["key_indices"] = runtime["key_indices"][:, :, local] - k0
    for name in ("query_buckets", "query_keep"):  # this rank's rows'
        if name in need:
            inputs[name] = runtime[name][:, :, local]
    for name in ("key_buckets", "key_keep"):  # the whole sequence's keys'
        if name in need:
            inputs[name] = runtime[name][:, :, keys]
    if "document_ids" in need:
        inputs["document_ids"] = (document_ids[..., rows], document_ids[..., keys])
    if within is not None:
        inputs["document_positions"] = (within[..., rows], within[..., keys])
    if "key_lengths" in need:
        inputs["key_lengths"] = (key_lengths - k0).clamp(0, bl.keys[1] - bl.keys[0])
    return inputs


# ------------------------------------------------------------------------------------- the kernels of one block


def _block_forward(
    q, k, v, pat: P.Pattern, scale: float, inputs: dict, mods: tuple = (), bias=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block with attngen's forward kernel, with the score modifications `mods` and the block's
    `bias` (`_block_terms`)."""
    from .launch import attention

    return attention(q, k, v, pat, scale=scale, return_lse=True, score_mod=mods, bias=bias, **inputs)


def _block_backward(
    dout, q, k, v, out, lse, pat: P.Pattern, scale: float, inputs: dict, mods: tuple = (), bias=None, bias_grad=False
):
    """(dq, dk, dv, dL/ds at the bias's step [B, Hq, rows, keys] or None) of one block, given the merged output and
    the LSE of its queries (less the block's alibi shift): P = exp(s - lse) and Δ = rowsum(dO ∘ O) are then those of
    the whole row, so these are the block's exact shares."""
    from . import op, scoremod
    from .prepare import prepare

    prep = prepare(pat, q, k, inputs)
    bound = scoremod.bind(mods, q, k.shape[2], bias=bias)
    kind = scoremod.score_grad_kind(scoremod.structures(bound)) if bias_grad else ""
    prep = dataclasses.replace(prep, score_mod=tuple(t.detach() for t in scoremod.kernel_tensors(bound)))
    mods_key = scoremod.key(scoremod.structures(bound)) if bound else ""
    perm = prep.permutation  # buckets, keep masks: the kernels run on the tokens sorted by bucket (reorder.py)
    if perm is not None:
        dout, q, out, lse = (op._take(x, perm.q_rows) for x in (dout, q, out, lse))
        k, v = (op._take(x, perm.k_rows) for x in (k, v))
    ds = op._score_grad_buffer(q, k, kind)
    with op._device_of(q):
        kern = op._compiled_for(pat.key, q, mods_key)
        dq, dk, dv = op.backward(kern, dout, q, k, v, out, lse, None, scale, prep, ds if kind else None)
    if perm is not None:
        dq, dk, dv = op._take(dq, perm.q_back), op._take(dk, perm.k_back), op._take(dv, perm.k_back)
    return dq, dk, dv, (ds if kind else None)


# ------------------------------------------------------------------------------------------ exchanges and merges


class _Transfers:
    """Point-to-point transfers in flight, one group per peer: `get(rank)` waits once for what comes from `rank`
    (this rank's own tensors need no wait), `finish()` for every group not yet waited for (each is waited for
    once: gloo does not return from a second wait)."""

    def __init__(self, own: int, tensors: tuple, recvs: dict, groups: dict):
        self._ready = {own: tensors}
        self._recvs, self._groups = recvs, groups

    def get(self, rank: int) -> tuple:
        if rank not in self._ready:
            for w in self._groups.pop(rank):
                w.wait()
            self._ready[rank] = self._recvs.pop(rank)
        return self._ready[rank]

    def finish(self) -> None:
        for works in self._groups.values():
            for w in works:
                w.wait()
        self._groups = {}


def _transfer(send: dict[int, tuple], recv: dict[int, tuple], own: int, tensors: tuple, group) -> _Transfers:
    """Post every receive (into the given buffers, by source) and every send (by destination) at once.

    The sends and receives between two ranks go as one group (`batch_isend_irecv`), and each rank posts its peers'
    groups in increasing rank order. With NCCL a receive blocks the stream it runs on until the matching send
    starts, so two ranks that each posted a receive before their send would wait for each other forever; one group
    per pair, posted in an order every rank agrees on, cannot."""
    to_global = functools.partial(dist.get_global_rank, group)
    groups = {}
    for peer in sorted(set(send) | set(recv)):
        ops = [dist.P2POp(dist.isend, t, to_global(peer), group) for t in send.get(peer, ())]
        ops += [dist.P2POp(dist.irecv, b, to_global(peer), group) for b in recv.get(peer, ())]
        groups[peer] = dist.batch_isend_irecv(ops)
    return _Transfers(own, tensors, dict(recv), groups)


def _exchange(tensors: tuple[torch.Tensor, ...], p: Plan, rank: int, group) -> _Transfers:
    """This rank's `tensors` (K, V) to every user of its keys, each the span it reads; theirs from every owner this
    rank needs."""
    spans = {user: p.span(rank, user) for user in p.users(rank)}
    send = {user: tuple(t[:, :, a:b].contiguous() for t in tensors) for user, (a, b) in spans.items()}
    recv = {}
    for owner in p.needs(rank):
        a, b = p.span(owner, rank)
        recv[owner] = tuple(t.new_empty((*t.shape[:2], b - a, *t.shape[3:])) for t in tensors)
    return _transfer(send, recv, rank, tensors, group)


def _merge(out, lse, o, lse_o):
    """Fold a block's (o, lse_o) into the running (out, lse) of the same queries; rows with nothing kept stay 0 and
    -inf."""
    new = torch.logaddexp(lse, lse_o)
    finite = torch.isfinite(new)
    a = torch.where(finite, torch.exp(lse - new), 0.0).unsqueeze(-1)
    b = torch.where(finite, torch.exp(lse_o - new), 0.0).unsqueeze(-1)
    return out * a + o.to(out.dtype) * b, new


class _Sum:
    """One [B, H, L, D] result added up, in a fixed order, from parts that each cover rows [start, stop) (with an
    LSE: merged through it). When the first part covers every row it is kept as it is (no copy); only the rows the
    later parts reach are summed, in fp32 (or wider). Rows no part reaches are 0 (LSE -inf)."""

    def __init__(self, like: torch.Tensor, length: int, ranges: list, dtype: torch.dtype, lse: bool):
        self.dtype, self.acc_dtype = dtype, torch.promote_types(dtype, torch.float32)
        self.lead = bool(ranges) and tuple(ranges[0]) == (0, length)
        rest = ranges[1:] if self.lead else ranges
        self.lo, self.hi = (min(a for a, _ in rest), max(b for _, b in rest)) if rest else (0, 0)
        shape = (*like.shape[:2], length, *like.shape[3:])
        self.out = None if self.lead else like.new_zeros(shape, dtype=dtype)
        self.lse = None if self.lead or not lse else like.new_full(shape[:3], -math.inf, dtype=self.acc_dtype)
        span = (*shape[:2], self.hi - self.lo, *shape[3:])
        self.acc = like.new_zeros(span, dtype=self.acc_dtype) if rest else None
        self.acc_lse = like.new_full(span[:3], -math.inf, dtype=self.acc_dtype) if rest and lse else None
        self.first = self.lead

    def add(self, rows: tuple[int, int], x: torch.Tensor, lse: torch.Tensor | None = None) -> None:
        lo, hi = self.lo, self.hi
        if self.first:  # the part that covers every row
            self.first = False
            self.out, self.lse = x.to(self.dtype), lse
            if self.acc is not None:
                self.acc.copy_(x[:, :, lo:hi])
                if lse is not None:
                    self.acc_lse.copy_(lse[:, :, lo:hi])
            return
        a, b = rows[0] - lo, rows[1] - lo
        if lse is None:
            self.acc[:, :, a:b] += x
        else:
            self.acc[:, :, a:b], self.acc_lse[:, :, a:b] = _merge(self.acc[:, :, a:b], self.acc_lse[:, :, a:b], x, lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.acc is not None:
            self.out[:, :, self.lo : self.hi] = self.acc
            if self.acc_lse is not None:
                self.lse[:, :, self.lo : self.hi] = self.acc_lse
        return self.out, self.lse


def _by_slot(p: Plan, rank: int) -> dict[int, list]:
    """Each of the rank's query chunks: the row ranges of its blocks, in the order they run."""
    slots: dict[int, list] = {s: [] for s in range(len(chunks_of(p.layout, p.world, rank)))}
    for bl in p.blocks[rank]:
        slots[bl.q_slot].append(bl.rows)
    return slots


def _by_owner(p: Plan, rank: int) -> dict[int, list]:
    """Each owner of keys the rank reads: the key ranges of its blocks within what the owner sends, in order."""
    owners: dict[int, list] = {}
    for bl in p.blocks[rank]:
        base = bl.k_slot * p.chunk - p.span(bl.owner, rank)[0]
        owners.setdefault(bl.owner, []).append((base + bl.keys[0], base + bl.keys[1]))
    return owners


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, p: Plan, scale: float, group, pattern, runtime: dict, mods: tuple):
        rank = dist.get_rank(group)
        k, v = k.contiguous(), v.contiguous()
        kv = _exchange((k, v), p, rank, group)
        slots = {s: _Sum(q, p.chunk, ranges, q.dtype, lse=True) for s, ranges in _by_slot(p, rank).items()}
        for bl in p.blocks[rank]:
            kk, vv = kv.get(bl.owner)
            rows, keys = _slices(p, bl, rank)
            inputs = _block_inputs(pattern, bl, p.chunk, runtime)
            block_bias, shift = _block_terms(mods, bias, bl, p, rank)
            o, lse_o = _block_forward(
                q[:, :, rows], kk[:, :, keys], vv[:, :, keys], bl.pattern, scale, inputs, mods, block_bias
            )
            slots[bl.q_slot].add(bl.rows, o, lse_o if shift is None else lse_o + shift)
        kv.finish()
        parts = [slots[s].result() for s in sorted(slots)]
        out = torch.cat([o for o, _ in parts], dim=2) if len(parts) > 1 else parts[0][0]
        lse = torch.cat([lse for _, lse in parts], dim=2) if len(parts) > 1 else parts[0][1]
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.plan, ctx.scale, ctx.group = p, scale, group
        ctx.inputs = (pattern, runtime, mods)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, bias = ctx.saved_tensors
        p, scale, group = ctx.plan, ctx.scale, ctx.group
        pattern, runtime, mods = ctx.inputs
        rank = dist.get_rank(group)
        d_bias = None
        if bias is not None and ctx.needs_input_grad[3]:  # dL/ds at the bias's step, [B, Hq, S / world, S], in place
            wide = torch.promote_types(bias.dtype, torch.float32)  # (blocks do not overlap)
            d_bias = q.new_zeros((*q.shape[:3], q.shape[2] * p.world), dtype=wide)
        dout = dout.contiguous()
        kv = _exchange((k, v), p, rank, group)
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = {s: _Sum(q, p.chunk, ranges, q.dtype, lse=False) for s, ranges in _by_slot(p, rank).items()}
        shares = {}  # owner -> this rank's dK, dV shares of the keys it sent (fp32)
        for owner, ranges in _by_owner(p, rank).items():
            a, b = p.span(owner, rank)
            shares[owner] = tuple(_Sum(k, b - a, ranges, acc, lse=False) for _ in "kv")
        for bl in p.blocks[rank]:
            kk, vv = kv.get(bl.owner)
            rows, keys = _slices(p, bl, rank)
            inputs = _block_inputs(pattern, bl, p.chunk, runtime)
            block_bias, shift = _block_terms(mods, bias, bl, p, rank)
            block_lse = lse[:, :, rows] if shift is None else lse[:, :, rows] - shift  # the block's own scores'
            gq, gk, gv, gs = _block_backward(
                dout[:, :, rows], q[:, :, rows], kk[:, :, keys], vv[:, :, keys], out[:, :, rows],
                block_lse.contiguous(), bl.pattern, scale, inputs, mods, block_bias, d_bias is not None,
            )  # fmt: skip
            if d_bias is not None:
                k_at = chunks_of(p.layout, p.world, bl.owner)[bl.k_slot] * p.chunk + bl.keys[0]
                d_bias[:, :, rows, k_at : k_at + gs.shape[-1]] = gs
            dq[bl.q_slot].add(bl.rows, gq)
            key_range = (keys.start, keys.stop)
            shares[bl.owner][0].add(key_range, gk)
            shares[bl.owner][1].add(key_range, gv)
        kv.finish()
        parts = [dq[s].result()[0] for s in sorted(dq)]
        dq = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        # The shares go back to their owners, who add them in rank order: deterministic.
        send = {owner: tuple(s.result()[0].contiguous() for s in shares[owner]) for owner in p.needs(rank)}
        recv = {}
        for user in p.users(rank):
            a, b = p.span(rank, user)
            recv[user] = tuple(k.new_empty((*k.shape[:2], b - a, *k.shape[3:]), dtype=acc) for _ in "kv")
        back = _transfer(send, recv, rank, (), group)
        if rank in shares:
            dk, dv = (s.result()[0] for s in shares[rank])
        else:
            dk, dv = (k.new_zeros(k.shape, dtype=acc) for _ in "kv")
        for user in sorted(recv):
            a, b = p.span(rank, user)
            sk, sv = back.get(user)
            dk[:, :, a:b] += sk
            dv[:, :, a:b] += sv
        back.finish()
        if d_bias is not None:  # summed over the bias's broadcast dims, in its dtype
            dims = [d for d in range(4) if bias.shape[d] == 1 and d_bias.shape[d] > 1]
            d_bias = (d_bias.sum(dims, keepdim=True) if dims else d_bias).to(bias.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), d_bias, None, None, None, None, None, None


def _slices(p: Plan, bl: Block, rank: int) -> tuple[slice, slice]:
    """The block's rows in this rank's shard and its keys in what its owner sent."""
    r0 = bl.q_slot * p.chunk
    k0 = bl.k_slot * p.chunk - p.span(bl.owner, rank)[0]
    return slice(r0 + bl.rows[0], r0 + bl.rows[1]), slice(k0 + bl.keys[0], k0 + bl.keys[1])


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
    key_indices: torch.Tensor | None = None,
    proj: torch.Tensor | None = None,
    index_q: torch.Tensor | None = None,
    index_k: torch.Tensor | None = None,
    index_w: torch.Tensor | None = None,
    query_buckets: torch.Tensor | None = None,
    key_buckets: torch.Tensor | None = None,
    query_keep: torch.Tensor | None = None,
    key_keep: torch.Tensor | None = None,
    score_mod=None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a sequence sharded across `group` (default: the world): this rank's q, k, v [B, H, S / world,
    D] hold the chunks `layout` ("contiguous" or "zigzag") assigns it; returns this rank's rows of the output, in
    the same order. Differentiable with respect to q, k, v. Every rank calls it with the same pattern and shapes.
    `document_ids` ([B, S] or [S]) and `key_lengths` ([B]) describe the whole sequence, as for a single GPU (each
    rank holds them whole: they are small); every block gets its slice. `key_indices` ([B, H', S / world, n], for
    a key_indices() leaf) are this rank's rows' lists, in its shard's order, of key positions in the whole sequence.
    A `topk` scorer's tensors: `proj` whole; `index_q` [B, S / world, Hi, Di] and `index_w` [B, S / world, Hi] of
    this rank's rows, `index_k` [B, S / world, Di] of its keys (in its shard's order). `query_buckets`,
    `query_keep` [B, Hq, S / world] and `key_buckets`, `key_keep` [B, Hkv, S / world] (buckets(), keep()) are this
    rank's rows' and keys', in its shard's order; `lsh(n, seed=s)` hashes each rank's own q and k (a seed is needed,
    so that every rank draws the same directions). `score_mod` as for one GPU (softcap, alibi, bias, head_scale;
    not rel_bias, nor alibi before a softcap; with buckets and keep masks softcap and head_scale only) on the whole
    sequence's positions;
    `bias` is this rank's rows' [B or 1, Hq or 1, S / world or 1, S or 1] (rows in its shard's order, keys in the
    sequence's), differentiable."""
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
    world = dist.get_world_size(group)
    S = q.shape[2] * world  # the whole sequence
    given = q
    mods, q, bias = _score_mods(score_mod, pattern, q, bias, S)  # head scales folded into q (and the bias)
    sorted_by = dict(query_buckets=query_buckets, key_buckets=key_buckets, query_keep=query_keep, key_keep=key_keep)
    pattern, sorted_by = _hashed(pattern, given, k, sorted_by)  # lsh hashes the caller's q
    sorted_by = _checked_sorting(pattern, sorted_by, q, k)  # before any collective
    token = P.token_leaf(pattern)
    if token is not None:  # each rank's rows choose their keys; they then run as key-index lists do
        if key_indices is not None:
            raise InputError(f"{pattern!r}: key_indices= is given but the pattern chooses its keys (topk)")
        scorer_inputs = {"proj": proj, "index_q": index_q, "index_k": index_k, "index_w": index_w}
        context_inputs = {"document_ids": document_ids, "key_lengths": key_lengths}
        given = scorer_inputs | context_inputs
        key_indices = token_choice(pattern, token, q, k, layout, scale, group, given, mods, bias)
        pattern = _replaced(pattern, token, P.key_indices())
    leaf = P.topk_leaf(pattern)
    if leaf is not None:  # planned as if it kept every block; each call's choice then prunes and fills the blocks
        _check_block_topk(pattern, leaf, q.shape[2], layout, world)
        whole = _context_runtime(P.context_of(pattern, leaf), document_ids, key_lengths, q)
        whole = dataclasses.replace(whole, layouts=_grids(pattern, q, S, S))  # in the pattern's slot order
    planned = pattern if leaf is None else _replaced(pattern, leaf, P.full())
    tile = TILE if leaf is None else math.lcm(TILE, leaf.block)  # blocks trimmed to whole selection blocks
    p = plan(planned, world, q.shape[2], layout, tile)
    need = pattern.runtime_inputs
    for name, value in (("document_ids", document_ids), ("key_lengths", key_lengths), ("key_indices", key_indices)):
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
    if key_indices is not None:
        from .keyindex import check

        check(key_indices, q.shape[0], q.shape[1], k.shape[1], q.shape[2])  # this rank's rows
    if document_ids is not None:
        p = skip_unrelated_documents(p, pattern, document_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if key_indices is not None:
        p = skip_unlisted_keys(p, pattern, key_indices, group)
    if leaf is not None:
        p = _with_block_choice(p, pattern, leaf, q, k, group, whole)
    within = P.document_offsets(document_ids, S, S) if P.reads_document_offsets(pattern) else None
    runtime = {"document_ids": document_ids, "key_lengths": key_lengths, "within": within, "key_indices": key_indices}
    n_own = len(chunks_of(layout, world, 0))
    for name, value in sorted_by.items():  # the keys' bucket ids and keep flags of the whole sequence
        runtime[name] = _gathered(value, 2, layout, world, n_own, group) if name.startswith("key") else value
    return _ContextParallel.apply(q, k, v, bias, p, scale, group, pattern, runtime, mods)


def _score_mods(score_mod, pattern: P.Pattern, q: torch.Tensor, bias, S: int) -> tuple[tuple, torch.Tensor, object]:
    """(the modifications every block takes, q, the bias as [B or 1, Hq or 1, S / world or 1, S or 1]), checked
    before any collective, head scales folded into q and the bias (`scoremod.fold`). A block's rows and keys are a
    rectangle of the whole sequence: its alibi term k - q differs from the whole's by a constant per head, which
    moves the block's LSE and nothing else where no softcap follows (`_block_terms`); T5's buckets of the distance
    do not move so."""
    from . import scoremod

    mods = scoremod.normalize(score_mod)
    kinds = [type(m.structure()) for m in mods]
    if bias is not None and scoremod.Bias not in kinds:
        raise InputError("bias= is given but score_mod has no ag.bias()")
    if bias is None and scoremod.Bias in kinds:
        raise InputError(
            "score_mod ag.bias() needs bias= (this rank's rows: [B or 1, Hq or 1, S / world or 1, S or 1])"
        )
    if not mods:
        return mods, q, None
    scoremod.check_reordered(mods, pattern)
    if scoremod.RelBias in kinds:
        raise InputError(
            "rel_bias under context parallelism is not supported: T5's buckets need each pair's distance in the whole "
            "sequence; give the table's values as bias= (this rank's rows) instead"
        )
    if scoremod.AlibiSlot in kinds and scoremod.Softcap in kinds[kinds.index(scoremod.AlibiSlot) :]:
        raise InputError(
            "alibi before a softcap is not supported under context parallelism (a block's alibi term differs from the "
            "whole sequence's by a constant that would have to pass through the softcap); softcap then alibi is"
        )
    if bias is not None:
        bias = _rows_bias(bias, q, S)
    q, mods, tensors = scoremod.fold(mods, q, {"bias": bias})
    scoremod.bind(tuple(m for m in mods if not isinstance(m, scoremod.Bias)), q, S)  # alibi's slopes: checked
    top_left = (scoremod.Alibi(m.slopes, "top_left") if isinstance(m, scoremod.Alibi) else m for m in mods)
    return tuple(top_left), q, tensors["bias"]  # (Sq = Sk: both alignments are one)


def _rows_bias(bias, q: torch.Tensor, S: int) -> torch.Tensor:
    """This rank's rows of a bias as a 4-d view [B or 1, Hq or 1, S / world or 1, S or 1] (dims missing on the left
    count as 1), on q's device, float."""
    B, Hq, shard, _ = q.shape
    want = (B, Hq, shard, S)
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() > 4:
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise InputError(f"bias= must be a float tensor of at most 4 dims, got {got}")
    view = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if any(n not in (1, w) for n, w in zip(view.shape, want)):
        raise InputError(
            f"bias= of shape {tuple(bias.shape)}: this rank's rows [B or 1, Hq or 1, S / world or 1, S or 1] = "
            f"{list(want)} (each dim as given or 1) expected"
        )
    if view.device != q.device:
        raise InputError(f"bias= is on {view.device}, q on {q.device}: put them on one device")
    return view


def _block_terms(mods: tuple, bias, bl: Block, p: Plan, rank: int) -> tuple[object, object]:
    """(the block's bias, the constant its LSE moves by, or None for either): the bias's rows and keys of the block
    (broadcast dims as they are), and alibi's slopes[h] · (first key - first row) of the block in the whole
    sequence, [1, Hq, 1] (the block's kernels count k - q from its own corner)."""
    from . import scoremod

    rows, _ = _slices(p, bl, rank)
    q_at = chunks_of(p.layout, p.world, rank)[bl.q_slot] * p.chunk + bl.rows[0]
    k_at = chunks_of(p.layout, p.world, bl.owner)[bl.k_slot] * p.chunk + bl.keys[0]
    block_bias = None
    if bias is not None:
        block_bias = bias[:, :, rows if bias.shape[2] > 1 else slice(None)]
        block_bias = block_bias[..., k_at : k_at + bl.keys[1] - bl.keys[0]] if bias.shape[3] > 1 else block_bias
    shift = None
    for m in mods:
        if isinstance(m, scoremod.Alibi) and k_at != q_at:
            shift = (m.slopes.float() * (k_at - q_at)).view(1, -1, 1)
    return block_bias, shift


def _hashed(pattern: P.Pattern, q, k, given: dict) -> tuple[P.Pattern, dict]:
    """An lsh(n, seed) leaf as buckets() with the ids of this rank's rows and keys (`hashing.lsh_buckets` of its own
    q and k: a token's bucket depends on its vector and the seeded directions only)."""
    leaf = next((x for x in pattern.leaves() if isinstance(x, P.LSH)), None)
    if leaf is None:
        return pattern, given
    if leaf.seed is None:
        raise InputError(
            f"{pattern!r}: under context parallelism lsh(n) needs a seed, lsh(n, seed=s), so that every rank hashes "
            "with the same directions"
        )
    if given["query_buckets"] is not None or given["key_buckets"] is not None:
        raise InputError(f"{pattern!r}: lsh computes its buckets; query_buckets= and key_buckets= are not taken")
    from .hashing import lsh_buckets

    query_buckets, key_buckets = lsh_buckets(q.detach(), k.detach(), leaf.n, leaf.seed)
    return _replaced(pattern, leaf, P.buckets()), given | {"query_buckets": query_buckets, "key_buckets": key_buckets}


def _checked_sorting(pattern: P.Pattern, given: dict, q, k) -> dict:
    """The bucket ids and keep flags the pattern reads, each checked: this rank's rows' [B, Hq, S / world] and keys'
    [B, Hkv, S / world], integers (buckets) or bools (keep), on q's device; an InputError names what is wrong."""
    from .reorder import _checked

    need, out = pattern.runtime_inputs, {}
    for name, value in given.items():
        if (value is None) == (name in need):
            raise InputError(
                f"{name}= is {'missing' if value is None else 'given'} but pattern {pattern!r} "
                f"{'needs' if value is None else 'does not use'} it"
            )
        if value is not None:
            heads = q.shape[1] if name.startswith("query") else k.shape[1]
            shape = (q.shape[0], heads, q.shape[2])
            out[name] = _checked(value, f"{name} (this rank's shard)", shape, flags=name.endswith("keep")).to(q.device)
    return out


def token_choice(
    pattern: P.Pattern,
    leaf: P.Pattern,
    q,
    k,
    layout: str,
    scale: float | None,
    group,
    given: dict,
    mods: tuple = (),
    bias=None,
) -> torch.Tensor:
    """int32 [B, Hq (Hkv for the indexer), this rank's rows (its shard's order), min(k, S)]: the keys (positions in
    the whole sequence, -1 pads) a `topk(k)` or `threshold(t)` leaf keeps for this rank's rows, chosen as on one GPU
    (`tokenselect.select`: fp32 scores over the keys the leaf's &-context allows, ties to the lower key) against the
    whole sequence's keys, one chunk of rows at a time with the context moved to the chunk. What travels: K (exact
    scores, lowrank) or index_k (indexer), all-gathered; `given` holds this rank's scorer tensors (index_q, index_w
    of its rows, index_k of its keys; proj whole) and the whole sequence's document_ids and key_lengths; exact
    scores are ranked with the score modifications `mods` (`_score_mods`'s) and `bias` (this rank's rows')."""
    from . import scoremod, tokenselect, tokentopk

    context = P.context_of(pattern, leaf)
    B, Hq, shard, D = q.shape
    whole = _context_runtime(context, given.get("document_ids"), given.get("key_lengths"), q)
    inputs = {n: given.get(n) for n in leaf._inputs}
    missing = [n for n, t in inputs.items() if t is None]
    if missing:
        raise InputError(f"{leaf!r} needs {', '.join(f'{n}=' for n in missing)} (this rank's rows' and keys')")
    tokentopk.check(leaf.scorer, inputs, B, Hq, shard, shard, D)  # before any collective: a bad shape never hangs
    n_own = len(chunks_of(layout, 1, 0))  # chunks per rank: the same for every world size
    if shard % n_own:
        raise InputError(f"a shard of {shard} positions does not split into the layout's {n_own} chunks")
    chunk = shard // n_own
    _check_layout_blocks(pattern, chunk)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    own, S = chunks_of(layout, world, rank), chunk * n_own * world
    indexer = "index_k" in inputs
    keys = _gathered(inputs["index_k"] if indexer else k.detach(), 1 if indexer else 2, layout, world, n_own, group)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k_all = k.detach()[:, :, :1].expand(B, k.shape[1], S, D) if indexer else keys  # the indexer: its shape only
    lists = []
    for i, c in enumerate(own):
        moved = _moved(pattern, leaf, leaf, c * chunk, 0, S)  # the rows of chunk c against every key
        mine = slice(i * chunk, (i + 1) * chunk)
        chunk_inputs = {n: t[:, mine] if n in ("index_q", "index_w") else t for n, t in inputs.items()}
        if indexer:
            chunk_inputs["index_k"] = keys
        rows = slice(c * chunk, (c + 1) * chunk)  # the chunk's rows in the whole sequence: their ids and offsets
        runtime = dataclasses.replace(whole, document_ids=tuple(
            t[..., rows] if i in (0, 2) else t for i, t in enumerate(whole.document_ids)
        )) if whole.document_ids else whole  # fmt: skip
        runtime = dataclasses.replace(runtime, layouts=_grids(moved, q, chunk, S))  # from the chunk's first row on
        rows_bias = None if bias is None else bias[:, :, mine] if bias.shape[2] > 1 else bias
        bound = scoremod.bind(mods, q[:, :, mine], S, bias=rows_bias)  # positional terms from the chunk's first row
        lists.append(tokenselect.select(moved, q[:, :, mine], k_all, runtime, chunk_inputs, scale, bound, c * chunk))
    return torch.cat(lists, dim=2)


def _context_runtime(context: P.Pattern, document_ids, key_lengths, q: torch.Tensor):
    """A top-k leaf's &-context's call-time tensors for the whole sequence (what `prepare` gives one GPU): its
    query and key document ids (and positions within documents), its key lengths; checked before any collective."""
    from .prepare import Prepared

    need, S = context.runtime_inputs, None
    docs = lengths = None
    if "document_ids" in need:
        if not isinstance(document_ids, torch.Tensor) or document_ids.dim() not in (1, 2):
            raise InputError(f"{context!r} needs document_ids= [B, S] or [S] for the whole sequence")
        S = document_ids.shape[-1]
        ids = tuple(t.to(q.device) for t in P.document_ids_pair(document_ids, S, S))
        within = (P.document_offsets(document_ids, S, S).to(q.device),) * 2 if P.reads_document_offsets(context) else ()
        docs = (*ids, *within)
    if "key_lengths" in need:
        if not isinstance(key_lengths, torch.Tensor) or tuple(key_lengths.shape) != (q.shape[0],):
            raise InputError(f"{context!r} needs key_lengths= [{q.shape[0]}] for the whole sequence")
        lengths = key_lengths.to(q.device, torch.int32)
    return Prepared(document_ids=docs, key_lengths=lengths)


def _gathered(x: torch.Tensor, dim: int, layout: str, world: int, n_own: int, group) -> torch.Tensor:
    """Every rank's shard of x (its chunks along `dim`) put together in sequence order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    by_chunk = {}
    for r, part in enumerate(parts):
        by_chunk |= dict(zip(chunks_of(layout, world, r), part.chunk(n_own, dim=dim)))
    return torch.cat([by_chunk[c] for c in range(len(by_chunk))], dim=dim)


def _check_layout_blocks(pattern: P.Pattern, chunk: int) -> None:
    """Block layouts move to a chunk's rows only where the chunk is a multiple of their block size."""
    for bs in sorted({lay.block_size for lay in pattern.layouts()}):
        if chunk % bs:
            raise InputError(f"a block layout of {bs}-position blocks needs chunks of a multiple of {bs}, got {chunk}")


def _grids(pattern: P.Pattern, q: torch.Tensor, Sq: int, Sk: int) -> tuple[torch.Tensor, ...]:
    """The grids of the pattern's block layouts, in its slot order, as a call of Sq rows over Sk keys with q's
    batch and heads reads them (`prepare`'s checks included)."""
    from .prepare import _layout

    return tuple(_layout(lay, q.device, q.shape[0], q.shape[1], Sq, Sk) for lay in pattern.layouts())


def _check_block_topk(pattern: P.Pattern, leaf: P.Pattern, shard_len: int, layout: str, world: int) -> None:
    n_own = len(chunks_of(layout, world, 0))
    if shard_len % n_own or (shard_len // n_own) % leaf.block:
        raise InputError(
            f"{leaf!r} needs chunks of a multiple of {leaf.block} positions; a shard of {shard_len} positions "
            f"makes {n_own} chunk(s) of {shard_len / n_own:g}"
        )
    _check_layout_blocks(pattern, shard_len // n_own)


def _replaced(pat: P.Pattern, leaf: P.Pattern, by: P.Pattern, rest=lambda part: part) -> P.Pattern:
    """`pat` with the leaf `leaf` (by identity) replaced by the pattern `by`, and every other part under its & and |
    mapped by `rest`."""
    if pat is leaf:
        return by
    if isinstance(pat, (P.And, P.Or)):
        parts = [_replaced(part, leaf, by, rest) for part in pat.parts]
        return functools.reduce(operator.and_ if isinstance(pat, P.And) else operator.or_, parts)
    return rest(pat)


def block_choice(pattern: P.Pattern, leaf: P.Pattern, q: torch.Tensor, k: torch.Tensor, p: Plan, group, whole=None):
    """bool [B, Hq, this rank's query blocks (in its shard's order), all key blocks]: the topk_blocks choice of this
    rank's rows, made as one GPU makes it (`blockselect.select`): fp32 pooled means, the key blocks' gathered from
    every rank (B · Hkv · S / block · D floats), the top `leaf.k` among the key blocks the leaf's &-context allows
    on the whole sequence, ties to the lower block."""
    from . import blockselect, blocktopk

    bs, rank = leaf.block, dist.get_rank(group)
    per_chunk, S = p.chunk // bs, p.length
    own = chunks_of(p.layout, p.world, rank)
    pk = blocktopk.pooled(k.detach(), bs, torch.float32)  # [B, Hkv, own blocks, D]
    pk = _gathered(pk, 2, p.layout, p.world, len(own), group)  # [B, Hkv, nbk, D], in sequence order
    pq = blocktopk.pooled(q.detach(), bs, torch.float32)  # [B, Hq, own blocks, D]
    Hq = pq.shape[1]
    scores = blocktopk.pooled_scores(pq, pk)
    structure = pattern.structure()
    context = P.context_of(structure, P.topk_leaf(structure))  # its layout slots number as the pattern's do
    if context.runtime_inputs or pattern.layouts():  # `whole`: documents, key padding, grids of the whole sequence
        cand = blockselect.candidates(context, bs, S, S, q.device, whole, heads=Hq)  # [LB, LH, nbq_all, nbk]
    else:
        cand = blockselect._static_candidates(context, bs, S, S, str(q.device))
    rows = torch.cat([torch.arange(c * per_chunk, (c + 1) * per_chunk) for c in own])
    return blocktopk.choose(scores, cand[:, :, rows.to(cand.device)], leaf.k)


def _with_block_choice(p: Plan, pattern: P.Pattern, leaf: P.Pattern, q, k, group, whole) -> Plan:
    """`p` with this call's topk_blocks choice: each block's pattern gets its share of the choice as a block layout
    (per batch element and query head), and where the leaf is in the pattern's top-level &, the blocks no row of
    their query chunk chose a key block of are dropped, by every rank alike (`_keep_marked`)."""
    from .select import split_selection

    rank, bs = dist.get_rank(group), leaf.block
    choice = block_choice(pattern, leaf, q, k, p, group, whole)
    per_chunk, S = p.chunk // bs, p.length
    positions, _ = split_selection(pattern)
    if any(part is leaf for part in (positions.parts if isinstance(positions, P.And) else (positions,))):
        by_slot = choice.unflatten(2, (-1, per_chunk)).any(3).any(1).any(0)  # [own slots, nbk]
        p = _keep_marked(p, by_slot.unflatten(-1, (-1, per_chunk)).any(-1), group)
    blocks = []
    for bl in p.blocks[rank]:
        q0, k0 = bl.q_chunk * p.chunk + bl.rows[0], bl.k_chunk * p.chunk + bl.keys[0]
        r0 = (bl.q_slot * p.chunk + bl.rows[0]) // bs  # the block's first query block in this rank's choice
        nq, nk = (bl.rows[1] - bl.rows[0]) // bs, (bl.keys[1] - bl.keys[0]) // bs
        share = P.block_layout(choice[:, :, r0 : r0 + nq, k0 // bs : k0 // bs + nk].contiguous(), bs)
        blocks.append(dataclasses.replace(bl, pattern=_moved(pattern, leaf, share, q0, k0, S)))
    per_rank = tuple(tuple(blocks) if r == rank else bls for r, bls in enumerate(p.blocks))
    return Plan(p.world, p.chunk, p.layout, per_rank)


def _moved(pat: P.Pattern, leaf: P.Pattern, share: P.Pattern, q0: int, k0: int, S: int) -> P.Pattern:
    """`pat` on the block at (q0, k0): the leaf replaced by its share of the choice, the rest `P.shifted`."""
    return _replaced(pat, leaf, share, lambda part: P.shifted(part, q0, k0, S, S, sliced_data=True))


def _keep_marked(p: Plan, marks: torch.Tensor, group) -> Plan:
    """`p` without the blocks whose (query chunk, key chunk) no rank marked: `marks` bool [this rank's slots,
    chunks]; one all-reduce shares them (each query chunk belongs to one rank), so every rank drops the same blocks
    and the exchanges still pair up."""
    chunks, own = p.length // p.chunk, chunks_of(p.layout, p.world, dist.get_rank(group))
    table = torch.zeros(chunks, chunks, dtype=torch.int32, device=marks.device)
    table[list(own)] = marks.to(torch.int32)
    dist.all_reduce(table, group=group)
    table = table.cpu() > 0
    blocks = tuple(tuple(bl for bl in blocks if table[bl.q_chunk, bl.k_chunk]) for blocks in p.blocks)
    return Plan(p.world, p.chunk, p.layout, blocks)


def skip_unlisted_keys(p: Plan, pattern: P.Pattern, key_indices: torch.Tensor, group) -> Plan:
    """`p` without the blocks whose key chunk no row of their query chunk lists, where the pattern keeps only listed
    keys (`key_indices()` in its top-level &). Each rank knows its own rows' lists: it marks the key chunks each of
    its query chunks lists, one all-reduce shares the marks, and every rank drops the same blocks, so the exchanges
    still pair up."""
    from .select import split_selection

    positions, _ = split_selection(pattern)
    parts = positions.parts if isinstance(positions, P.And) else (positions,)
    if not any(isinstance(part, P.KeyIndices) for part in parts):
        return p
    world, chunks = p.world, p.length // p.chunk
    rank = dist.get_rank(group)
    own = chunks_of(p.layout, world, rank)
    idx = key_indices.long().unflatten(2, (len(own), p.chunk))  # [B, H', slots, chunk, n]
    chunk_of = torch.where((idx >= 0) & (idx < p.length), idx // p.chunk, chunks)  # unlisted: past the last chunk
    per_slot = chunk_of.transpose(0, 2).reshape(len(own), -1)  # every listed chunk of each of the rank's chunks
    marks = torch.zeros(len(own), chunks + 1, dtype=torch.int32, device=idx.device)
    marks.scatter_(1, per_slot, 1)
    return _keep_marked(p, marks[:, :chunks] > 0, group)


def skip_unrelated_documents(p: Plan, pattern: P.Pattern, document_ids: torch.Tensor) -> Plan:
    """`p` without the blocks whose query and key chunks share no document, where the pattern requires a shared
    one (`documents()` or `in_document()` in its top-level &): each chunk's ids span [min, max] (per batch), and
    disjoint spans share none. Decided from the whole sequence's ids, which every rank holds: every rank drops the
    same blocks, so the exchanges still pair up. One host sync per call."""
    from .select import split_selection

    positions, _ = split_selection(pattern)
    parts = positions.parts if isinstance(positions, P.And) else (positions,)
    if not any(isinstance(part, (P.Documents, P.InDocument)) for part in parts):
        return p
    ids = document_ids.reshape(-1, document_ids.shape[-1]).unflatten(-1, (-1, p.chunk))  # [B', chunks, chunk]
    lo, hi = ids.amin(-1).cpu(), ids.amax(-1).cpu()  # [B', chunks]
    # Chunks a and b may share a document only where their spans overlap, in some batch element.
    meet = ((lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])).any(0)
    blocks = tuple(tuple(bl for bl in rank if meet[bl.q_chunk, bl.k_chunk]) for rank in p.blocks)
    return Plan(p.world, p.chunk, p.layout, blocks)
