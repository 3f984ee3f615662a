"""Stage 2b: KernelPlan tiles + sequence lengths (+ call-time tensors) -> Schedule: which tiles a kernel visits.

Every (query tile, key tile) pair is EMPTY (skipped), PARTIAL (mask evaluated per element) or FULL (no mask).
Affine leaves are classified exactly per atom by interval arithmetic on tile corners (a linear form takes its
extremes at corners), on the host; layouts, documents and key lengths are classified on the tensors' device
at tile granularity, so nothing S x S is ever built. Leaves combine by Kleene logic (& = min, | = max,
~ = 2 - x), which may call a tile PARTIAL that is really full or empty, never the reverse."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy as sp
import torch

from . import pattern as P
from .errors import InputError
from .plan import linear_atom
from .reference import document_ids_pair

EMPTY, PARTIAL, FULL = 0, 1, 2


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


def _bounds(n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.arange(0, n, block, dtype=np.int64)
    return lo, np.minimum(lo + block - 1, n - 1)


def _affine_classes(e: sp.Basic, ql, qh, kl, kh, Sq: int, Sk: int) -> np.ndarray:
    if e is sp.true or e is sp.false:
        return np.full((ql.size, kl.size), FULL if e is sp.true else EMPTY, np.int8)
    if isinstance(e, (sp.And, sp.Or)):
        parts = [_affine_classes(a, ql, qh, kl, kh, Sq, Sk) for a in e.args]
        return functools.reduce(np.minimum if isinstance(e, sp.And) else np.maximum, parts)
    if isinstance(e, sp.Not):
        return (FULL - _affine_classes(e.args[0], ql, qh, kl, kh, Sq, Sk)).astype(np.int8)
    a = linear_atom(e)
    cq, ck, csq, csk = a.coef
    const = a.const + csq * Sq + csk * Sk
    lo = const + np.minimum(cq * ql, cq * qh)[:, None] + np.minimum(ck * kl, ck * kh)[None, :]
    hi = const + np.maximum(cq * ql, cq * qh)[:, None] + np.maximum(ck * kl, ck * kh)[None, :]
    if a.op == "ge":
        out = np.where(lo >= 0, FULL, np.where(hi < 0, EMPTY, PARTIAL))
    else:
        out = np.where((lo == 0) & (hi == 0), FULL, np.where((lo > 0) | (hi < 0), EMPTY, PARTIAL))
        out = FULL - out if a.op == "ne" else out
    return out.astype(np.int8)


@functools.lru_cache(maxsize=256)
def affine_classes(expr: sp.Basic, bm: int, bn: int, Sq: int, Sk: int) -> np.ndarray:
    """[Tq, Tk] classes of an affine predicate (clipped to the sequence ends)."""
    ql, qh = _bounds(Sq, bm)
    kl, kh = _bounds(Sk, bn)
    return _affine_classes(expr, ql, qh, kl, kh, Sq, Sk)


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


def _layout_classes(leaf: P.BlockLayout, bm: int, bn: int, Sq: int, Sk: int, device) -> torch.Tensor:
    lay = layout_on(leaf, device).to(torch.int32)  # [LH, nbq, nbk]
    bs = leaf.block_size
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    if lay.shape[-2] < nq or lay.shape[-1] < nk:
        raise InputError(
            f"block layout {tuple(lay.shape[-2:])} does not cover {nq}x{nk} blocks of {bs} for Sq={Sq}, Sk={Sk}"
        )
    csum = torch.nn.functional.pad(lay.cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # [LH, nbq+1, nbk+1]
    ql, qh = (torch.as_tensor(b // bs, device=device) for b in _bounds(Sq, bm))
    kl, kh = (torch.as_tensor(b // bs, device=device) for b in _bounds(Sk, bn))
    r0, r1, c0, c1 = ql[:, None], qh[:, None] + 1, kl[None, :], kh[None, :] + 1
    ones = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
    area = (r1 - r0) * (c1 - c0)
    cls = torch.where(ones == area, FULL, torch.where(ones == 0, EMPTY, PARTIAL))
    return cls.to(torch.int8).unsqueeze(0)


@functools.lru_cache(maxsize=64)
def layout_on(leaf: P.BlockLayout, device: torch.device | str) -> torch.Tensor:
    """The layout as a uint8 [LH, nbq, nbk] tensor on `device`, uploaded once."""
    return leaf.tensor().to(device)


def tile_classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime: dict) -> torch.Tensor:
    """int8 [LB, LH, Tq, Tk] classes of `pat` (LB, LH are 1 unless the pattern depends on batch / head)."""
    if isinstance(pat, (P.And, P.Or)):
        parts = [tile_classes(p, bm, bn, Sq, Sk, device, runtime) for p in pat.parts]
        return functools.reduce(torch.minimum if isinstance(pat, P.And) else torch.maximum, parts)
    if isinstance(pat, P.Not):
        return FULL - tile_classes(pat.part, bm, bn, Sq, Sk, device, runtime)
    if isinstance(pat, P.Affine):
        return torch.from_numpy(affine_classes(pat.expr, bm, bn, Sq, Sk)).to(device)[None, None]
    if isinstance(pat, P.BlockLayout):
        return _layout_classes(pat, bm, bn, Sq, Sk, device)
    if isinstance(pat, P.KeyPadding):
        kl, kh = (torch.as_tensor(b, device=device) for b in _bounds(Sk, bn))
        n = runtime["key_lengths"].view(-1, 1).to(device)
        cls = torch.where(kh < n, FULL, torch.where(kl >= n, EMPTY, PARTIAL))
        return cls.to(torch.int8)[:, None, None, :]
    if isinstance(pat, P.Documents):
        qd, kd = document_ids_pair(runtime["document_ids"], Sq, Sk)
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


def classes(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime: dict) -> torch.Tensor:
    """Tile classes including the sequence end: a key tile running past Sk is at most PARTIAL."""
    cls = tile_classes(pat, bm, bn, Sq, Sk, device, runtime)
    cls = cls.expand(*cls.shape[:2], math.ceil(Sq / bm), math.ceil(Sk / bn)).clone()
    if Sk % bn:
        cls[..., -1] = torch.clamp(cls[..., -1], max=PARTIAL)
    return cls


def build(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device, runtime: dict, transpose=False) -> Schedule:
    """Schedule over query tiles (or over key tiles with `transpose`, for the dK/dV kernel)."""
    if not pat.runtime_inputs:
        return _static(pat, bm, bn, Sq, Sk, str(device), transpose)
    cls = classes(pat, bm, bn, Sq, Sk, device, runtime)
    return _compress(cls.transpose(-1, -2) if transpose else cls)


@functools.lru_cache(maxsize=128)
def _static(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int, device: str, transpose: bool) -> Schedule:
    cls = classes(pat, bm, bn, Sq, Sk, device, {})
    return _compress(cls.transpose(-1, -2) if transpose else cls)


# ----------------------------------------------------------------------------------------------- explain

_GLYPH = {EMPTY: "·", PARTIAL: "▒", FULL: "█"}


def _draw(cls: np.ndarray, limit: int = 64) -> list[str]:
    if cls.shape[0] > limit or cls.shape[1] > limit:
        return [f"    ({cls.shape[0]}x{cls.shape[1]} tiles: too many to draw)"]
    return ["    " + "".join(_GLYPH[int(c)] for c in row) for row in cls]


def explain(pat: P.Pattern, bm: int, bn: int, Sq: int, Sk: int) -> str:
    """Tile maps (█ full, ▒ partial, · empty) of the pattern and of each of its leaves, and the totals."""
    if pat.runtime_inputs:
        names = ", ".join(sorted(pat.runtime_inputs))
        return f"  schedule  built per call on the GPU from {names}; affine and layout parts fixed per length"
    cls = classes(pat, bm, bn, Sq, Sk, "cpu", {})
    n = [(cls == c).sum().item() for c in (FULL, PARTIAL, EMPTY)]
    lines = [
        f"  schedule  Sq={Sq}, Sk={Sk}: {cls.shape[-2]} query tiles x {cls.shape[-1]} key tiles of "
        f"{bm}x{bn}: {n[0]} full (no mask), {n[1]} partial (mask per element), {n[2]} empty (skipped)"
    ]
    lines += _draw(cls[0, 0].numpy())
    leaves = list(dict.fromkeys(pat.leaves()))
    if len(leaves) > 1 or Sk % bn:
        lines.append("  why       each leaf on its own (& takes the lower class, | the higher, ~ swaps):")
        for leaf in leaves:
            lines.append(f"  {leaf!r}")
            lines += _draw(tile_classes(leaf, bm, bn, Sq, Sk, "cpu", {})[0, 0].numpy())
        if Sk % bn:
            lines.append(f"  the last key tile runs past Sk={Sk}, so it is at most partial")
    return "\n".join(lines)
