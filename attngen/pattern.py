"""Stage 1: the pattern DSL. A Pattern says which query position q may attend to which key position k.

Patterns are immutable, hashable expression trees: leaves (affine predicates over q, k, Sq, Sk; block layouts;
documents; key padding) combined with `&`, `|` and `~`. A pattern prints as the expression that built it and can
produce its dense reference mask (`reference.py` is the oracle built on that)."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import sympy as sp
import torch

from .errors import InputError

# Positions are integers: q (query index), k (key index); Sq, Sk are the sequence lengths.
q, k, Sq, Sk = sp.symbols("q k Sq Sk", integer=True)
SYMBOLS = {"q": q, "k": k, "Sq": Sq, "Sk": Sk}


# Interning: equal patterns share one short string key, which is how the custom op (whose arguments can only be
# tensors and plain values) names a pattern.
_INTERNED: dict[Pattern, str] = {}
_KEYS: dict[str, Pattern] = {}


def by_key(key: str) -> Pattern:
    """The pattern interned under `key` (see `Pattern.key`)."""
    return _KEYS[key]


class Pattern:
    """Base of every pattern node. Subclasses are frozen dataclasses."""

    def __post_init__(self) -> None:
        # A plain string naming this pattern, readable by torch.compile without tracing into the pattern.
        key = _INTERNED.setdefault(self, f"p{len(_INTERNED)}")
        _KEYS.setdefault(key, self)
        object.__setattr__(self, "key", key)

    def __and__(self, other: Pattern) -> Pattern:
        return And(_flatten(And, (self, _check(other))))

    def __or__(self, other: Pattern) -> Pattern:
        return Or(_flatten(Or, (self, _check(other))))

    def __invert__(self) -> Pattern:
        return self.part if isinstance(self, Not) else Not(self)

    def leaves(self) -> tuple[Pattern, ...]:
        return (self,)

    def mask(self, Sq: int, Sk: int, **runtime) -> torch.Tensor:
        """Dense bool mask broadcastable to [B, H, Sq, Sk] (see `reference.mask`)."""
        from .reference import mask

        return mask(self, Sq, Sk, **runtime)

    def draw(self, Sq: int, Sk: int, *, cells: int = 64, **runtime) -> str:
        """The mask (batch 0, head 0) as text: █ all kept, ▒ some, · none (see `reference.draw`)."""
        from .reference import draw

        return draw(self, Sq, Sk, cells=cells, **runtime)

    @property
    def runtime_inputs(self) -> frozenset[str]:
        """Names of the call-time tensors this pattern reads (`document_ids`, `key_lengths`)."""
        return frozenset(n for leaf in self.leaves() for n in leaf._inputs)

    _inputs: tuple[str, ...] = ()
    _prec = 3  # printing precedence: | 1, & 2, leaf / ~ 3

    def _paren(self, outer: int) -> str:
        return f"({self!r})" if self._prec < outer else repr(self)


def _check(other: object) -> Pattern:
    if not isinstance(other, Pattern):
        raise TypeError(f"patterns combine only with patterns, got {type(other).__name__}")
    return other


def _flatten(kind: type, parts: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
    out: list[Pattern] = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return tuple(out)


@dataclass(frozen=True, repr=False)
class And(Pattern):
    parts: tuple[Pattern, ...]
    _prec = 2

    def leaves(self):
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    def __repr__(self):
        return " & ".join(p._paren(3) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Or(Pattern):
    parts: tuple[Pattern, ...]
    _prec = 1

    def leaves(self):
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    def __repr__(self):
        return " | ".join(p._paren(2) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Not(Pattern):
    part: Pattern

    def leaves(self):
        return self.part.leaves()

    def __repr__(self):
        return f"~{self.part._paren(3)}"


# ----------------------------------------------------------------------------------------------- leaves


@dataclass(frozen=True, repr=False)
class Affine(Pattern):
    """A boolean combination of affine (in)equalities over q, k, Sq, Sk."""

    expr: sp.Basic
    text: str = field(compare=False)

    def __repr__(self):
        return self.text

    @cached_property
    def atoms(self) -> tuple[sp.Rel, ...]:
        return tuple(sorted(self.expr.atoms(sp.Rel), key=sp.default_sort_key))


@dataclass(frozen=True, repr=False)
class BlockLayout(Pattern):
    """A boolean grid over (query block, key block), optionally one per query head."""

    data: bytes = field(repr=False)  # uint8, C order, shape `shape`
    shape: tuple[int, ...]  # (nbq, nbk) or (H, nbq, nbk)
    block_size: int
    digest: str = field(compare=False)

    @property
    def per_head(self) -> bool:
        return len(self.shape) == 3

    def tensor(self) -> torch.Tensor:
        t = torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.shape)
        return t if self.per_head else t.unsqueeze(0)

    def __repr__(self):
        dims = "x".join(map(str, self.shape))
        density = sum(self.data) / max(1, len(self.data))
        return f"block_layout(<{dims} {density:.0%} {self.digest[:8]}>, {self.block_size})"


@dataclass(frozen=True, repr=False)
class Documents(Pattern):
    """q and k must carry the same document id (ids are given at call time)."""

    _inputs = ("document_ids",)

    def __repr__(self):
        return "documents()"


@dataclass(frozen=True, repr=False)
class KeyPadding(Pattern):
    """k must be below its batch's key length (lengths are given at call time)."""

    _inputs = ("key_lengths",)

    def __repr__(self):
        return "key_padding()"


# ----------------------------------------------------------------------------------------- constructors


def _int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


_ALIGNS = ("top_left", "bottom_right")


def _diag(align: str) -> sp.Expr:
    """The key index on the query's diagonal: q (top-left) or q + Sk - Sq (bottom-right, for decoding)."""
    if align not in _ALIGNS:
        raise InputError(f"align must be one of {_ALIGNS}, got {align!r}")
    return q if align == "top_left" else q + Sk - Sq


def _suffix(align: str) -> str:
    return "" if align == "top_left" else f"align={align!r}"


def full() -> Pattern:
    """Every query sees every key."""
    return Affine(sp.true, "full()")


def causal(align: str = "top_left") -> Pattern:
    """Query q sees keys k <= q. `align="bottom_right"` puts the last query on the last key (k <= q + Sk - Sq)."""
    return Affine(sp.Le(k, _diag(align)), f"causal({_suffix(align)})")


def sliding_window(window: int, align: str = "top_left") -> Pattern:
    """Causal window of `window` keys ending at the query's diagonal: q - window < k <= q."""
    w = _int("window", window, 1)
    d = _diag(align)
    sep = ", " if align != "top_left" else ""
    return Affine(sp.And(sp.Le(k, d), sp.Gt(k, d - w)), f"sliding_window({w}{sep}{_suffix(align)})")


def local(left: int, right: int) -> Pattern:
    """Two-sided band: q - left <= k <= q + right."""
    a, b = _int("left", left), _int("right", right)
    return Affine(sp.And(sp.Ge(k, q - a), sp.Le(k, q + b)), f"local({a}, {b})")


def prefix_lm(n: int) -> Pattern:
    """Bidirectional over the first n keys, causal after: k < n or k <= q."""
    n = _int("n", n)
    return Affine(sp.Or(sp.Lt(k, n), sp.Le(k, q)), f"prefix_lm({n})")


def global_tokens(n: int) -> Pattern:
    """The first n tokens see and are seen by everyone: k < n or q < n."""
    n = _int("n", n)
    return Affine(sp.Or(sp.Lt(k, n), sp.Lt(q, n)), f"global_tokens({n})")


def documents() -> Pattern:
    """Attend only within a document; pass `document_ids=` to `attention`."""
    return Documents()


def key_padding() -> Pattern:
    """Ignore keys at or past each batch's length; pass `key_lengths=` to `attention`."""
    return KeyPadding()


def block_layout(layout: torch.Tensor, block_size: int) -> Pattern:
    """A bool grid `layout[qb, kb]` (or `[head, qb, kb]`): query block qb sees key block kb."""
    bs = _int("block_size", block_size, 1)
    if not isinstance(layout, torch.Tensor) or layout.dim() not in (2, 3):
        raise InputError("layout must be a 2-d [q_blocks, k_blocks] or 3-d [heads, q_blocks, k_blocks] tensor")
    data = layout.detach().to("cpu", torch.bool).contiguous().to(torch.uint8).numpy().tobytes()
    return BlockLayout(data, tuple(layout.shape), bs, hashlib.sha256(data).hexdigest())


def predicate(expr: str | sp.Basic) -> Pattern:
    """An arbitrary boolean combination of affine (in)equalities in q, k, Sq, Sk, e.g. "k <= q - 4"."""
    e = _parse_predicate(expr) if isinstance(expr, str) else expr
    if not isinstance(e, sp.Basic):
        raise InputError(f"predicate takes a string or a sympy expression, got {type(expr).__name__}")
    if e.free_symbols - set(SYMBOLS.values()):
        raise InputError(f"predicate may use only q, k, Sq, Sk; got {sorted(map(str, e.free_symbols))}")
    _check_affine(e)
    return Affine(e, f"predicate({str(expr)!r})" if isinstance(expr, str) else f"predicate({e})")


def _check_affine(e: sp.Basic) -> None:
    if e in (sp.true, sp.false):
        return
    if isinstance(e, (sp.And, sp.Or, sp.Not)):
        for a in e.args:
            _check_affine(a)
        return
    if not isinstance(e, (sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne)):
        raise InputError(f"predicate must be built from comparisons with & | ~, got {e}")
    diff = sp.expand(e.lhs - e.rhs)
    if not diff.is_polynomial(*SYMBOLS.values()) or sp.Poly(diff, *SYMBOLS.values()).total_degree() > 1:
        raise InputError(f"predicate comparisons must be affine in q, k, Sq, Sk; {e} is not")


_PRED_OPS = {ast.Lt: sp.Lt, ast.LtE: sp.Le, ast.Gt: sp.Gt, ast.GtE: sp.Ge, ast.Eq: sp.Eq, ast.NotEq: sp.Ne}
_ARITH = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_BOOL = {ast.BitAnd: sp.And, ast.BitOr: sp.Or}


def _parse_predicate(text: str) -> sp.Basic:
    """Parse without eval: numbers, q k Sq Sk, + - *, comparisons (chained too), & | ~ and/or/not."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise InputError(f"cannot parse predicate {text!r}: {e.msg}") from None

    def conv(n: ast.AST) -> sp.Basic:
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return sp.Integer(n.value)
        if isinstance(n, ast.Name) and n.id in SYMBOLS:
            return SYMBOLS[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _ARITH:
            return _ARITH[type(n.op)](conv(n.left), conv(n.right))
        if isinstance(n, ast.BinOp) and type(n.op) in _BOOL:
            return _BOOL[type(n.op)](conv(n.left), conv(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -conv(n.operand)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Invert, ast.Not)):
            return sp.Not(conv(n.operand))
        if isinstance(n, ast.BoolOp):
            return (sp.And if isinstance(n.op, ast.And) else sp.Or)(*map(conv, n.values))
        if isinstance(n, ast.Compare):
            terms = [conv(n.left), *map(conv, n.comparators)]
            if not all(type(o) in _PRED_OPS for o in n.ops):
                raise InputError(f"predicate {text!r}: only < <= > >= == != comparisons are allowed")
            return sp.And(*(_PRED_OPS[type(o)](a, b) for o, a, b in zip(n.ops, terms, terms[1:])))
        raise InputError(
            f"predicate {text!r}: {ast.unparse(n)!r} is not allowed "
            "(use integers, q, k, Sq, Sk, + - *, comparisons, & | ~)"
        )

    return conv(tree)


# Names the CLI's safe parser may call.
CONSTRUCTORS = {
    f.__name__: f
    for f in (
        full,
        causal,
        sliding_window,
        local,
        prefix_lm,
        global_tokens,
        documents,
        key_padding,
        predicate,
    )
}
