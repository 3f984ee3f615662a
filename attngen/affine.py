"""Integer affine atoms over positions (q, k, Sq, Sk): normalisation, C lowering and tile classification.

Used by the planner (lowering an `Affine` leaf to C) and by the scheduler (classifying tiles of it by interval
arithmetic on tile corners); neither depends on the other through this module."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy as sp
import torch
from sympy.printing.c import ccode

from .symbols import SYMBOLS

EMPTY, PARTIAL, FULL = 0, 1, 2
_SYMS = tuple(SYMBOLS.values())  # q, k, Sq, Sk


@dataclass(frozen=True)
class LinearAtom:
    """`coef · (q, k, Sq, Sk) + const  (>= | == | !=)  0` with integer coefficients."""

    coef: tuple[int, int, int, int]
    const: int
    op: str  # "ge" | "eq" | "ne"


# ------------------------------------------------------------------------------------------------ modular terms

MAX_DIVISOR = 2**30


@dataclass(frozen=True)
class Term:
    """`floor(x / div)` ("floor") or `x mod div` ("mod", in [0, div)) of an integer affine `x`."""

    kind: str
    coef: tuple[int, int, int, int]
    const: int
    div: int


def has_modular(e: sp.Basic) -> bool:
    """Whether `e` contains floor / ceiling / Mod (so it is not a plain linear atom)."""
    return bool(e.atoms(sp.floor, sp.ceiling, sp.Mod))


def _integer_affine(x: sp.Expr, what: str) -> tuple[tuple[int, int, int, int], int]:
    """Integer coefficients of an affine `x` in q, k, Sq, Sk; ValueError (with a reason) when it is not one."""
    x = sp.expand(x)
    if has_modular(x) or not x.is_polynomial(*_SYMS) or sp.Poly(x, *_SYMS).total_degree() > 1:
        raise ValueError(f"{what}: the operand must be affine in q, k, Sq, Sk (no nested // or %)")
    poly = sp.Poly(x, *_SYMS)
    coef = [poly.coeff_monomial(s) for s in _SYMS]
    const = poly.coeff_monomial(1)
    if not all(c.is_Integer and abs(int(c)) <= MAX_DIVISOR for c in (*coef, const)):
        raise ValueError(f"{what}: the operand's coefficients must be integers up to 2**30")
    return tuple(int(c) for c in coef), int(const)


def modular_term(t: sp.Expr) -> tuple[int, Term]:
    """`t` (floor(a), ceiling(a) with `a` affine with rational coefficients, or Mod(x, c) with x integer affine and
    c a positive integer constant) as `sign * Term`; ValueError with the reason for anything else."""
    if isinstance(t, (sp.floor, sp.ceiling)):
        sign = 1 if isinstance(t, sp.floor) else -1  # ceiling(a) = -floor(-a)
        arg = sp.expand(sign * t.args[0])
        if has_modular(arg) or not arg.is_polynomial(*_SYMS) or sp.Poly(arg, *_SYMS).total_degree() > 1:
            raise ValueError(f"{t}: the operand of // must be affine in q, k, Sq, Sk (no nested // or %)")
        coeffs = sp.Poly(arg, *_SYMS).coeffs() if arg.free_symbols else [arg]
        if not all(sp.sympify(c).is_Rational for c in coeffs):
            raise ValueError(f"{t}: the divisor must be a positive integer constant")
        div = math.lcm(*(sp.Rational(c).q for c in coeffs))
        if div > MAX_DIVISOR:
            raise ValueError(f"{t}: the divisor must be a positive integer up to 2**30")
        coef, const = _integer_affine(arg * div, str(t))
        return sign, Term("floor", coef, const, div)
    if isinstance(t, sp.Mod):
        x, c = t.args
        if not (c.is_Integer and 1 <= int(c) <= MAX_DIVISOR):
            raise ValueError(f"{t}: the divisor of % must be a positive integer constant up to 2**30, got {c}")
        coef, const = _integer_affine(x, str(t))
        return 1, Term("mod", coef, const, int(c))
    raise ValueError(f"{t} is not a // or % term")


@dataclass(frozen=True)
class ModularAtom:
    """`coef · (q, k, Sq, Sk) + const + Σ mult · term  (>= | == | !=)  0`, all integers."""

    coef: tuple[int, int, int, int]
    const: int
    terms: tuple[tuple[int, Term], ...]
    op: str


def modular_atom(rel: sp.Rel) -> ModularAtom:
    """Normalise a comparison of affine expressions in q, k, Sq, Sk and // % terms like `linear_atom`: the terms are
    generators of their own, scaled with the rest to integer multipliers."""
    diff = sp.expand(rel.lhs - rel.rhs)
    found = sorted(diff.atoms(sp.floor, sp.ceiling, sp.Mod), key=sp.default_sort_key)
    gens = [sp.Dummy(f"t{i}", integer=True) for i in range(len(found))]
    diff = sp.expand(diff.subs(dict(zip(found, gens)), simultaneous=True))
    poly = sp.Poly(diff, *_SYMS, *gens)
    if poly.total_degree() > 1 or (diff.free_symbols - set(_SYMS) - set(gens)):
        raise ValueError(f"{rel} is not linear in q, k, Sq, Sk and its // % terms")
    coeffs = [sp.Rational(poly.coeff_monomial(s)) for s in (*_SYMS, *gens)]
    const = sp.Rational(poly.coeff_monomial(1))
    scale = math.lcm(*(c.q for c in (*coeffs, const)))
    ci, c0 = [int(c * scale) for c in coeffs], int(const * scale)
    terms = []
    for mult, t in zip(ci[4:], found):
        sign, term = modular_term(t)
        if mult:
            terms.append((sign * mult, term))
    lin = tuple(ci[:4])
    neg = tuple(-c for c in lin), tuple((-m, t) for m, t in terms)
    if isinstance(rel, sp.Ge):
        return ModularAtom(lin, c0, tuple(terms), "ge")
    if isinstance(rel, sp.Gt):
        return ModularAtom(lin, c0 - 1, tuple(terms), "ge")
    if isinstance(rel, sp.Le):
        return ModularAtom(neg[0], -c0, neg[1], "ge")
    if isinstance(rel, sp.Lt):
        return ModularAtom(neg[0], -c0 - 1, neg[1], "ge")
    return ModularAtom(lin, c0, tuple(terms), "eq" if isinstance(rel, sp.Eq) else "ne")


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
POSITIONS = ("q", "k")  # the C variables of the query and key positions in `lower_c`'s text


def lower_c(e: sp.Basic, ops: tuple[str, str]) -> str:
    """C text of a boolean combination of affine comparisons; rational coefficients are scaled to integers."""
    if e is sp.true or e is sp.false:
        return str(bool(e)).lower()
    if isinstance(e, (sp.And, sp.Or)):
        joint = ops[0] if isinstance(e, sp.And) else ops[1]
        return joint.join(f"({lower_c(a, ops)})" for a in e.args)
    if isinstance(e, sp.Not):
        return f"!({lower_c(e.args[0], ops)})"
    if has_modular(e):
        return _lower_modular(modular_atom(e))
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


def _affine_c(coef: tuple[int, ...], const: int) -> str:
    """64-bit C text of an integer affine form (LL literals promote the int positions)."""
    terms = [f"{c}LL*{s}" for c, s in zip(coef, ("q", "k", "Sq", "Sk")) if c]
    terms += [f"{const}LL"] if const or not terms else []
    return f"({' + '.join(terms)})"


def _term_c(t: Term) -> str:
    """Branch-free C of a term with Python semantics: C's / and % truncate toward zero, so the remainder is moved
    into [0, div) and the floor quotient is the exact quotient of x minus that remainder."""
    x, d = _affine_c(t.coef, t.const), f"{t.div}LL"
    mod = f"((({x} % {d}) + {d}) % {d})"
    return mod if t.kind == "mod" else f"(({x} - {mod}) / {d})"


def _lower_modular(a: ModularAtom) -> str:
    parts = [_term_c(t) if m == 1 else f"{m}LL*{_term_c(t)}" for m, t in a.terms]
    parts = [*parts, _affine_c(a.coef, a.const)] if any(a.coef) or a.const or not parts else parts
    return f"{' + '.join(parts)} {dict(ge='>=', eq='==', ne='!=')[a.op]} 0"


# ---------------------------------------------------------------------------------------- tile classification


def tile_bounds(n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each tile of `block` positions over [0, n)."""
    lo = np.arange(0, n, block, dtype=np.int64)
    return lo, np.minimum(lo + block - 1, n - 1)


def _classes(e: sp.Basic, ql, qh, kl, kh, Sq: int, Sk: int):
    """Classes of `e` over boxes [ql, qh] x [kl, kh]: numpy arrays or torch tensors (int64) that broadcast to the
    result's shape, e.g. query bounds [..., Tq, 1] and key bounds [..., 1, Tk]."""
    xp = torch if isinstance(ql, torch.Tensor) else np
    if e is sp.true or e is sp.false:
        shape = tuple(xp.broadcast_shapes(ql.shape, kl.shape))
        value = FULL if e is sp.true else EMPTY
        return (
            torch.full(shape, value, dtype=torch.int8, device=ql.device)
            if xp is torch
            else np.full(shape, value, np.int8)
        )
    if isinstance(e, (sp.And, sp.Or)):
        parts = [_classes(a, ql, qh, kl, kh, Sq, Sk) for a in e.args]
        return functools.reduce(xp.minimum if isinstance(e, sp.And) else xp.maximum, parts)
    if isinstance(e, sp.Not):
        return _int8(FULL - _classes(e.args[0], ql, qh, kl, kh, Sq, Sk))
    if has_modular(e):
        m = modular_atom(e)
        return _classify(m, *_modular_range(m, ql, qh, kl, kh, Sq, Sk))
    a = linear_atom(e)
    # A linear form takes its extremes over a box at the box's corners.
    return _classify(a, *_affine_range(a.coef, a.const, ql, qh, kl, kh, Sq, Sk))


def _int8(x):
    return x.to(torch.int8) if isinstance(x, torch.Tensor) else x.astype(np.int8)


def _affine_range(coef, const, ql, qh, kl, kh, Sq: int, Sk: int):
    """Least and greatest values of an integer affine form over each box: at the box's corners."""
    xp = torch if isinstance(ql, torch.Tensor) else np
    cq, ck, csq, csk = coef
    c = const + csq * Sq + csk * Sk
    lo = c + xp.minimum(cq * ql, cq * qh) + xp.minimum(ck * kl, ck * kh)
    hi = c + xp.maximum(cq * ql, cq * qh) + xp.maximum(ck * kl, ck * kh)
    return lo, hi


def _modular_range(a: ModularAtom, ql, qh, kl, kh, Sq: int, Sk: int):
    """Sound bounds of the atom's left side over each box, term by term (interval arithmetic): floor(x / d) is
    monotone in x, so its extremes are those of x; x mod d is x - d·j where the box's x stay in one block
    [d·j, d·j + d), and anywhere in [0, d) otherwise."""
    xp = torch if isinstance(ql, torch.Tensor) else np
    lo, hi = _affine_range(a.coef, a.const, ql, qh, kl, kh, Sq, Sk)
    for m, t in a.terms:
        xl, xh = _affine_range(t.coef, t.const, ql, qh, kl, kh, Sq, Sk)
        bl, bh = xl // t.div, xh // t.div  # floor division, for numpy and torch integers alike
        if t.kind == "floor":
            tl, th = bl, bh
        else:
            one = bl == bh
            tl, th = xp.where(one, xl - t.div * bl, 0), xp.where(one, xh - t.div * bl, t.div - 1)
        lo, hi = (lo + m * tl, hi + m * th) if m > 0 else (lo + m * th, hi + m * tl)
    return lo, hi


def _classify(a, lo, hi):
    """Classes of `L op 0` from bounds lo <= L <= hi on each box (exact when the bounds are attained)."""
    xp = torch if isinstance(lo, torch.Tensor) else np
    if a.op == "ge":
        out = xp.where(lo >= 0, FULL, xp.where(hi < 0, EMPTY, PARTIAL))
    else:
        out = xp.where((lo == 0) & (hi == 0), FULL, xp.where((lo > 0) | (hi < 0), EMPTY, PARTIAL))
        out = FULL - out if a.op == "ne" else out
    return _int8(out)


def box_classes(expr: sp.Basic, ql, qh, kl, kh, Sq: int, Sk: int) -> torch.Tensor:
    """int8 classes of an affine predicate over boxes of positions given as int64 tensors: query bounds
    [..., Tq, 1], key bounds [..., 1, Tk]. Sound for any set of pairs inside each box (a tile of reordered
    tokens), exact per linear atom when every corner of the box is a pair of the set."""
    return _classes(expr, ql, qh, kl, kh, Sq, Sk)


@functools.lru_cache(maxsize=256)
def classes(expr: sp.Basic, bm: int, bn: int, Sq: int, Sk: int) -> np.ndarray:
    """[Tq, Tk] EMPTY / PARTIAL / FULL classes of an affine predicate on bm x bn tiles (clipped to the ends);
    exact per linear atom, sound (interval arithmetic over the // % terms) for the others, combined by Kleene
    logic (which may call a tile PARTIAL that is really full or empty)."""
    ql, qh = tile_bounds(Sq, bm)
    kl, kh = tile_bounds(Sk, bn)
    return _classes(expr, ql[:, None], qh[:, None], kl[None, :], kh[None, :], Sq, Sk)
