"""The C mask the planner emits, evaluated on the host against the reference mask: lowering bugs without a GPU.

`KernelPlan.keep_c` is pasted into the CUDA kernels as the test of element (q, k) of a partial tile. Here a small,
strict translator parses exactly the C subset the lowering emits (integer and double literals, `true`/`false`, the
free variables b, h, q, k, Sq, Sk and the plan's run-time arguments, `ptr[index]` loads, unary `!` and `-`, binary
`* / + - < <= > >= == != & | && ||` with C precedence and C semantics) and evaluates it vectorised over
b [B,1,1,1], h [1,H,1,1], q [1,1,Sq+PAD,1] and k [1,1,1,Sk+PAD]. Anything else (another operator, literal suffix,
unknown identifier, pointer used as a value) raises, so a change in the lowering cannot pass unnoticed.

Short-circuit `&&` / `||` is evaluated exactly: the right operand is evaluated under an "active" mask (where C
would evaluate it at all); a load whose index is out of bounds, or an integer division by zero, at an active
position raises `CEvalError`. Inactive positions read a clamped index instead (their value never reaches the
result), so the guarded form `q < Sq && k < Sk && (...)` may be evaluated over the padded grid while any load the
guard does not protect (a wrong stride, a missing guard, a load in the branch-free form) is still caught.

The run-time arguments are built by the test from the tensors it passed in (layout grids, document ids, key
lengths), following the binding rules of `attngen.bind` (layout n = n-th distinct layout in order of first
appearance; strides 0 for tensors shared by every batch / head).

Rational coefficients: the lowering scales them to integers and the reference compares integer-scaled differences;
both are checked against an exact oracle of the test's own (two former rounding bugs are kept as regressions)."""

from __future__ import annotations

import functools
import math
import operator
import random
import re
from dataclasses import dataclass, field

import pytest
import sympy as sp
import torch
from fuzzing import _predicate_sympy, _predicate_text  # the shared predicate generator
from fuzzing import _term as _term_text

import attngen as ag
from attngen import keyindex
from attngen.plan import make_plan

PAD = 5  # positions evaluated past Sq and Sk: the guard must drop them all
SEEDS = range(200)
RATIONAL_SEEDS = range(40)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The tensors here are small: torch's thread pool only adds overhead (see conftest.py)."""


def plan_of(pattern):
    return make_plan(pattern, head_dim=64, dtype="fp16", arch="sm_90")


# ------------------------------------------------------------------------------------------- C translator


class CExprError(ValueError):
    """The text uses C the translator does not understand."""


class CEvalError(ValueError):
    """Evaluating the text would be undefined behaviour in C (out-of-bounds load, division by zero)."""


_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<float>\d+\.\d*(?:[eE][-+]?\d+)?)"
    r"|(?P<int>\d+(?:LL)?)"  # LL: a 64-bit literal (the translator computes in 64 bits throughout)
    r"|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<op>&&|\|\||>>|<=|>=|==|!=|[-+*/%<>!&|()\[\],])"
)

# C binary operators of the subset, by precedence (higher binds tighter); all left-associative.
_BINARY = {"||": 1, "&&": 2, "|": 3, "&": 4, "==": 5, "!=": 5, "<": 6, "<=": 6, ">": 6, ">=": 6, ">>": 7}
_BINARY |= {"+": 8, "-": 8, "*": 9, "/": 9, "%": 9}
_CASTS = {("long", "long"): "long long", ("int",): "int"}  # (type) casts of the subset
_COMPARE = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}


def tokenize(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise CExprError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        kind, tok, end = m.lastgroup, m.group(), m.end()
        if kind in ("int", "float") and end < len(text) and (text[end].isalnum() or text[end] in "_."):
            raise CExprError(f"unsupported numeric literal at {pos} in {text!r}")
        if kind == "int" and len(tok.removesuffix("LL")) > 1 and tok[0] == "0":
            raise CExprError(f"octal literal {tok!r} at {pos} in {text!r}")
        if kind != "ws":
            out.append((kind, tok, pos))
        pos = end
    return out


class _Parser:
    """Precedence climbing over the C subset; `kinds` maps each known identifier to "int" or "ptr"."""

    def __init__(self, text: str, kinds: dict[str, str]):
        self.text, self.kinds, self.toks, self.i = text, kinds, tokenize(text), 0

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "", len(self.text))

    def _fail(self, what: str):
        kind, tok, pos = self._peek()
        raise CExprError(f"{what}, got {tok or kind!r} at {pos} in {self.text!r}")

    def _expect(self, tok: str):
        if self._peek()[1] != tok:
            self._fail(f"expected {tok!r}")
        self.i += 1

    def parse(self):
        node = self._binary(1)
        if self._peek()[0] != "end":
            self._fail("expected the end of the expression")
        return node

    def _binary(self, min_prec: int):
        lhs = self._unary()
        while True:
            kind, tok, _ = self._peek()
            if kind != "op" or tok not in _BINARY or _BINARY[tok] < min_prec:
                return lhs
            self.i += 1
            lhs = ("bin", tok, lhs, self._binary(_BINARY[tok] + 1))

    def _unary(self):
        kind, tok, _ = self._peek()
        if kind == "op" and tok in ("!", "-"):
            self.i += 1
            return ("un", tok, self._unary())
        return self._primary()

    def _primary(self):
        kind, tok, _ = self._peek()
        if kind == "int":
            self.i += 1
            return ("int", int(tok.removesuffix("LL")))
        if kind == "float":
            self.i += 1
            return ("float", float(tok))
        if kind == "name":
            if tok in ("true", "false"):
                self.i += 1
                return ("int", int(tok == "true"))
            if tok == "min" and tok not in self.kinds:  # CUDA's integer min(a, b)
                self.i += 1
                self._expect("(")
                a = self._binary(1)
                self._expect(",")
                b = self._binary(1)
                self._expect(")")
                return ("min", a, b)
            if tok not in self.kinds:
                self._fail("unknown identifier")
            self.i += 1
            if self._peek()[1] == "[":
                if self.kinds[tok] != "ptr":
                    self._fail(f"{tok} is not a pointer")
                self.i += 1
                index = self._binary(1)
                self._expect("]")
                return ("load", tok, index)
            if self.kinds[tok] == "ptr":
                self._fail(f"pointer {tok} used as a value")
            return ("var", tok)
        if tok == "(":
            self.i += 1
            for words, ctype in _CASTS.items():  # a cast: (long long) x, (int) x
                if tuple(t for _, t, _ in self.toks[self.i : self.i + len(words)]) == words:
                    self.i += len(words)
                    self._expect(")")
                    return ("cast", ctype, self._unary())
            node = self._binary(1)
            self._expect(")")
            return node
        self._fail("expected a literal, an identifier or '('")


def parse_c(text: str, kinds: dict[str, str]):
    return _Parser(text, kinds).parse()


def _hazards(node, out: set) -> bool:
    """Collect the ids of the nodes that may be undefined in C (a load, an integer division) in `out`."""
    kids = [n for n in node[1:] if isinstance(n, tuple)]
    hazard = node[0] == "load" or (node[0] == "bin" and node[1] in ("/", "%"))
    hazard = any([_hazards(n, out) for n in kids]) or hazard
    if hazard:
        out.add(id(node))
    return hazard


def _int(v: torch.Tensor) -> torch.Tensor:
    """C's integer promotion of a truth value (kept as bool for speed) to int."""
    return v.to(torch.int64) if v.dtype == torch.bool else v


def _eval(node, env: dict, active: torch.Tensor, hazards: set) -> torch.Tensor:
    """Value of `node`: a bool tensor (a C truth value, 0 or 1), int64 (int) or float64 (double) tensor. `active`
    is where C evaluates the node at all (short-circuit); only hazardous nodes look at it."""
    tag = node[0]
    if tag == "int":
        return torch.tensor(node[1], dtype=torch.int64)
    if tag == "float":
        return torch.tensor(node[1], dtype=torch.float64)
    if tag == "var":
        return env[node[1]]
    if tag == "load":
        data = env[node[1]]
        index = _int(_eval(node[2], env, active, hazards))
        if index.dtype.is_floating_point:
            raise CExprError(f"{node[1]}[...] indexed by a floating-point value")
        oob = ((index < 0) | (index >= data.numel())) & active
        if bool(oob.any()):
            where = [int(i) for i in torch.broadcast_tensors(oob, index)[0].nonzero()[0]]
            raise CEvalError(f"out-of-bounds load from {node[1]} ({data.numel()} elements) at [b, h, q, k] = {where}")
        if data.numel() == 0:
            return torch.zeros_like(index)
        return data[index.clamp(0, data.numel() - 1)]
    if tag == "min":
        a, b = (_int(_eval(n, env, active, hazards)) for n in node[1:])
        return torch.minimum(a, b)
    if tag == "cast":
        v = _int(_eval(node[2], env, active, hazards))
        if v.dtype.is_floating_point:
            raise CExprError("a cast of a floating-point value")
        return v if node[1] == "long long" else (v + 2**31) % 2**32 - 2**31  # (int): the low 32 bits, signed
    if tag == "un":
        v = _eval(node[2], env, active, hazards)
        if node[1] == "!":
            return ~v if v.dtype == torch.bool else v == 0
        return -_int(v)
    op, left, right = node[1], node[2], node[3]
    if op in ("&&", "||"):
        lhs = _eval(left, env, active, hazards)
        lhs = lhs if lhs.dtype == torch.bool else lhs != 0
        # The right operand runs only where the left one did not decide; where that matters, narrow `active`.
        narrowed = (active & (lhs if op == "&&" else ~lhs)) if id(right) in hazards else active
        rhs = _eval(right, env, narrowed, hazards)
        rhs = rhs if rhs.dtype == torch.bool else rhs != 0
        return (lhs & rhs) if op == "&&" else (lhs | rhs)
    a, b = _eval(left, env, active, hazards), _eval(right, env, active, hazards)
    if op in ("&", "|"):
        if a.dtype.is_floating_point or b.dtype.is_floating_point:
            raise CExprError(f"bitwise {op} on a floating-point operand")
        if a.dtype != b.dtype:
            a, b = _int(a), _int(b)
        return (a & b) if op == "&" else (a | b)
    a, b = _int(a), _int(b)
    if a.dtype.is_floating_point or b.dtype.is_floating_point:  # usual arithmetic conversions: to double
        a, b = a.to(torch.float64), b.to(torch.float64)
    if op in _COMPARE:
        return _COMPARE[op](a, b)
    if op == ">>":
        if a.dtype.is_floating_point or b.dtype.is_floating_point or bool((((b < 0) | (b > 31)) & active).any()):
            raise CExprError(">> of a floating-point value, or by a count outside [0, 31]")
        return a >> b  # arithmetic, as C's on the 32-bit words the kernels load
    if op == "/":
        if a.dtype.is_floating_point:
            return a / b
        if bool(((b == 0) & active).any()):
            raise CEvalError("integer division by zero")
        return torch.div(a, torch.where(b == 0, 1, b), rounding_mode="trunc")  # C: truncate toward zero
    if op == "%":
        if a.dtype.is_floating_point:
            raise CExprError("% on a floating-point operand")
        if bool(((b == 0) & active).any()):
            raise CEvalError("integer remainder by zero")
        return torch.fmod(a, torch.where(b == 0, 1, b))  # C: the sign of the dividend (a == (a / b) * b + a % b)
    return {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](a, b)


def eval_c(text: str, ints: dict[str, object], ptrs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Evaluate C boolean `text`; `ints` maps names to ints or int64 tensors (broadcast together), `ptrs` names to
    1-d tensors. Returns the bool tensor of the broadcast shape."""
    ptrs = {n: t.reshape(-1).to(torch.int64) for n, t in (ptrs or {}).items()}
    ints = {n: torch.as_tensor(v, dtype=torch.int64) for n, v in ints.items()}
    tree = parse_c(text, {**dict.fromkeys(ints, "int"), **dict.fromkeys(ptrs, "ptr")})
    shape = torch.broadcast_shapes(*(v.shape for v in ints.values()))
    hazards: set[int] = set()
    _hazards(tree, hazards)
    out = _eval(tree, {**ints, **ptrs}, torch.ones(shape, dtype=torch.bool), hazards)
    if out.dtype.is_floating_point:
        raise CExprError(f"{text!r} is not a boolean (int) expression")
    return (out if out.dtype == torch.bool else out != 0).expand(shape)


# --------------------------------------------------------------------------------------- cases and checks


@dataclass
class Case:
    seed: object
    pattern: ag.Pattern
    Sq: int
    Sk: int
    B: int = 1
    H: int = 1
    layouts: dict = field(default_factory=dict)  # block_layout leaf -> the bool grid passed to ag.block_layout
    document_ids: object = None
    key_lengths: torch.Tensor | None = None
    blocks: torch.Tensor | None = None  # a topk_blocks leaf's selection, bool [B, H, nbq, nbk]
    key_indices: torch.Tensor | None = None  # a key_indices() leaf's lists, [B, H or fewer heads, Sq, n]

    def describe(self) -> str:
        return f"seed={self.seed} pattern={self.pattern!r} Sq={self.Sq} Sk={self.Sk} B={self.B} H={self.H}"

    def runtime(self) -> dict:
        rt = {}
        if self.document_ids is not None:
            rt["document_ids"] = self.document_ids
        if self.key_lengths is not None:
            rt["key_lengths"] = self.key_lengths
        if self.blocks is not None:
            rt["selected_blocks"] = self.blocks
        if self.key_indices is not None:  # a KV head's lists serve its query heads
            rt["key_indices"] = self.key_indices.repeat_interleave(self.H // self.key_indices.shape[1], dim=1)
        return rt


def layout(case: Case, grid: torch.Tensor, block_size: int) -> ag.Pattern:
    """ag.block_layout, remembering the grid it was given."""
    leaf = ag.block_layout(grid, block_size)
    case.layouts.setdefault(leaf, grid)
    return leaf


def _doc_pair(document_ids):
    """(query ids, key ids) as given: one tensor serves both when Sq == Sk."""
    if isinstance(document_ids, (tuple, list)):
        return document_ids
    return document_ids, document_ids


def runtime_values(case: Case) -> dict[str, tuple[str, object]]:
    """Every run-time argument the test can bind: name -> ("ptr", 1-d tensor) or ("int", value)."""
    out: dict[str, tuple[str, object]] = {}
    order = list(dict.fromkeys(leaf for leaf in case.pattern.leaves() if leaf in case.layouts))
    for n, leaf in enumerate(order):
        grid = case.layouts[leaf]
        grid = grid if grid.dim() >= 3 else grid.unsqueeze(0)  # [H or 1, nbq, nbk] or [B or 1, H or 1, nbq, nbk]
        out[f"layout{n}"] = ("ptr", grid.to(torch.uint8).contiguous().reshape(-1))
        if grid.dim() == 4:
            out[f"layout{n}_sb"] = ("int", grid[0].numel() if grid.shape[0] > 1 else 0)
        out[f"layout{n}_sh"] = ("int", grid.shape[-2] * grid.shape[-1] if grid.shape[-3] > 1 else 0)
        out[f"layout{n}_nk"] = ("int", grid.shape[-1])
    if case.document_ids is not None:
        for name, ids in zip(("qdoc", "kdoc"), _doc_pair(case.document_ids)):
            out[name] = ("ptr", ids.to(torch.int32).contiguous().reshape(-1))
            out[f"{name}_sb"] = ("int", ids.shape[-1] if ids.dim() == 2 and ids.shape[0] > 1 else 0)
        if not isinstance(case.document_ids, (tuple, list)):  # positions within documents, for in_document()
            within = document_offsets_oracle(case.document_ids)
            for name in ("qoff", "koff"):
                out[name] = ("ptr", within.to(torch.int32).contiguous().reshape(-1))
                out[f"{name}_sb"] = ("int", within.shape[-1] if within.shape[0] > 1 else 0)
    if case.key_lengths is not None:
        out["key_len"] = ("ptr", case.key_lengths.to(torch.int32).reshape(-1))
    if case.key_indices is not None:
        bits = keyindex.bits(case.key_indices, case.Sk, "cpu")
        _B, H, Sq, W = bits.shape
        out["kbits"] = ("ptr", bits.reshape(-1))
        out |= {"kbits_sb": ("int", H * Sq * W), "kbits_sh": ("int", Sq * W), "kbits_w": ("int", W)}
        out["kbits_div"] = ("int", case.H // H)
    if case.blocks is not None:
        _B, H, nbq, nbk = case.blocks.shape
        out["blocks"] = ("ptr", case.blocks.to(torch.uint8).contiguous().reshape(-1))
        out |= {"blocks_sb": ("int", H * nbq * nbk), "blocks_sh": ("int", nbq * nbk), "blocks_nk": ("int", nbk)}
    return out


def document_offsets_oracle(ids: torch.Tensor) -> torch.Tensor:
    """[B', S]: how many earlier tokens of the row carry each token's id, counted one token at a time."""
    rows = ids if ids.dim() == 2 else ids.unsqueeze(0)
    out = torch.zeros(rows.shape, dtype=torch.int64)
    for r, row in enumerate(rows.tolist()):
        seen: dict[int, int] = {}
        for i, d in enumerate(row):
            out[r, i] = seen.get(d, 0)
            seen[d] = seen.get(d, 0) + 1
    return out


def evaluate_keep(case: Case, plan, text: str | None = None) -> torch.Tensor:
    """`text` (default plan.keep_c) over [B, H, Sq + PAD, Sk + PAD], binding exactly plan.runtime_args."""
    text = plan.keep_c if text is None else text
    values = runtime_values(case)
    ints: dict[str, object] = {
        "b": torch.arange(case.B).view(-1, 1, 1, 1),
        "h": torch.arange(case.H).view(1, -1, 1, 1),
        "q": torch.arange(case.Sq + PAD).view(1, 1, -1, 1),
        "k": torch.arange(case.Sk + PAD).view(1, 1, 1, -1),
        "Sq": case.Sq,
        "Sk": case.Sk,
    }
    ptrs: dict[str, torch.Tensor] = {}
    for arg in plan.runtime_args:
        assert arg.name in values, f"{case.describe()}: the test cannot bind run-time argument {arg}"
        kind, value = values[arg.name]
        assert (kind == "ptr") == ("*" in arg.ctype), f"{case.describe()}: {arg} is bound as a {kind}"
        (ptrs if kind == "ptr" else ints)[arg.name] = value
    return eval_c(text, ints, ptrs)


def reference(case: Case) -> torch.Tensor:
    ref = case.pattern.mask(case.Sq, case.Sk, **case.runtime())
    return ref.expand(case.B, case.H, case.Sq, case.Sk)


def _first(diff: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in diff.nonzero()[0])


def check(case: Case, plan=None, text: str | None = None, expected: torch.Tensor | None = None) -> None:
    """Assert that the C text (default keep_c) keeps exactly `expected` (default the reference mask) inside
    [0, Sq) x [0, Sk) and nothing outside."""
    plan = plan_of(case.pattern) if plan is None else plan
    text = plan.keep_c if text is None else text
    try:
        got = evaluate_keep(case, plan, text)
    except (CExprError, CEvalError) as e:
        raise AssertionError(f"{case.describe()}\n  C: {text}\n  {type(e).__name__}: {e}") from e
    want = reference(case) if expected is None else expected.expand(case.B, case.H, case.Sq, case.Sk)
    inside = got[..., : case.Sq, : case.Sk]
    if not torch.equal(inside, want):
        at = _first(inside != want)
        raise AssertionError(
            f"{case.describe()}\n  C: {text}\n  first difference at (b, h, q, k) = {at}: "
            f"C keeps {bool(inside[at])}, expected {bool(want[at])}"
        )
    outside = got.clone()
    outside[..., : case.Sq, : case.Sk] = False
    if outside.any():
        at = _first(outside)
        raise AssertionError(f"{case.describe()}\n  C: {text}\n  keeps (b, h, q, k) = {at}, past Sq or Sk")


# ------------------------------------------------------------------------------------ random patterns


_EDGE_LENGTHS = (1, 2, 3, 63, 64, 65, 127, 128, 129, 255, 256, 299, 300)


def _length(rng: random.Random) -> int:
    return rng.choice(_EDGE_LENGTHS) if rng.random() < 0.3 else rng.randint(1, 300)


def _small(rng: random.Random, hi: int = 320, lo: int = 0) -> int:
    return rng.choice([lo, lo + 1, rng.randint(lo, hi), rng.randint(lo, 20)])


_SYMPY_REL = (sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne)
Q, K, SQ, SK = sp.symbols("q k Sq Sk", integer=True)  # predicates given as sympy: converted by attngen
_SYMPY_NAMES = {"q": Q, "k": K, "Sq": SQ, "Sk": SK}


def _term_sympy(rng: random.Random) -> sp.Expr:
    return sp.sympify(_term_text(rng), locals=_SYMPY_NAMES)


def _align(rng: random.Random) -> str:
    return rng.choice(["top_left", "bottom_right"])


def _random_layout(rng: random.Random, gen: torch.Generator, case: Case) -> ag.Pattern:
    if case.layouts and rng.random() < 0.3:  # the same layout again (built anew: equal grids share a slot)
        leaf, grid = rng.choice(list(case.layouts.items()))
        return layout(case, grid.clone(), leaf.block_size)
    bs = rng.choice([1, 2, 3, 7, 16, 32, 48, 64, 100, 128, 256, rng.randint(1, 300)])
    nbq = math.ceil(case.Sq / bs) + rng.choice([0, 0, 0, 1, 2])
    nbk = math.ceil(case.Sk / bs) + rng.choice([0, 0, 0, 1, 2])
    # shared, per head, 3-d with one head, or per batch element (each with its heads or one)
    heads = rng.choice([(), (), (case.H,), (1,), (case.B, case.H), (case.B, 1), (1, case.H)])
    density = rng.choice([0.0, 1.0, 0.2, 0.5, 0.8])
    grid = torch.rand((*heads, nbq, nbk), generator=gen) < density
    return layout(case, grid, bs)


def _within_document(rng: random.Random, depth: int = 1) -> ag.Pattern:
    """An affine pattern that reads q and k only: what in_document() takes."""
    if depth and rng.random() < 0.5:
        a, b = _within_document(rng, depth - 1), _within_document(rng, depth - 1)
        return rng.choice([a & b, a | b, ~a])
    c = rng.choice([1, 2, 3, 16, 64, rng.randint(1, 100)])
    return rng.choice(
        [
            lambda: ag.causal(),
            lambda: ag.sliding_window(_small(rng, 80, lo=1)),
            lambda: ag.local(_small(rng, 40), _small(rng, 40)),
            lambda: ag.prefix_lm(_small(rng, 40)),
            lambda: ag.global_tokens(_small(rng, 40)),
            lambda: ag.predicate(f"q // {c} == k // {c}"),
            lambda: ag.predicate(f"(q - k) % {c} == 0"),
        ]
    )()


def _random_leaf(rng: random.Random, gen: torch.Generator, case: Case, uses: set) -> ag.Pattern:
    kind = rng.choices(
        ["full", "causal", "window", "local", "prefix", "global", "text", "sympy", "docs", "keylen", "layout"],
        weights=[1, 2, 2, 2, 1, 1, 4, 3, 2, 2, 3],
    )[0]
    if kind == "docs" and case.Sq == case.Sk and rng.random() < 0.5:  # positions within documents: one sequence
        uses.add("in_document")
        return ag.in_document(_within_document(rng))
    if kind == "full":
        return ag.full()
    if kind == "causal":
        return ag.causal(align=_align(rng))
    if kind == "window":
        return ag.sliding_window(_small(rng, lo=1), align=_align(rng))
    if kind == "local":
        return ag.local(_small(rng), _small(rng))
    if kind == "prefix":
        return ag.prefix_lm(_small(rng))
    if kind == "global":
        return ag.global_tokens(_small(rng))
    if kind == "text":
        return ag.predicate(_predicate_text(rng, 2))
    if kind == "sympy":
        return ag.predicate(_predicate_sympy(rng, 2))
    if kind == "docs":
        uses.add("docs")
        return ag.documents()
    if kind == "keylen":
        uses.add("keylen")
        return ag.key_padding()
    return _random_layout(rng, gen, case)


def _random_tree(rng, gen, case, uses, depth: int) -> ag.Pattern:
    if depth == 0 or rng.random() < 0.4:
        return _random_leaf(rng, gen, case, uses)
    r = rng.random()
    if r < 0.15:
        return ~_random_tree(rng, gen, case, uses, depth - 1)
    parts = [_random_tree(rng, gen, case, uses, depth - 1) for _ in range(rng.choice([2, 2, 3]))]
    return functools.reduce(operator.and_ if r < 0.6 else operator.or_, parts)


def _doc_ids(rng: random.Random, gen: torch.Generator, B: int, S: int, batched: bool) -> torch.Tensor:
    shape = (B, S) if batched else (S,)
    if rng.random() < 0.6:  # sorted segments, as packed sequences
        starts = torch.rand(shape, generator=gen) < rng.choice([0.01, 0.05, 0.3])
        return starts.to(torch.int64).cumsum(-1)
    return torch.randint(0, rng.choice([1, 2, 4]), shape, generator=gen)


@functools.cache
def random_case(seed: int) -> Case:
    """A random case (cached: do not change it), drawn again (up to 3 times) while its mask is all kept or all
    dropped."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(3):
        case = _draw_case(seed, rng, gen)
        kept = reference(case)
        if 0 < int(kept.sum()) < kept.numel():
            break
    return case


def _draw_case(seed: int, rng: random.Random, gen: torch.Generator) -> Case:
    Sq = _length(rng)
    Sk = Sq if rng.random() < 0.3 else _length(rng)
    case = Case(seed, ag.full(), Sq, Sk, B=rng.randint(1, 3), H=rng.randint(1, 4))
    uses: set[str] = set()
    case.pattern = _random_tree(rng, gen, case, uses, rng.randint(1, 3))
    if "docs" in uses or "in_document" in uses:
        form = rng.choice(["one", "one_batched", "pair"]) if Sq == Sk else "pair"
        form = form if "in_document" not in uses else rng.choice(["one", "one_batched"])
        if form == "pair":
            case.document_ids = (
                _doc_ids(rng, gen, case.B, Sq, rng.random() < 0.5),
                _doc_ids(rng, gen, case.B, Sk, rng.random() < 0.5),
            )
        else:
            case.document_ids = _doc_ids(rng, gen, case.B, Sq, form == "one_batched")
    if "keylen" in uses:
        case.key_lengths = torch.tensor([rng.choice([0, Sk, rng.randint(0, Sk)]) for _ in range(case.B)])
    return case


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_c_matches_reference(seed):
    check(random_case(seed))


_SPELLINGS = "causal sliding_window local prefix_lm global_tokens predicate documents key_padding block_layout full"
_SPELLINGS += " in_document"
_SPELLINGS = (*_SPELLINGS.split(), "~", "|", "&", "bottom_right", "==", "!=", "Sk - Sq", " and ", " or ", "not ")


def test_random_cases_cover_every_kind():
    """The generator reaches every leaf kind, both C forms, several layouts, and the edge parameters."""
    seen: set[str] = set()
    for seed in SEEDS:
        case = random_case(seed)
        plan = plan_of(case.pattern)
        seen.add("branch_free" if plan.branch_free else "guarded")
        seen |= {word for word in _SPELLINGS if word in repr(case.pattern)}
        seen |= {"layout1"} & {a.name for a in plan.runtime_args}
        if case.Sq != case.Sk:
            seen.add("Sq != Sk")
            seen |= {"doc pair"} if isinstance(case.document_ids, tuple) else set()
        if isinstance(case.document_ids, torch.Tensor):
            seen.add(f"doc ids {case.document_ids.dim()}-d")
        if case.key_lengths is not None:
            seen |= {"key_len 0"} if (case.key_lengths == 0).any() else set()
            seen |= {"key_len Sk"} if (case.key_lengths == case.Sk).any() else set()
        for grid in case.layouts.values():
            seen.add("per-head layout" if grid.dim() == 3 and grid.shape[0] > 1 else f"{grid.dim()}-d layout")
            seen |= {"per-batch layout"} if grid.dim() == 4 and grid.shape[0] > 1 else set()
    expect = {*_SPELLINGS, "branch_free", "guarded", "layout1", "Sq != Sk", "doc pair", "doc ids 1-d", "doc ids 2-d"}
    expect |= {"key_len 0", "key_len Sk", "per-head layout", "2-d layout", "3-d layout", "4-d layout"}
    expect |= {"per-batch layout"}
    assert expect <= seen, f"never generated: {sorted(expect - seen)}"


# ----------------------------------------------------------------------------------- hand-written cases


def test_dense_pattern_lowers_to_true():
    plan = plan_of(ag.full())
    assert plan.mask_c == "true" and plan.runtime_args == ()
    check(Case("full", ag.full(), 5, 9))


def test_affine_patterns_are_branch_free():
    pat = ag.causal() & ag.sliding_window(3, align="bottom_right") | ~ag.global_tokens(1)
    plan = plan_of(pat)
    assert plan.branch_free and plan.runtime_args == ()
    toks = {tok for kind, tok, _ in tokenize(plan.keep_c) if kind != "int"}
    assert not toks & {"&&", "||", "[", "]"}, plan.keep_c  # bitwise, no loads
    assert {"q", "k", "Sq", "Sk"} <= toks <= {*_BINARY, "!", "(", ")", "q", "k", "Sq", "Sk", "true", "false"}
    check(Case("hand", pat, 17, 40))


@pytest.mark.parametrize(
    "pattern,text",
    [
        (ag.causal(), "k <= q"),
        (ag.causal(align="bottom_right"), "k <= q - Sq + Sk"),
        (ag.key_padding(), "k < key_len[b]"),
        (ag.documents(), "qdoc[b * qdoc_sb + q] == kdoc[b * kdoc_sb + k]"),
        (
            ag.block_layout(torch.ones(2, 2, dtype=torch.bool), 16),
            "layout0[h * layout0_sh + (q / 16) * layout0_nk + k / 16] != 0",
        ),
    ],
    ids=["causal", "causal_bottom_right", "key_padding", "documents", "block_layout"],
)
def test_leaf_text_and_guard(pattern, text):
    """The C text of single leaves, and its guard: bitwise when branch-free, short-circuit before loads."""
    plan = plan_of(pattern)
    assert plan.mask_c == text
    guard = "(q < Sq) & (k < Sk) & (" if plan.branch_free else "q < Sq && k < Sk && ("
    assert plan.keep_c == f"{guard}{text})"


def test_causal_mask_values():
    plan = plan_of(ag.causal())
    got = eval_c(plan.keep_c, {"q": torch.arange(6).view(-1, 1), "k": torch.arange(6).view(1, -1), "Sq": 5, "Sk": 5})
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:5, :5] = torch.ones(5, 5).tril().bool()
    assert torch.equal(got, want), plan.keep_c


def test_documents_are_guarded_and_strided():
    pat = ag.causal() & ag.documents()
    plan = plan_of(pat)
    assert not plan.branch_free
    assert [a.name for a in plan.runtime_args] == ["qdoc", "qdoc_sb", "kdoc", "kdoc_sb"]
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2, 2]])
    check(Case("docs", pat, 7, 7, B=2, H=3, document_ids=ids))  # batched ids: stride S
    check(Case("docs", pat, 7, 7, B=2, document_ids=ids[1]))  # shared ids: stride 0
    qd, kd = torch.tensor([0, 1, 1]), torch.tensor([[0, 0, 1, 1, 2], [1, 1, 1, 1, 1]])
    check(Case("docs", pat, 3, 5, B=2, document_ids=(qd, kd)))  # decoding: pair of different lengths
    # Without its guard the mask would read past the ids for q >= Sq (the translator sees it).
    with pytest.raises(AssertionError, match="out-of-bounds load from qdoc"):
        check(Case("docs", pat, 3, 5, B=2, document_ids=(qd, kd)), plan, plan.mask_c)


def test_key_padding_reads_one_length_per_batch():
    pat = ag.key_padding() | ag.global_tokens(1)
    plan = plan_of(pat)
    assert [a.name for a in plan.runtime_args] == ["key_len"]
    check(Case("keylen", pat, 4, 6, B=3, key_lengths=torch.tensor([0, 6, 2])))


def test_layouts_numbered_by_first_appearance_and_shared():
    case = Case("layouts", ag.full(), 70, 50, B=1, H=2)
    g0 = torch.tensor([[True, False], [False, True]])
    g1 = torch.tensor([[[True, True, False, True]] * 3, [[False, True, True, False]] * 3])  # per head [2, 3, 4]
    a, b, a_again = layout(case, g0, 40), layout(case, g1, 25), layout(case, g0.clone(), 40)
    case.pattern = (a | b) & ~(a_again & ag.causal())
    plan = plan_of(case.pattern)
    names = [a.name for a in plan.runtime_args]
    assert names == ["layout0", "layout0_sh", "layout0_nk", "layout1", "layout1_sh", "layout1_nk"]
    assert "layout2" not in plan.keep_c and "/ 40" in plan.keep_c and "/ 25" in plan.keep_c
    check(case, plan)
    # Swapping the two layouts' arguments is noticed.
    swapped = plan.keep_c.replace("layout0", "TMP").replace("layout1", "layout0").replace("TMP", "layout1")
    with pytest.raises(AssertionError):
        check(case, plan, swapped)


# --------------------------------------------------------------------------------------- translator self-test


@pytest.mark.parametrize(
    "text",
    [
        "q % 2.0",  # % is in the subset now (lowered // and %), but not on doubles
        "q ? k : 0",
        "~q",
        "q << 1",
        "q ^ k",
        "+q",
        "foo < q",
        "1.5f < q",
        "0x10 < q",
        "010 < q",
        "10UL < q",  # only the LL suffix (64-bit literals, for wide affine atoms) is emitted
        "(q < k",
        "q < k)",
        "q <",
        "q k",
        "q[0]",
        "qdoc < 1",
        "qdoc[q",
        "q = k",
        "q < k;",
        "q >> ",
        "min(q)",
        "max(q, k)",
        "(long) q",
        "q, k",
        "1 ^ 2",
        "(1.0/2.0)*q | q",
    ],
)
def test_translator_rejects_unknown_syntax(text):
    with pytest.raises(CExprError):
        eval_c(text, {"q": torch.arange(3).view(-1, 1), "k": torch.arange(3).view(1, -1)}, {"qdoc": torch.zeros(3)})


@pytest.mark.parametrize(
    "text,value",
    [
        ("1 + 2 * 3 == 7", True),
        ("(7 >> 1) == 3", True),
        ("(-8 >> 1) == -4", True),
        ("1 + 4 >> 1 == 2", True),  # >> below + and above ==
        ("min(3, 5 - 4) == 1", True),
        ("(long long)3 * 4 == 12", True),
        ("(int)3 == 3", True),
        ("(1 + 2) * 3 == 9", True),
        ("-7 / 2 == -3", True),  # truncation toward zero, not floor
        ("7 / -2 == -3", True),
        ("7 / 2 * 2 == 6", True),
        ("10 - 4 - 3 == 3", True),  # left-associative
        ("1 < 2 == 1", True),  # relational binds tighter than ==
        ("3 > 2 > 1", False),  # (3 > 2) > 1 is 1 > 1
        ("1 | 2 & 0", True),  # & binds tighter than |
        ("2 & 1", False),  # bitwise, not logical
        ("2 && 1", True),
        ("0 || 0 && 1", False),
        ("1 || 0 && 0", True),  # && binds tighter than ||
        ("!0 == 1", True),
        ("!(2 == 2)", False),
        ("-2 * -3 == 6", True),
        ("- -1 == 1", True),
        ("true & !false", True),
        ("(1.0/5.0)*1 <= 1 - 4.0/5.0*1", False),  # doubles round as in C (0.2 > 0.19999999999999996)
        ("1.0/2.0 == 0.5", True),
        ("1/2 == 0", True),
    ],
)
def test_translator_semantics(text, value):
    assert bool(eval_c(text, {})) is value


def test_translator_short_circuits_loads():
    ids = {"qdoc": torch.tensor([7, 8, 9])}
    q = {"q": torch.arange(6)}
    assert eval_c("q < 3 && qdoc[q] == 8", q, ids).tolist() == [False, True, False, False, False, False]
    assert eval_c("q >= 3 || qdoc[q] != 8", q, ids).tolist() == [True, False, True, True, True, True]
    with pytest.raises(CEvalError, match="out-of-bounds"):
        eval_c("(q < 3) & (qdoc[q] == 8)", q, ids)  # bitwise & evaluates both sides
    with pytest.raises(CEvalError, match="out-of-bounds"):
        eval_c("q < 4 && qdoc[q] == 8", q, ids)
    with pytest.raises(CEvalError, match="division by zero"):
        eval_c("q / (q - 2) == 0", q)


def test_mutations_of_keep_c_are_caught():
    """The comparison can fail: small edits of a correct keep_c are reported."""
    case = Case("mutation", ag.causal() & ag.documents() | ag.local(0, 2), 40, 40, B=2, H=1)
    case.document_ids = torch.arange(80).view(2, 40) // 13
    plan = plan_of(case.pattern)
    check(case, plan)
    assert "<=" in plan.keep_c
    with pytest.raises(AssertionError, match=r"first difference at \(b, h, q, k\) = \(0, 0, "):
        check(case, plan, plan.keep_c.replace("<=", "<"))
    with pytest.raises(AssertionError, match="past Sq or Sk"):  # the guard dropped
        check(Case("mutation", ag.causal(), 9, 7), None, plan_of(ag.causal()).mask_c)
    with pytest.raises(AssertionError, match="out-of-bounds"):  # a wrong batch stride
        check(case, plan, plan.keep_c.replace("b * qdoc_sb", "b * (qdoc_sb + 1)"))
    with pytest.raises(AssertionError, match="unknown identifier"):
        check(case, plan, plan.keep_c.replace("kdoc_sb", "kdoc_stride"))
    with pytest.raises(AssertionError, match=r"seed=mutation pattern=.* Sq=40 Sk=40"):
        check(case, plan, plan.keep_c.replace("k <= q", "k <= q + 1"))


# ------------------------------------------------------------------------------ rational coefficients


def exact_mask(e: sp.Basic, Sq: int, Sk: int) -> torch.Tensor:
    """[Sq, Sk] truth of a sympy affine predicate, in exact integer arithmetic (independent of attngen)."""
    env = {Q: torch.arange(Sq).view(-1, 1), K: torch.arange(Sk).view(1, -1), SQ: Sq, SK: Sk}

    def ev(e):
        if e is sp.true or e is sp.false:
            return torch.tensor(bool(e))
        if isinstance(e, (sp.And, sp.Or)):
            return functools.reduce(operator.and_ if isinstance(e, sp.And) else operator.or_, map(ev, e.args))
        if isinstance(e, sp.Not):
            return ~ev(e.args[0])
        diff = sp.expand(e.lhs - e.rhs)
        poly = sp.Poly(diff, Q, K, SQ, SK)
        scale = math.lcm(*(sp.Rational(c).q for c in poly.coeffs()))
        value = int(poly.coeff_monomial(1) * scale) + sum(
            int(poly.coeff_monomial(s) * scale) * env[s] for s in (Q, K, SQ, SK)
        )
        rel = {sp.Lt: operator.lt, sp.Le: operator.le, sp.Gt: operator.gt, sp.Ge: operator.ge}
        rel |= {sp.Eq: operator.eq, sp.Ne: operator.ne}
        return torch.as_tensor(rel[type(e)](value, 0))

    return ev(e).expand(Sq, Sk)


def _rational_atom(rng: random.Random) -> sp.Basic:
    """A comparison whose difference has a non-integer coefficient: lhs (a/d)·X, a/d not an integer."""
    d = rng.randint(2, 9)
    a = rng.choice([n for n in range(-12, 13) if n % d])
    rhs = _term_sympy(rng) + sp.Rational(rng.randint(-20, 20), rng.randint(1, 6))
    return rng.choice(_SYMPY_REL)(sp.Rational(a, d) * rng.choice([Q, K, SK]), rhs)


def _rational_predicate(rng: random.Random, depth: int) -> sp.Basic:
    if depth == 0 or rng.random() < 0.4:
        return _rational_atom(rng) if rng.random() < 0.8 else rng.choice(_SYMPY_REL)(K, _term_sympy(rng))
    a, b = _rational_predicate(rng, depth - 1), _rational_predicate(rng, depth - 1)
    return rng.choice([lambda: a & b, lambda: a | b, lambda: ~a])()


@pytest.mark.parametrize("seed", RATIONAL_SEEDS)
def test_rational_coefficients_lower_exactly(seed):
    """Rational coefficients are scaled to integers in C: exact, checked against the test's exact oracle (the
    reference is checked against the same oracle below)."""
    rng = random.Random(10_000 + seed)
    e = _rational_predicate(rng, 2)
    Sq, Sk = _length(rng), _length(rng)
    case = Case(seed, ag.predicate(e), Sq, Sk)
    check(case, expected=exact_mask(e, Sq, Sk))


q_, k_ = Q, K


# Regression: comparisons whose sides have rational coefficients (their difference integer ones) were printed with
# sympy's ccode, i.e. double arithmetic such as (1.0/5.0)*q <= k - 4.0/5.0*q, which rounds wrongly at q = k = 1.
@pytest.mark.parametrize(
    "e",
    [
        sp.Le(q_ / 5, k_ - 4 * q_ / 5),  # q <= k
        sp.Eq(q_ / 3, k_ - 2 * q_ / 3),  # q == k
        sp.Lt(q_ / 7, k_ - 6 * q_ / 7) | sp.Gt(k_, 250),  # q < k or k > 250
    ],
    ids=["le_fifths", "eq_thirds", "lt_sevenths_or"],
)
def test_rational_sides_with_integer_difference(e):
    check(Case(str(e), ag.predicate(e), 300, 300), expected=exact_mask(e, 300, 300))


_FLOAT_REFERENCE = [sp.Eq(2 * k_ / 7, q_ + 16), sp.Ne(2 * q_ / 3, k_ + sp.Rational(5, 3)), sp.Eq(7 * q_ / 6, k_ + 5)]


@pytest.mark.parametrize("e", _FLOAT_REFERENCE, ids=str)
def test_integer_scaled_rationals_are_exact(e):
    check(Case(str(e), ag.predicate(e), 300, 300), expected=exact_mask(e, 300, 300))


# Regression: the reference evaluated rational coefficients in float32 (a Python float times an int64 tensor), so
# Eq(2*k/7, q + 16) missed (q, k) = (6, 77); it now compares integer-scaled differences.
@pytest.mark.parametrize("e", _FLOAT_REFERENCE, ids=str)
def test_reference_rational_coefficients_are_exact(e):
    case = Case(str(e), ag.predicate(e), 300, 300)
    check(case)  # the C against the reference
    assert torch.equal(ag.predicate(e).mask(300, 300)[0, 0], exact_mask(e, 300, 300))
