"""Integer affine atoms over positions (q, k, Sq, Sk): normalisation, exact evaluation, C lowering and tile
classification of the predicates of `attngen.expr`.

Used by the reference (evaluating a predicate on position tensors), the planner (lowering an `Affine` leaf to C) and
the scheduler (classifying tiles of it by interval arithmetic on tile corners)."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from .expr import GENS, MAX_DIVISOR, And, Boolean, Not, Or, Rel, Term, Truth

EMPTY, PARTIAL, FULL = 0, 1, 2
__all__ = ["MAX_DIVISOR", "Term"]  # re-exported: the modular terms an atom carries


@dataclass(frozen=True)
class LinearAtom:
    """`coef · (q, k, Sq, Sk) + const  (>= | == | !=)  0` with integer coefficients."""

    coef: tuple[int, int, int, int]
    const: int
    op: str  # "ge" | "eq" | "ne"


@dataclass(frozen=True)
class ModularAtom:
    """`coef · (q, k, Sq, Sk) + const + Σ mult · term  (>= | == | !=)  0`, all integers."""

    coef: tuple[int, int, int, int]
    const: int
    terms: tuple[tuple[int, Term], ...]
    op: str


def has_modular(e: Boolean) -> bool:
    """Whether a comparison in `e` has a // or % term (so it is not a plain linear atom)."""
    return any(r.diff.terms() for r in e.relations())


def _integer_form(rel: Rel) -> tuple[tuple[int, ...], int, tuple[tuple[int, Term], ...], str]:
    """`rel` as `coef · (q, k, Sq, Sk) + const + Σ mult · term  op  0` over the integers, op in ge / eq / ne:
    fractions are scaled away, and L < 0 is -L - 1 >= 0, L > 0 is L - 1 >= 0."""
    d = rel.diff
    scale = math.lcm(*(c.denominator for _, c in d.parts), d.const.denominator)
    coef = tuple(int(scale * d.coefficient(g)) for g in GENS)
    const = int(scale * d.const)
    terms = tuple((int(scale * c), g) for g, c in d.parts if isinstance(g, Term))
    if rel.op in ("le", "lt"):  # L <= 0 is -L >= 0
        coef, const, terms = tuple(-c for c in coef), -const, tuple((-m, t) for m, t in terms)
    if rel.op in ("gt", "lt"):  # over the integers, L > 0 is L - 1 >= 0
        const -= 1
    return coef, const, terms, rel.op if rel.op in ("eq", "ne") else "ge"


def modular_atom(rel: Rel) -> ModularAtom:
    """Normalise a comparison of affine expressions in q, k, Sq, Sk and // % terms to `L >= 0`, `L == 0` or
    `L != 0` with integer coefficients (the terms are generators of their own)."""
    return ModularAtom(*_integer_form(rel))


def linear_atom(rel: Rel) -> LinearAtom:
    """Normalise an affine comparison (no // or %) over the integers to one of `L >= 0`, `L == 0`, `L != 0`."""
    coef, const, terms, op = _integer_form(rel)
    assert not terms, f"{rel} has // or % terms"
    return LinearAtom(coef, const, op)


def evaluate(e: Boolean, env: dict):
    """The truth of `e` where the position symbols take the values in `env` (by name: integer tensors that
    broadcast, e.g. q as a column and k as a row, or ints; a symbol `e` does not read may be left out). Exact:
    each comparison is evaluated in its integer form, // and % with Python's floor semantics."""
    if isinstance(e, Truth):
        return e.value
    if isinstance(e, (And, Or)):
        parts = [torch.as_tensor(evaluate(a, env)) for a in e.args]
        return functools.reduce(operator.and_ if isinstance(e, And) else operator.or_, parts)
    if isinstance(e, Not):
        return ~torch.as_tensor(evaluate(e.arg, env))
    coef, const, terms, op = _integer_form(e)
    value = _affine_value(coef, const, env)
    for m, t in terms:
        x = _affine_value(t.coef, t.const, env)
        value = value + m * (x // t.div if t.kind == "floor" else x % t.div)  # floor semantics, ints and tensors
    return value >= 0 if op == "ge" else value == 0 if op == "eq" else value != 0


def _affine_value(coef, const: int, env: dict):
    return sum((c * env[g] for c, g in zip(coef, GENS) if c), const)


# ------------------------------------------------------------------------------------------------ lowering

# C operators for & and |: short-circuit where a later operand may load memory that an earlier one guards,
# bitwise (no branches, a select per element) where every operand is a comparison.
GUARDED, BRANCH_FREE = (" && ", " || "), (" & ", " | ")
POSITIONS = ("q", "k")  # the C variables of the query and key positions in `lower_c`'s text


def lower_c(e: Boolean, ops: tuple[str, str]) -> str:
    """C text of a boolean combination of affine comparisons; rational coefficients are scaled to integers."""
    if isinstance(e, Truth):
        return "true" if e.value else "false"
    if isinstance(e, (And, Or)):
        joint = ops[0] if isinstance(e, And) else ops[1]
        return joint.join(f"({lower_c(a, ops)})" for a in e.args)
    if isinstance(e, Not):
        return f"!({lower_c(e.arg, ops)})"
    if e.diff.terms():
        return _lower_modular(modular_atom(e))
    a = linear_atom(e)
    # Positions are 32-bit ints below 2**31: a coefficient beyond ±1 (or a constant beyond 2**30) could overflow int
    # arithmetic, so such an atom is evaluated in 64 bits.
    wide = any(abs(c) > 1 for c in a.coef) or abs(a.const) > 2**30
    numbers = [c for side in (e.lhs, e.rhs) for c in (*dict(side.parts).values(), side.const)]
    if not wide and all(c.denominator == 1 for c in numbers):  # as written: int arithmetic in C
        return str(e)
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


def _classes(e: Boolean, ql, qh, kl, kh, Sq: int, Sk: int):
    """Classes of `e` over boxes [ql, qh] x [kl, kh]: numpy arrays or torch tensors (int64) that broadcast to the
    result's shape, e.g. query bounds [..., Tq, 1] and key bounds [..., 1, Tk]."""
    xp = torch if isinstance(ql, torch.Tensor) else np
    if isinstance(e, Truth):
        shape = tuple(xp.broadcast_shapes(ql.shape, kl.shape))
        value = FULL if e.value else EMPTY
        return (
            torch.full(shape, value, dtype=torch.int8, device=ql.device)
            if xp is torch
            else np.full(shape, value, np.int8)
        )
    if isinstance(e, (And, Or)):
        parts = [_classes(a, ql, qh, kl, kh, Sq, Sk) for a in e.args]
        return functools.reduce(xp.minimum if isinstance(e, And) else xp.maximum, parts)
    if isinstance(e, Not):
        return _int8(FULL - _classes(e.arg, ql, qh, kl, kh, Sq, Sk))
    if e.diff.terms():
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


def box_classes(expr: Boolean, ql, qh, kl, kh, Sq: int, Sk: int) -> torch.Tensor:
    """int8 classes of an affine predicate over boxes of positions given as int64 tensors: query bounds
    [..., Tq, 1], key bounds [..., 1, Tk]. Sound for any set of pairs inside each box (a tile of reordered
    tokens), exact per linear atom when every corner of the box is a pair of the set."""
    return _classes(expr, ql, qh, kl, kh, Sq, Sk)


@functools.lru_cache(maxsize=256)
def classes(expr: Boolean, bm: int, bn: int, Sq: int, Sk: int) -> np.ndarray:
    """[Tq, Tk] EMPTY / PARTIAL / FULL classes of an affine predicate on bm x bn tiles (clipped to the ends);
    exact per linear atom, sound (interval arithmetic over the // % terms) for the others, combined by Kleene
    logic (which may call a tile PARTIAL that is really full or empty)."""
    ql, qh = tile_bounds(Sq, bm)
    kl, kh = tile_bounds(Sk, bn)
    return _classes(expr, ql[:, None], qh[:, None], kl[None, :], kh[None, :], Sq, Sk)
