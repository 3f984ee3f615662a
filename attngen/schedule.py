"""Call-time stage: a plan's tiles + sequence lengths + run-time tensors -> Schedule: which tiles a kernel visits.

Every (query tile, key tile) pair is EMPTY (skipped), PARTIAL (mask evaluated per element) or FULL (no mask).
Affine leaves are classified exactly per atom by interval arithmetic on tile corners (`affine.classes`), on the
host; layouts, documents and key lengths are classified on the tensors' device at tile granularity, so nothing
S x S is ever built. Leaves combine by Kleene logic (& = min, | = max, ~ = 2 - x), which may call a tile PARTIAL
that is really full or empty, never the reverse. Schedules are built from a pattern's structure (`LayoutSlot`
leaves read their grids from the run-time tensors), so they need nothing the custom op does not carry."""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import affine, device, keyindex
from . import pattern as P
from .affine import EMPTY, FULL, PARTIAL
from .errors import InputError


@dataclass(frozen=True, eq=False)
class Schedule:
    """Per row (query tile, or key tile when transposed) of each (batch, head): the tiles to visit."""

    tiles: torch.Tensor  # int32 [LB, LH, rows, cap]: (tile << 1) | partial, ascending, valid up to counts
    counts: torch.Tensor  # int32 [LB, LH, rows]
    rows: int
    cap: int

    @property
    def strides(self) -> tuple[int, int]:
        """(batch, head) strides in rows; 0 where the schedule is shared."""
        lb, lh = self.counts.shape[:2]
        return (lh * self.rows if lb > 1 else 0, self.rows if lh > 1 else 0)


# ----------------------------------------------------------------------------------------- classification


def _range_classes(q_min, q_max, k_min, k_max, all_same) -> torch.Tensor:
    """Classes of `value(q) == value(k)` from per-tile min/max of the values."""
    disjoint = (q_max[..., :, None] < k_min[..., None, :]) | (k_max[..., None, :] < q_min[..., :, None])
    same = all_same[0][..., :, None] & all_same[1][..., None, :] & (q_min[..., :, None] == k_min[..., None, :])
    return torch.where(same, FULL, torch.where(disjoint, EMPTY, PARTIAL)).to(torch.int8)


def _tile_min_max(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile min and max along the last dim (the ragged end is padded by repeating the last value)."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    t = x.view(*x.shape[:-1], -1, block)
    return t.amin(-1), t.amax(-1)


def _layout_classes(lay: torch.Tensor, bs: int, bm: int, bn: int, Sq: int, Sk: int) -> torch.Tensor:
    """Classes of a [LH, nbq, nbk] uint8 grid of `bs`-blocks: a tile is full (empty) when every block it touches
    is kept (dropped), counted with a 2-d prefix sum (or, for tiles of whole blocks, by pooling the blocks)."""
    if bm % bs == 0 and bn % bs == 0:
        return _pooled_classes(lay, bm // bs, bn // bs, math.ceil(Sq / bm), math.ceil(Sk / bn))
    device = lay.device
    csum = lay.to(torch.int32).cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32)
    csum = torch.nn.functional.pad(csum, (1, 0, 1, 0))  # [LH, nbq+1, nbk+1]
    ql, qh = (torch.as_tensor(b // bs, device=device) for b in affine.tile_bounds(Sq, bm))
    kl, kh = (torch.as_tensor(b // bs, device=device) for b in affine.tile_bounds(Sk, bn))
    r0, r1, c0, c1 = ql[:, None], qh[:, None] + 1, kl[None, :], kh[None, :] + 1
    ones = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
    area = (r1 - r0) * (c1 - c0)
    cls = torch.where(ones == area, FULL, torch.where(ones == 0, EMPTY, PARTIAL))
    return cls.to(torch.int8).unsqueeze(0)


@functools.lru_cache(maxsize=256)
def _affine_classes(expr, bm: int, bn: int, Sq: int, Sk: int, device: str) -> torch.Tensor:
    """An affine leaf's classes on `device`, [1, 1, Tq, Tk] (kept there: patterns whose schedules are built per
    call classify their affine leaves once per length)."""
    return torch.from_numpy(affine.classes(expr, bm, bn, Sq, Sk)).to(device)[None, None]


def _pooled_classes(lay: torch.Tensor, rq: int, rk: int, Tq: int, Tk: int) -> torch.Tensor:
    """Classes of tiles of rq x rk whole blocks of a 0/1 grid [LH, nbq, nbk] (blocks past the grid count as kept
    for FULL and dropped for EMPTY: they are past the sequence)."""
    lay = lay[:, : Tq * rq, : Tk * rk]
    if rq == rk == 1 and lay.shape[1:] == (Tq, Tk):
        return (lay.to(torch.int8) * FULL).unsqueeze(0)
    pad = (0, Tk * rk - lay.shape[2], 0, Tq * rq - lay.shape[1])
    blocks = lambda value: torch.nn.functional.pad(lay, pad, value=value).view(-1, Tq, rq, Tk, rk)
    full = blocks(1).amin((2, 4)) > 0
    some = blocks(0).amax((2, 4)) > 0
    return torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8).unsqueeze(0)


def tile_classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime, heads=None) -> torch.Tensor:
    """int8 [LB, LH, Tq, Tk] classes of a positional structure (LB, LH are 1 unless the pattern depends on batch
    or head). `runtime` is the call's `prepare.Prepared` (layouts, document ids, key lengths, sorted tokens), or
    None when the pattern reads none."""
    route = getattr(runtime, "route", None)
    if route is not None and route.ranges is not None:
        return _key_range_classes(route.ranges, bm, bn, Sk)
    if route is not None:
        return _sorted_classes(pat, _SortedTiles(route, bm, bn), runtime)
    sub = functools.partial(tile_classes, bm=bm, bn=bn, Sq=Sq, Sk=Sk, device=device, runtime=runtime, heads=heads)
    if isinstance(pat, (P.And, P.Or)):
        return functools.reduce(torch.minimum if isinstance(pat, P.And) else torch.maximum, map(sub, pat.parts))
    if isinstance(pat, P.Not):
        return FULL - sub(pat.part)
    if isinstance(pat, P.Affine):
        return _affine_classes(pat.expr, bm, bn, Sq, Sk, str(device))
    if isinstance(pat, P.LayoutSlot):
        lay = runtime.layouts[pat.index]
        if lay.dim() == 4:  # a grid per batch element: [B or 1, H or 1, Tq, Tk]
            cls = _layout_classes(lay.flatten(0, 1), pat.block_size, bm, bn, Sq, Sk)
            return cls.view(*lay.shape[:2], -1, math.ceil(Sk / bn))
        return _layout_classes(lay, pat.block_size, bm, bn, Sq, Sk)
    if isinstance(pat, P.SelectedBlocks):  # the call's block top-k grid, [B, Hq, nbq, nbk]
        grid = runtime.blocks
        return _layout_classes(grid.flatten(0, 1), pat.block, bm, bn, Sq, Sk).view(
            *grid.shape[:2], -1, math.ceil(Sk / bn)
        )
    if isinstance(pat, P.KeyIndices):
        lists = runtime.key_lists  # lists per KV head serve the `heads` query heads of their groups
        return keyindex.tile_classes(lists, bm, bn, Sq, Sk, (heads or lists.shape[1]) // lists.shape[1])
    if isinstance(pat, P.KeyPadding):
        kl, kh = (torch.as_tensor(b, device=device) for b in affine.tile_bounds(Sk, bn))
        n = runtime.key_lengths.view(-1, 1)
        cls = torch.where(kh < n, FULL, torch.where(kl >= n, EMPTY, PARTIAL))
        return cls.to(torch.int8)[:, None, None, :]
    if isinstance(pat, (P.Documents, P.InDocument)):
        qd, kd, *within = runtime.document_ids
        (qmin, qmax), (kmin, kmax) = _tile_min_max(qd, bm), _tile_min_max(kd, bn)
        cls = _range_classes(qmin, qmax, kmin, kmax, (qmin == qmax, kmin == kmax))
        if isinstance(pat, P.InDocument):  # and the predicate over the box of the tile's positions within documents
            (ql, qh), (kl, kh) = _tile_min_max(within[0].long(), bm), _tile_min_max(within[1].long(), bn)
            inner = affine.box_classes(
                pat.expr, ql[..., :, None], qh[..., :, None], kl[..., None, :], kh[..., None, :], Sq, Sk
            )
            cls = torch.minimum(cls, inner)
        return cls[:, None]
    raise InputError(f"unknown pattern node {pat!r}")


# ------------------------------------------------------------------------------------- reordered tokens
# A tile of sorted tokens holds original positions within [least, greatest] of its side, so each leaf is
# classified over the box of those bounds (and bucket ids, keep flags, document ids by their per-tile extremes):
# sound for the pairs the tile really holds, and tight where sorting keeps positions increasing (inside a bucket).


@dataclass(frozen=True)
class _SortedTiles:
    """Per tile of the sorted tokens of each (batch, query head): values of its queries as [B, Hq, Tq, 1] and of
    its keys as [B, Hq, 1, Tk] (a key head's tiles serve every query head of its group)."""

    route: object  # reorder.Route
    bm: int
    bn: int

    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(least, greatest) of x [B, Hq, Sq] over each query tile, as [B, Hq, Tq, 1]."""
        lo, hi = _tile_min_max(x, self.bm)
        return lo[..., :, None], hi[..., :, None]

    def keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(least, greatest) of x [B, Hkv, Sk] over each key tile, as [B, Hq, 1, Tk]."""
        group = self.route.q_order.shape[1] // x.shape[1]
        lo, hi = (t.repeat_interleave(group, dim=1)[..., None, :] for t in _tile_min_max(x, self.bn))
        return lo, hi

    @functools.cached_property
    def positions(self) -> tuple[torch.Tensor, ...]:
        """(query least, query greatest, key least, key greatest) original positions, int64."""
        return (*self.queries(self.route.q_order.long()), *self.keys(self.route.k_order.long()))


def _sorted_classes(pat: P.Pattern, tiles: _SortedTiles, runtime) -> torch.Tensor:
    """int8 [B, Hq, Tq, Tk] classes of a positional structure over tiles of sorted tokens."""
    sub = functools.partial(_sorted_classes, tiles=tiles, runtime=runtime)
    if isinstance(pat, (P.And, P.Or)):
        return functools.reduce(torch.minimum if isinstance(pat, P.And) else torch.maximum, map(sub, pat.parts))
    if isinstance(pat, P.Not):
        return FULL - sub(pat.part)
    route, (ql, qh, kl, kh) = tiles.route, tiles.positions
    Sq, Sk = route.q_order.shape[-1], route.k_order.shape[-1]
    if isinstance(pat, P.Affine):
        return affine.box_classes(pat.expr, ql, qh, kl, kh, Sq, Sk)
    if isinstance(pat, P.KeyPadding):
        n = runtime.key_lengths.view(-1, 1, 1, 1)
        return torch.where(kh < n, FULL, torch.where(kl >= n, EMPTY, PARTIAL)).to(torch.int8)
    if isinstance(pat, P.LayoutSlot):
        lay, bs = runtime.layouts[pat.index], pat.block_size
        lay = lay if lay.dim() == 4 else lay[None]  # [B or 1, H or 1, nbq, nbk]
        csum = torch.nn.functional.pad(lay.to(torch.int64).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        bi = torch.arange(lay.shape[0], device=lay.device).view(-1, 1, 1, 1)
        hi = torch.arange(lay.shape[1], device=lay.device).view(1, -1, 1, 1)
        r0, r1, c0, c1 = ql // bs, qh // bs + 1, kl // bs, kh // bs + 1
        ones = csum[bi, hi, r1, c1] - csum[bi, hi, r0, c1] - csum[bi, hi, r1, c0] + csum[bi, hi, r0, c0]
        area = (r1 - r0) * (c1 - c0)
        return torch.where(ones == area, FULL, torch.where(ones == 0, EMPTY, PARTIAL)).to(torch.int8)
    if isinstance(pat, (P.Documents, P.InDocument)):
        qo, ko = route.q_order.long(), route.k_order.long()
        qd, kd, *within = (
            torch.gather(t[:, None, :].expand(*o.shape), 2, o) for t, o in zip(runtime.document_ids, (qo, ko, qo, ko))
        )
        cls = _side_classes(tiles.queries(qd), tiles.keys(kd), equal=True)
        if isinstance(pat, P.InDocument):
            (wql, wqh), (wkl, wkh) = tiles.queries(within[0].long()), tiles.keys(within[1].long())
            cls = torch.minimum(cls, affine.box_classes(pat.expr, wql, wqh, wkl, wkh, Sq, Sk))
        return cls
    if isinstance(pat, P.Buckets):
        qb, kb = route.buckets
        return _side_classes(tiles.queries(qb), tiles.keys(kb), equal=True)
    if isinstance(pat, P.Keep):
        qk, kk = route.keep
        return _side_classes(tiles.queries(qk), tiles.keys(kk), equal=False)
    raise InputError(f"unknown pattern node {pat!r}")


def _key_range_classes(ranges: torch.Tensor, bm: int, bn: int, Sk: int) -> torch.Tensor:
    """Exact classes when every query keeps one range of keys (`reorder.Route.ranges`, [B, Hq, Sq, 2] first key and
    count): a tile is
    FULL where each of its queries keeps all its keys, EMPTY where none keeps any (counted by a difference array
    over the key tiles each query's range touches)."""
    if ranges.is_cuda and not torch.compiler.is_compiling():
        cls = device.range_classes(ranges, bm, bn, Sk)
        if cls is not None:
            return cls
    first, count = ranges[..., 0].long(), ranges[..., 1].long()
    last = first + count - 1
    B, H, Sq = first.shape
    Tq, Tk = math.ceil(Sq / bm), math.ceil(Sk / bn)
    k0 = torch.arange(Tk, device=first.device) * bn
    k1 = k0 + bn - 1  # past Sk for a ragged last tile, which is then never FULL (the kernel masks it)
    (_, first_max), (last_min, _) = _tile_min_max(first, bm), _tile_min_max(last, bm)
    full = (first_max[..., :, None] <= k0) & (last_min[..., :, None] >= k1)
    some = count > 0
    row = torch.arange(B * H, device=first.device).view(B, H, 1) * Tq + torch.arange(Sq, device=first.device) // bm
    touched = torch.zeros(B * H * Tq, Tk + 1, dtype=torch.int32, device=first.device)
    at = row * (Tk + 1)  # +1 at each range's first key tile, -1 past its last; a query keeping none adds 0
    ones = torch.ones_like(at, dtype=torch.int32)
    touched.view(-1).index_add_(0, (at + torch.where(some, first // bn, 0)).view(-1), ones.view(-1))
    touched.view(-1).index_add_(0, (at + torch.where(some, last // bn + 1, 0)).view(-1), -ones.view(-1))
    touched = touched.cumsum(-1)[:, :Tk].view(B, H, Tq, Tk) > 0
    return torch.where(full, FULL, torch.where(touched, PARTIAL, EMPTY)).to(torch.int8)


def _side_classes(qs, ks, *, equal: bool) -> torch.Tensor:
    """Classes from per-tile (least, greatest) values of each side: of `value(q) == value(k)` with `equal`, else
    of `flag(q) and flag(k)` (0/1 flags)."""
    (qlo, qhi), (klo, khi) = qs, ks
    if equal:
        full = (qlo == qhi) & (klo == khi) & (qlo == klo)
        empty = (qhi < klo) | (khi < qlo)
    else:
        full, empty = (qlo > 0) & (klo > 0), (qhi == 0) | (khi == 0)
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


# ------------------------------------------------------------------------------------------------ schedule


def _compress(cls: torch.Tensor) -> Schedule:
    """Each row's visited tiles, ascending, moved to the row's front: tile t goes to slot (kept tiles up to t) - 1
    (a scatter to distinct slots; tiles not visited all go to a spare slot past the end, dropped)."""
    keep = cls > EMPTY
    counts = keep.sum(-1, dtype=torch.int32)
    n = cls.shape[-1]
    slot = torch.where(keep, keep.cumsum(-1) - 1, n)
    entry = (torch.arange(n, dtype=torch.int32, device=cls.device) << 1) | (cls == PARTIAL).to(torch.int32)
    tiles = torch.zeros(*cls.shape[:-1], n + 1, dtype=torch.int32, device=cls.device).scatter_(-1, slot, entry)
    return Schedule(tiles[..., :n].contiguous(), counts.contiguous(), cls.shape[-2], n)


def classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime=None, heads=None) -> torch.Tensor:
    """Tile classes including the sequence end: a key tile running past Sk is at most PARTIAL."""
    cls = tile_classes(pat, bm, bn, Sq, Sk, device, runtime, heads)
    cls = cls.expand(*cls.shape[:2], math.ceil(Sq / bm), math.ceil(Sk / bn)).clone()
    if Sk % bn:
        cls[..., -1] = torch.clamp(cls[..., -1], max=PARTIAL)
    return cls


def build(
    pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime=None, transpose=False, rule=None, heads=None
) -> Schedule:
    """Schedule of a positional structure over query tiles (or over key tiles with `transpose`, for the dK/dV
    kernel), without the tiles a selection `rule` rules out (`Selector.tile_keep`); `heads` is the call's query
    heads (key-index lists per KV head serve their groups). Patterns that read no run-time tensor are cached per
    shape; those whose only run-time tensors are layout grids and document ids are cached on the first of those
    tensors (so a layout, or a batch's ids, reused across calls and layers is classified once); a rule's share is
    built per call."""
    keep = None if rule is None else rule.tile_keep(bm, bn, Sq, Sk, runtime.rule)
    if keep is not None:
        cls = classes(pat, bm, bn, Sq, Sk, device, runtime, heads)
        cls = torch.where(keep.to(device), cls, EMPTY).to(torch.int8)
        return _compress(cls.transpose(-1, -2) if transpose else cls)
    if P.topk_leaf(pat) is not None:  # a new selection every call
        cls = classes(pat, bm, bn, Sq, Sk, device, runtime, heads)
        return _compress(cls.transpose(-1, -2) if transpose else cls)
    if not pat.runtime_inputs and not (runtime is not None and runtime.layouts):
        return _static(pat, bm, bn, Sq, Sk, str(device), transpose)
    key = (pat, bm, bn, Sq, Sk, transpose)
    store = stamp = None
    if pat.runtime_inputs <= {"document_ids"}:  # layouts and document ids: kept on the first of their tensors
        held = (*runtime.layouts, *(runtime.document_ids or ()))
        stamp = versions(held)  # ids changed in place make it again
        if stamp is not None:
            store = _schedules_of(held[0])
            key += (held[1:],)
            if key in store and store[key][0] == stamp:
                return store[key][1]
    cls = classes(pat, bm, bn, Sq, Sk, device, runtime, heads)
    sched = _compress(cls.transpose(-1, -2) if transpose else cls)
    if store is not None:
        store[key] = (stamp, sched)
    return sched


def versions(tensors) -> tuple[int, ...] | None:
    """The tensors' version counters (a change in place bumps them), or None where one has none (an inference
    tensor): what caches kept on call-time tensors check (here, and `prepare`'s converted document ids)."""
    try:
        return tuple(t._version for t in tensors) if all(not t.is_inference() for t in tensors) else None
    except (RuntimeError, AttributeError):
        return None


# id of a layout grid tensor (the device copy its pattern leaf owns) or of a call's converted document ids (which
# prepare keeps while the caller's ids live) -> {shape key: (versions, Schedule)}; dropped with the tensor.
_ON_LAYOUT: dict[int, dict] = {}


def _schedules_of(grid: torch.Tensor) -> dict:
    store = _ON_LAYOUT.get(id(grid))
    if store is None:
        store = _ON_LAYOUT[id(grid)] = {}
        weakref.finalize(grid, _ON_LAYOUT.pop, id(grid), None)
    return store


@functools.lru_cache(maxsize=128)
def _static(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device: str, transpose: bool) -> Schedule:
    cls = classes(pat, bm, bn, Sq, Sk, device, None)
    return _compress(cls.transpose(-1, -2) if transpose else cls)


# ----------------------------------------------------------------------------------------------- explain

_GLYPH = {EMPTY: "·", PARTIAL: "▒", FULL: "█"}


def _draw(cls: np.ndarray, limit: int = 64) -> list[str]:
    if cls.shape[0] > limit or cls.shape[1] > limit:
        return [f"    ({cls.shape[0]}x{cls.shape[1]} tiles: too many to draw)"]
    return ["    " + "".join(_GLYPH[int(c)] for c in row) for row in cls]


def explain(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int) -> str:
    """Tile maps (█ full, ▒ partial, · empty) of a positional pattern and of each of its leaves, and the totals."""
    if pat.reorders:
        return "  schedule  built per call on the GPU, on the tokens sorted by bucket (reorder.py)"
    if P.topk_leaf(pat) is not None:
        return "  schedule  built per call on the GPU from the block top-k selection (blockselect.py)"
    if P.token_leaf(pat) is not None:
        return "  schedule  built per call on the GPU from the top-k by token's key lists (tokenselect.py)"
    if pat.runtime_inputs:
        names = ", ".join(sorted(pat.runtime_inputs))
        return f"  schedule  built per call on the GPU from {names}; affine and layout parts fixed per length"
    structure = pat.structure()
    grids = _Grids(tuple(leaf.tensor() for leaf in pat.layouts()))
    cls = classes(structure, bm, bn, Sq, Sk, "cpu", grids)
    n = [(cls == c).sum().item() for c in (FULL, PARTIAL, EMPTY)]
    lines = [
        f"  schedule  Sq={Sq}, Sk={Sk}: {cls.shape[-2]} query tiles x {cls.shape[-1]} key tiles of "
        f"{bm}x{bn}: {n[0]} full (no mask), {n[1]} partial (mask per element), {n[2]} empty (skipped)"
    ]
    lines += _draw(cls[0, 0].numpy())
    leaves = list(dict.fromkeys(zip(pat.leaves(), structure.leaves())))
    if len(leaves) > 1 or Sk % bn:
        lines.append("  why       each leaf on its own (& takes the lower class, | the higher, ~ swaps):")
        for leaf, slot in leaves:
            lines.append(f"  {leaf!r}")
            lines += _draw(tile_classes(slot, bm, bn, Sq, Sk, "cpu", grids)[0, 0].numpy())
        if Sk % bn:
            lines.append(f"  the last key tile runs past Sk={Sk}, so it is at most partial")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Grids:
    """The run-time tensors of a pattern that reads layouts only (what `explain` classifies with)."""

    layouts: tuple[torch.Tensor, ...]
    document_ids = None
    key_lengths = None
    route = None
    blocks = None
    key_bits = None
