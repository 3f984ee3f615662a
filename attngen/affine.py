"""Integer affine atoms over positions (q, k, Sq, Sk): normalisation, C lowering and tile classification.

Used by the planner (lowering an `Affine` leaf to C) and by the scheduler (classifying tiles of it by interval
arithmetic on tile corners); neither depends on the other through this module."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.printing.c import ccode

from .pattern import SYMBOLS

EMPTY, PARTIAL, FULL = 0, 1, 2
_SYMS = tuple(SYMBOLS.values())  # q, k, Sq, Sk


@dataclass(frozen=True)
class LinearAtom:
    """`coef · (q, k, Sq, Sk) + const  (>= | == | !=)  0` with integer coefficients."""

    coef: tuple[int, int, int, int]
    const: int
    op: str  # "ge" | "eq" | "ne"


def linear_atom(rel: sp.Rel) -> LinearAtom:
    """Normalise an affine comparison over the integers to one of `L >= 0`, `L == 0`, `L != 0`."""
    diff = sp.expand(rel.lhs - rel.rhs)
    poly = sp.Poly(diff, *_SYMS)
    coeffs = [sp.Rational(poly.coeff_monomial(s)) for s in _SYMS]
    const = sp.Rational(poly.coeff_monomial(1))
    scale = math.lcm(*(c.q for c in (*coeffs, const)))
    ci, c0 = [int(c * scale) for c in coeffs], int(const * scale)
    # Over the integers: L < 0 <=> -L - 1 >= 0 and L > 0 <=> L - 1 >= 0.
    if isinstance(rel, sp.Ge):
        return LinearAtom(tuple(ci), c0, "ge")
    if isinstance(rel, sp.Gt):
        return LinearAtom(tuple(ci), c0 - 1, "ge")
    if isinstance(rel, sp.Le):
        return LinearAtom(tuple(-c for c in ci), -c0, "ge")
    if isinstance(rel, sp.Lt):
        return LinearAtom(tuple(-c for c in ci), -c0 - 1, "ge")
    return LinearAtom(tuple(ci), c0, "eq" if isinstance(rel, sp.Eq) else "ne")


# ------------------------------------------------------------------------------------------------ lowering

# C operators for & and |: short-circuit where a later operand may load memory that an earlier one guards,
# bitwise (no branches, a select per element) where every operand is a comparison.
GUARDED, BRANCH_FREE = (" && ", " || "), (" & ", " | ")


def lower_c(e: sp.Basic, ops: tuple[str, str]) -> str:
    """C text of a boolean combination of affine comparisons; rational coefficients are scaled to integers."""
    if e is sp.true or e is sp.false:
        return str(bool(e)).lower()
    if isinstance(e, (sp.And, sp.Or)):
        joint = ops[0] if isinstance(e, sp.And) else ops[1]
        return joint.join(f"({lower_c(a, ops)})" for a in e.args)
    if isinstance(e, sp.Not):
        return f"!({lower_c(e.args[0], ops)})"
    a = linear_atom(e)
    # Positions are 32-bit ints below 2**31: a coefficient beyond ±1 (or a constant beyond 2**30) could overflow int
    # arithmetic, so such an atom is evaluated in 64 bits.
    wide = any(abs(c) > 1 for c in a.coef) or abs(a.const) > 2**30
    sides = (sp.Poly(sp.expand(side), *_SYMS) for side in (e.lhs, e.rhs))
    if not wide and all(c.is_integer for poly in sides for c in poly.coeffs()):  # as written: int arithmetic in C
        return ccode(e)
    suffix = "LL" if wide else ""
    terms = [f"{c}{suffix}*{s}" for c, s in zip(a.coef, ("q", "k", "Sq", "Sk")) if c]
    terms += [f"{a.const}{suffix}"] if a.const or not terms else []
    return f"{' + '.join(terms)} {dict(ge='>=', eq='==', ne='!=')[a.op]} 0"


# ---------------------------------------------------------------------------------------- tile classification


def tile_bounds(n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each tile of `block` positions over [0, n)."""
    lo = np.arange(0, n, block, dtype=np.int64)
    return lo, np.minimum(lo + block - 1, n - 1)


def _classes(e: sp.Basic, ql, qh, kl, kh, Sq: int, Sk: int) -> np.ndarray:
    if e is sp.true or e is sp.false:
        return np.full((ql.size, kl.size), FULL if e is sp.true else EMPTY, np.int8)
    if isinstance(e, (sp.And, sp.Or)):
        parts = [_classes(a, ql, qh, kl, kh, Sq, Sk) for a in e.args]
        return functools.reduce(np.minimum if isinstance(e, sp.And) else np.maximum, parts)
    if isinstance(e, sp.Not):
        return (FULL - _classes(e.args[0], ql, qh, kl, kh, Sq, Sk)).astype(np.int8)
    a = linear_atom(e)
    cq, ck, csq, csk = a.coef
    const = a.const + csq * Sq + csk * Sk
    # A linear form takes its extremes over a tile at the tile's corners.
    lo = const + np.minimum(cq * ql, cq * qh)[:, None] + np.minimum(ck * kl, ck * kh)[None, :]
    hi = const + np.maximum(cq * ql, cq * qh)[:, None] + np.maximum(ck * kl, ck * kh)[None, :]
    if a.op == "ge":
        out = np.where(lo >= 0, FULL, np.where(hi < 0, EMPTY, PARTIAL))
    else:
        out = np.where((lo == 0) & (hi == 0), FULL, np.where((lo > 0) | (hi < 0), EMPTY, PARTIAL))
        out = FULL - out if a.op == "ne" else out
    return out.astype(np.int8)


@functools.lru_cache(maxsize=256)
def classes(expr: sp.Basic, bm: int, bn: int, Sq: int, Sk: int) -> np.ndarray:
    """[Tq, Tk] EMPTY / PARTIAL / FULL classes of an affine predicate on bm x bn tiles (clipped to the ends);
    exact per atom, combined by Kleene logic (which may call a tile PARTIAL that is really full or empty)."""
    ql, qh = tile_bounds(Sq, bm)
    kl, kh = tile_bounds(Sk, bn)
    return _classes(expr, ql, qh, kl, kh, Sq, Sk)
