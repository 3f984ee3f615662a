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

from . import affine
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
    is kept (dropped), counted with a 2-d prefix sum."""
    device = lay.device
    csum = torch.nn.functional.pad(lay.to(torch.int64).cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # [LH, nbq+1, nbk+1]
    ql, qh = (torch.as_tensor(b // bs, device=device) for b in affine.tile_bounds(Sq, bm))
    kl, kh = (torch.as_tensor(b // bs, device=device) for b in affine.tile_bounds(Sk, bn))
    r0, r1, c0, c1 = ql[:, None], qh[:, None] + 1, kl[None, :], kh[None, :] + 1
    ones = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
    area = (r1 - r0) * (c1 - c0)
    cls = torch.where(ones == area, FULL, torch.where(ones == 0, EMPTY, PARTIAL))
    return cls.to(torch.int8).unsqueeze(0)


def tile_classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime) -> torch.Tensor:
    """int8 [LB, LH, Tq, Tk] classes of a positional structure (LB, LH are 1 unless the pattern depends on batch
    or head). `runtime` is the call's `prepare.Prepared` (layouts, document ids, key lengths), or None when the
    pattern reads none."""
    sub = functools.partial(tile_classes, bm=bm, bn=bn, Sq=Sq, Sk=Sk, device=device, runtime=runtime)
    if isinstance(pat, (P.And, P.Or)):
        return functools.reduce(torch.minimum if isinstance(pat, P.And) else torch.maximum, map(sub, pat.parts))
    if isinstance(pat, P.Not):
        return FULL - sub(pat.part)
    if isinstance(pat, P.Affine):
        return torch.from_numpy(affine.classes(pat.expr, bm, bn, Sq, Sk)).to(device)[None, None]
    if isinstance(pat, P.LayoutSlot):
        return _layout_classes(runtime.layouts[pat.index], pat.block_size, bm, bn, Sq, Sk)
    if isinstance(pat, P.KeyPadding):
        kl, kh = (torch.as_tensor(b, device=device) for b in affine.tile_bounds(Sk, bn))
        n = runtime.key_lengths.view(-1, 1)
        cls = torch.where(kh < n, FULL, torch.where(kl >= n, EMPTY, PARTIAL))
        return cls.to(torch.int8)[:, None, None, :]
    if isinstance(pat, P.Documents):
        qd, kd = runtime.document_ids
        (qmin, qmax), (kmin, kmax) = _tile_min_max(qd, bm), _tile_min_max(kd, bn)
        cls = _range_classes(qmin, qmax, kmin, kmax, (qmin == qmax, kmin == kmax))
        return cls[:, None]
    raise InputError(f"unknown pattern node {pat!r}")


# ------------------------------------------------------------------------------------------------ schedule


def _compress(cls: torch.Tensor) -> Schedule:
    keep = cls > EMPTY
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept tiles first, ascending
    partial = torch.gather(cls, -1, order) == PARTIAL
    tiles = (order.to(torch.int32) << 1) | partial.to(torch.int32)
    return Schedule(tiles.contiguous(), counts.contiguous(), cls.shape[-2], cls.shape[-1])


def classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime=None) -> torch.Tensor:
    """Tile classes including the sequence end: a key tile running past Sk is at most PARTIAL."""
    cls = tile_classes(pat, bm, bn, Sq, Sk, device, runtime)
    cls = cls.expand(*cls.shape[:2], math.ceil(Sq / bm), math.ceil(Sk / bn)).clone()
    if Sk % bn:
        cls[..., -1] = torch.clamp(cls[..., -1], max=PARTIAL)
    return cls


def build(
    pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime=None, transpose=False, rule=None
) -> Schedule:
    """Schedule of a positional structure over query tiles (or over key tiles with `transpose`, for the dK/dV
    kernel), without the tiles a selection `rule` rules out (`Selector.tile_keep`). Patterns that read no run-time
    tensor are cached per shape; those whose only run-time tensors are layout grids are cached on the grid tensor
    (so a layout reused across calls is classified once); a rule's share is built per call."""
    keep = None if rule is None else rule.tile_keep(bm, bn, Sq, Sk, runtime.rule)
    if keep is not None:
        cls = torch.where(keep.to(device), classes(pat, bm, bn, Sq, Sk, device, runtime), EMPTY).to(torch.int8)
        return _compress(cls.transpose(-1, -2) if transpose else cls)
    if not pat.runtime_inputs and not (runtime is not None and runtime.layouts):
        return _static(pat, bm, bn, Sq, Sk, str(device), transpose)
    key = (pat, bm, bn, Sq, Sk, transpose)
    store = None
    if not pat.runtime_inputs:
        first, rest = runtime.layouts[0], runtime.layouts[1:]
        store = _schedules_of(first)
        key += (rest,)
        if key in store:
            return store[key]
    cls = classes(pat, bm, bn, Sq, Sk, device, runtime)
    sched = _compress(cls.transpose(-1, -2) if transpose else cls)
    if store is not None:
        store[key] = sched
    return sched


# id of a layout grid tensor (the device copy its pattern leaf owns) -> {shape key: Schedule}; dropped with the grid.
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
