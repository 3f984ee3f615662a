"""The predicate language of affine patterns: integer affine expressions in q, k, Sq, Sk (and `x // c`, `x % c`
terms of them) compared with < <= > >= == != and combined with & | ~. Values are frozen and hashable, compare by
structure and print as text that `attngen.predicate` parses back. Comparisons with a constant difference fold to
TRUE / FALSE; conjunctions and disjunctions are flattened, deduplicated and ordered, so equal predicates written in
another order are one structure (one kernel). sympy expressions are accepted by `from_sympy`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import InputError

GENS = ("q", "k", "Sq", "Sk")  # query position, key position, query length, key length
MAX_DIVISOR = 2**30


# ------------------------------------------------------------------------------------------------ expressions


@dataclass(frozen=True)
class Term:
    """`floor(x / div)` ("floor") or `x mod div` ("mod", in [0, div)) of an integer affine `x` in q, k, Sq, Sk."""

    kind: str
    coef: tuple[int, int, int, int]
    const: int
    div: int

    def __str__(self) -> str:
        inner = _text(tuple((g, Fraction(c)) for g, c in zip(GENS, self.coef) if c), Fraction(self.const))
        inner = inner if inner in GENS else f"({inner})"
        return f"{inner} {'//' if self.kind == 'floor' else '%'} {self.div}"


def _order(gen: str | Term) -> tuple:
    return (0, GENS.index(gen), "") if isinstance(gen, str) else (1, 0, str(gen))


@dataclass(frozen=True, eq=True)
class Expr:
    """`Σ coef · generator + const` with rational coefficients; a generator is a position symbol or a Term."""

    parts: tuple[tuple[str | Term, Fraction], ...]  # nonzero coefficients, in `_order`
    const: Fraction = Fraction(0)

    @staticmethod
    def of(value: object) -> Expr:
        """An Expr, or a number (int, Fraction, sympy Integer / Rational) as a constant Expr; InputError else."""
        if isinstance(value, Expr):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return Expr((), Fraction(value))
        if isinstance(value, Fraction):
            return Expr((), value)
        if getattr(value, "is_Rational", False):  # a sympy number, met in mixed arithmetic
            return Expr((), Fraction(int(value.p), int(value.q)))
        raise InputError(
            f"predicates are affine in q, k, Sq, Sk with integer or fractional coefficients; got {value!r} "
            f"({type(value).__name__})"
        )

    @property
    def is_constant(self) -> bool:
        return not self.parts

    def gens(self) -> frozenset[str]:
        """The position symbols it reads, inside its terms too."""
        found = set()
        for g, _ in self.parts:
            found |= {g} if isinstance(g, str) else {s for s, c in zip(GENS, g.coef) if c}
        return frozenset(found)

    def terms(self) -> tuple[Term, ...]:
        return tuple(g for g, _ in self.parts if isinstance(g, Term))

    def coefficient(self, gen: str | Term) -> Fraction:
        return dict(self.parts).get(gen, Fraction(0))

    def integer_affine(self, what: str) -> tuple[tuple[int, int, int, int], int]:
        """Integer coefficients (q, k, Sq, Sk) and constant; InputError when it has terms or fractions."""
        if self.terms() or any(c.denominator != 1 for c in (*dict(self.parts).values(), self.const)):
            raise InputError(f"{what}: the operand must be affine in q, k, Sq, Sk with integer coefficients")
        return tuple(int(self.coefficient(g)) for g in GENS), int(self.const)

    def subs(self, values: dict[str, Expr]) -> Expr:
        """Every position symbol named in `values` replaced by its Expr, all at once (in terms too)."""
        out = Expr((), self.const)
        for g, c in self.parts:
            if isinstance(g, str):
                out = out + c * values.get(g, _gen(g))
            else:
                x = sum((n * values.get(s, _gen(s)) for s, n in zip(GENS, g.coef) if n), Expr.of(g.const))
                out = out + c * (x // g.div if g.kind == "floor" else x % g.div)
        return out

    # arithmetic ------------------------------------------------------------------------------------------------

    def __add__(self, other: object) -> Expr:
        o = Expr.of(other)
        merged = dict(self.parts)
        for g, c in o.parts:
            merged[g] = merged.get(g, Fraction(0)) + c
        parts = tuple(sorted(((g, c) for g, c in merged.items() if c), key=lambda gc: _order(gc[0])))
        return Expr(parts, self.const + o.const)

    __radd__ = __add__

    def __neg__(self) -> Expr:
        return Expr(tuple((g, -c) for g, c in self.parts), -self.const)

    def __sub__(self, other: object) -> Expr:
        return self + -Expr.of(other)

    def __rsub__(self, other: object) -> Expr:
        return Expr.of(other) + -self

    def __mul__(self, other: object) -> Expr:
        o = Expr.of(other)
        if not (o.is_constant or self.is_constant):
            raise InputError(f"predicates are affine: ({self}) * ({o}) multiplies two positions")
        c, x = (o.const, self) if o.is_constant else (self.const, o)
        if not c:
            return Expr.of(0)
        return Expr(tuple((g, c * v) for g, v in x.parts), c * x.const)

    __rmul__ = __mul__

    def __truediv__(self, other: object) -> Expr:
        o = Expr.of(other)
        if not o.is_constant or not o.const:
            raise InputError(f"predicates divide only by a nonzero constant, not by {o}")
        return self * (1 / o.const)

    def __floordiv__(self, other: object) -> Expr:
        return _term("floor", self, other)

    def __mod__(self, other: object) -> Expr:
        return _term("mod", self, other)

    def __rfloordiv__(self, other: object) -> Expr:
        return _term("floor", Expr.of(other), self)

    def __rmod__(self, other: object) -> Expr:
        return _term("mod", Expr.of(other), self)

    # comparisons (== and != compare structure, as for any value: use eq() / ne() or a predicate string) ----------

    def __lt__(self, other: object) -> Boolean:
        return relation("lt", self, other)

    def __le__(self, other: object) -> Boolean:
        return relation("le", self, other)

    def __gt__(self, other: object) -> Boolean:
        return relation("gt", self, other)

    def __ge__(self, other: object) -> Boolean:
        return relation("ge", self, other)

    def __str__(self) -> str:
        return _text(self.parts, self.const)

    def __repr__(self) -> str:
        return str(self)


def _gen(name: str) -> Expr:
    return Expr(((name, Fraction(1)),))


def _term(kind: str, x: Expr, divisor: object) -> Expr:
    """`x // c` or `x % c` with Python's semantics, for a positive integer constant c; nested terms are refused."""
    c = Expr.of(divisor)
    sym = "//" if kind == "floor" else "%"
    if not (c.is_constant and c.const.denominator == 1 and 1 <= c.const <= MAX_DIVISOR):
        raise InputError(f"({x}) {sym} ({c}): the divisor must be a positive integer constant up to 2**30")
    if x.terms():
        raise InputError(f"({x}) {sym} {c}: nested // and % are not supported")
    div = int(c.const)
    if kind == "mod" and any(v.denominator != 1 for v in (*dict(x.parts).values(), x.const)):
        raise InputError(f"({x}) % {div}: the operand of % must have integer coefficients")
    if x.is_constant:
        return Expr.of(x.const // div if kind == "floor" else x.const % div)
    # floor(x / c) with fractions in x is floor(s·x / (s·c)) for the common denominator s of x's coefficients.
    scale = math.lcm(*(v.denominator for v in (*dict(x.parts).values(), x.const)))
    coef, const = (scale * x).integer_affine(str(x))
    div *= scale
    if kind == "floor":  # floor(g·a / (g·d)) == floor(a / d): one form for equal terms
        g = math.gcd(*coef, const, div)
        coef, const, div = tuple(v // g for v in coef), const // g, div // g
    if div > MAX_DIVISOR:
        raise InputError(f"({x}) {sym} {c}: the divisor must be a positive integer up to 2**30")
    if div == 1:
        return sum((v * _gen(g) for g, v in zip(GENS, coef) if v), Expr.of(const)) if kind == "floor" else Expr.of(0)
    return Expr(((Term(kind, coef, const, div), Fraction(1)),))


def _number(c: Fraction) -> str:
    return str(c.numerator) if c.denominator == 1 else f"{c.numerator}/{c.denominator}"


def _monomial(name: str, mag: Fraction) -> str:
    body = name if mag.numerator == 1 else f"{mag.numerator}*{name}"
    return body if mag.denominator == 1 else f"{body}/{mag.denominator}"


def _text(parts, const: Fraction) -> str:
    """`2*q - k + Sk/3 + 4`: the parts with their signs, the constant last."""
    signed = [(c < 0, _monomial(str(g), abs(c))) for g, c in parts]
    if const or not signed:
        signed.append((const < 0, _number(abs(const))))
    text = ("-" if signed[0][0] else "") + signed[0][1]
    return text + "".join(f" {'-' if minus else '+'} {body}" for minus, body in signed[1:])


# ------------------------------------------------------------------------------------------------ truth values

_FLIP = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
OPS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_HOLDS = {
    "lt": lambda d: d < 0,
    "le": lambda d: d <= 0,
    "gt": lambda d: d > 0,
    "ge": lambda d: d >= 0,
    "eq": lambda d: d == 0,
    "ne": lambda d: d != 0,
}


class Boolean:
    """Base of truth values: & | ~ build conjunctions, disjunctions and negations."""

    def __and__(self, other: object) -> Boolean:
        return conj(self, _boolean(other))

    def __rand__(self, other: object) -> Boolean:
        return conj(_boolean(other), self)

    def __or__(self, other: object) -> Boolean:
        return disj(self, _boolean(other))

    def __ror__(self, other: object) -> Boolean:
        return disj(_boolean(other), self)

    def __invert__(self) -> Boolean:
        return neg(self)

    def __bool__(self) -> bool:
        raise TypeError(
            f"{self} has no Python truth value: combine comparisons with & | ~ (not and / or / not, nor chained "
            "comparisons such as 0 <= q < 4)"
        )

    def relations(self) -> tuple[Rel, ...]:
        """The comparisons in it, in order, without repeats."""
        raise NotImplementedError

    def gens(self) -> frozenset[str]:
        return frozenset().union(*(r.gens() for r in self.relations()))

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True, repr=False)
class Truth(Boolean):
    value: bool

    def relations(self):
        return ()

    def __str__(self) -> str:
        return str(self.value)  # True / False: what the predicate parser reads


TRUE, FALSE = Truth(True), Truth(False)


@dataclass(frozen=True, repr=False)
class Rel(Boolean):
    """`lhs op rhs`, as written (the C lowering keeps it so); op in OPS."""

    op: str
    lhs: Expr
    rhs: Expr

    @property
    def diff(self) -> Expr:
        return self.lhs - self.rhs

    def relations(self):
        return (self,)

    def gens(self) -> frozenset[str]:
        return self.lhs.gens() | self.rhs.gens()

    def __str__(self) -> str:
        sides = (*self.lhs.parts, *self.rhs.parts)
        if all(c.denominator == 1 for _, c in sides) and self.lhs.const.denominator == self.rhs.const.denominator == 1:
            return f"{self.lhs} {OPS[self.op]} {self.rhs}"
        d = self.diff  # with fractions: as integers (the predicate parser has no true division)
        scale = math.lcm(*(c.denominator for _, c in d.parts), d.const.denominator)
        return f"{scale * d} {OPS[self.op]} 0"


@dataclass(frozen=True, repr=False)
class And(Boolean):
    args: tuple[Boolean, ...]

    def relations(self):
        return tuple(dict.fromkeys(r for a in self.args for r in a.relations()))

    def __str__(self) -> str:
        return " & ".join(f"({a})" for a in self.args)


@dataclass(frozen=True, repr=False)
class Or(Boolean):
    args: tuple[Boolean, ...]

    def relations(self):
        return tuple(dict.fromkeys(r for a in self.args for r in a.relations()))

    def __str__(self) -> str:
        return " | ".join(f"({a})" for a in self.args)


@dataclass(frozen=True, repr=False)
class Not(Boolean):
    arg: Boolean

    def relations(self):
        return self.arg.relations()

    def __str__(self) -> str:
        return f"~({self.arg})"


def _boolean(value: object) -> Boolean:
    if isinstance(value, Boolean):
        return value
    if isinstance(value, bool):
        return TRUE if value else FALSE
    raise InputError(
        f"& | ~ combine comparisons of positions (a pattern takes them through attngen.predicate); got {value!r} "
        f"({type(value).__name__})"
    )


def relation(op: str, lhs: object, rhs: object) -> Boolean:
    """`lhs op rhs`; TRUE or FALSE where the two sides differ by a constant."""
    a, b = Expr.of(lhs), Expr.of(rhs)
    d = a - b
    if d.is_constant:
        return TRUE if _HOLDS[op](d.const) else FALSE
    return Rel(op, a, b)


def eq(lhs: object, rhs: object) -> Boolean:
    return relation("eq", lhs, rhs)


def ne(lhs: object, rhs: object) -> Boolean:
    return relation("ne", lhs, rhs)


def _junction(kind: type, unit: Truth, zero: Truth, args) -> Boolean:
    flat = []
    for a in map(_boolean, args):
        if a == zero:
            return zero
        flat += a.args if isinstance(a, kind) else [] if a == unit else [a]
    unique = sorted(dict.fromkeys(flat), key=str)
    return unit if not unique else unique[0] if len(unique) == 1 else kind(tuple(unique))


def conj(*args: object) -> Boolean:
    """All of `args` (flattened, deduplicated, ordered by their text; TRUE for none)."""
    return _junction(And, TRUE, FALSE, args)


def disj(*args: object) -> Boolean:
    """Any of `args` (flattened, deduplicated, ordered by their text; FALSE for none)."""
    return _junction(Or, FALSE, TRUE, args)


def neg(a: object) -> Boolean:
    """Not `a`: a comparison flips (k < q becomes k >= q), ~~a is a, ~TRUE is FALSE."""
    a = _boolean(a)
    if isinstance(a, Truth):
        return FALSE if a.value else TRUE
    if isinstance(a, Rel):
        return Rel(_FLIP[a.op], a.lhs, a.rhs)
    if isinstance(a, Not):
        return a.arg
    return Not(a)


def map_relations(e: Boolean, f) -> Boolean:
    """`e` with each comparison r replaced by the truth value f(r) (folded and ordered again)."""
    if isinstance(e, Rel):
        return f(e)
    if isinstance(e, (And, Or)):
        return (conj if isinstance(e, And) else disj)(*(map_relations(a, f) for a in e.args))
    if isinstance(e, Not):
        return neg(map_relations(e.arg, f))
    return e


def substitute(e: Boolean, values: dict[str, Expr]) -> Boolean:
    """`e` with the position symbols named in `values` replaced by those expressions, all at once."""
    return map_relations(e, lambda r: relation(r.op, r.lhs.subs(values), r.rhs.subs(values)))


q, k, Sq, Sk = map(_gen, GENS)
SYMBOLS = {"q": q, "k": k, "Sq": Sq, "Sk": Sk}


# ------------------------------------------------------------------------------------------------ from sympy


def is_sympy(value: object) -> bool:
    """Whether `value` is a sympy object (told without importing sympy)."""
    return type(value).__module__.split(".")[0] == "sympy"


def from_sympy(e: object) -> Boolean | Expr:
    """A sympy predicate (relations of affine expressions in symbols named q, k, Sq, Sk, floor / ceiling / Mod of
    them, And / Or / Not, true / false) as a predicate of this language; InputError naming what is not one."""
    import sympy as sp  # only for sympy input

    def conv(x):
        if x is sp.true or x is sp.false:
            return TRUE if x is sp.true else FALSE
        if isinstance(x, sp.Symbol):
            if x.name not in SYMBOLS:
                raise InputError(f"predicate may use only q, k, Sq, Sk; got {x.name}")
            return SYMBOLS[x.name]
        if isinstance(x, sp.Rational):
            return Expr.of(Fraction(int(x.p), int(x.q)))
        if isinstance(x, sp.Add):
            return sum((conv(a) for a in x.args), Expr.of(0))
        if isinstance(x, sp.Mul):
            out = Expr.of(1)
            for a in x.args:
                out = out * conv(a)
            return out
        if isinstance(x, (sp.floor, sp.ceiling)):
            inner = conv(x.args[0])
            if not isinstance(inner, Expr) or inner.terms():
                raise InputError(f"{x}: the operand must be affine in q, k, Sq, Sk (no nested floor, ceiling, Mod)")
            return inner // 1 if isinstance(x, sp.floor) else -((-inner) // 1)
        if isinstance(x, sp.Mod):
            return conv(x.args[0]) % conv(x.args[1])
        if isinstance(x, sp.Not):
            return neg(conv(x.args[0]))
        if isinstance(x, (sp.And, sp.Or)):
            return (conj if isinstance(x, sp.And) else disj)(*map(conv, x.args))
        ops = {sp.StrictLessThan: "lt", sp.LessThan: "le", sp.StrictGreaterThan: "gt", sp.GreaterThan: "ge"}
        ops |= {sp.Equality: "eq", sp.Unequality: "ne"}
        if type(x) in ops:
            sides = [conv(s) for s in x.args]
            if not all(isinstance(s, Expr) for s in sides):
                raise InputError(f"predicate comparisons compare numbers; {x} compares {x.args[0]} and {x.args[1]}")
            return relation(ops[type(x)], *sides)
        raise InputError(
            f"{x} ({type(x).__name__}) is not part of an affine predicate: use integers and fractions, q, k, Sq, Sk, "
            "+ - *, floor / ceiling / Mod by positive integer constants, comparisons, And / Or / Not"
        )

    return conv(e)
