"""Stage 1: the pattern DSL. A Pattern says which query position q may attend to which key position k.

Patterns are immutable, hashable expression trees: leaves (affine predicates over q, k, Sq, Sk; block layouts;
documents; key padding; selection rules) combined with `&`, `|` and `~`. A pattern prints as the expression that
built it and defines its dense mask here (`reference.py` builds the attention oracle on that). A pattern's
*structure* (`Pattern.structure`) is what kernels are compiled for: the same tree with every data-carrying leaf (a
block layout's grid) replaced by a numbered slot, so new layouts of the same shape of pattern reuse one kernel."""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import operator
from dataclasses import dataclass, field

import torch

from . import affine, blocktopk, scoremod, tokentopk, tracing
from . import expr as X
from .errors import InputError
from .expr import SYMBOLS, Sk, Sq, k, q  # positions are integers: query q, key k; Sq, Sk the lengths
from .tracing import built_when_traced

# Structures are named by short strings, which is how the custom op (whose arguments can only be tensors and plain
# values) and torch.compile (which reads `pattern.key` as a constant) refer to them. Only structures are named, and
# they carry no tensor data, so this grows with the number of distinct shapes of pattern a program uses.
_NAMES: dict[Pattern, str] = {}
_STRUCTURES: dict[str, Pattern] = {}
_SETTLED = ("_leaves", "_structure", "key", "range_atoms")  # attributes `Pattern._settle` computes


def by_key(key: str) -> Pattern:
    """The structure named `key` (see `Pattern.key`)."""
    return _STRUCTURES[key]


class Pattern(tracing.Numbered):
    """Base of every pattern node. Subclasses are frozen dataclasses."""

    def __post_init__(self) -> None:
        tracing.register(self)
        self._settle()

    def __setstate__(self, state: dict) -> None:
        """Unpickled (or copied): the structure is named in this process's registry, not the pickling one's, where
        the same name may stand for another structure."""
        super().__setstate__({name: value for name, value in state.items() if name not in _SETTLED})
        self._settle()

    def _settle(self) -> None:
        """What every call reads, computed once when the pattern is made (outside any compiled region): attention()
        reads them on every call, and under torch.compile they are plain constants."""
        object.__setattr__(self, "_leaves", self._gather_leaves())
        structure = self._restructure({})
        name = _NAMES.get(structure)
        if name is None:
            name = _NAMES.setdefault(structure, f"s{len(_NAMES)}")
            _STRUCTURES[name] = structure
        object.__setattr__(self, "_structure", structure)
        object.__setattr__(self, "key", name)
        # The key-range form of a reordering pattern (sympy analysis), likewise made once and read as a constant.
        object.__setattr__(self, "range_atoms", _range_atoms(self) if self.reorders else None)

    @built_when_traced
    def __and__(self, other: Pattern) -> Pattern:
        return And(_flatten(And, (self, _check(other))))

    @built_when_traced
    def __or__(self, other: Pattern) -> Pattern:
        return Or(_flatten(Or, (self, _check(other))))

    @built_when_traced
    def __invert__(self) -> Pattern:
        if any(isinstance(leaf, BY_SCORE) for leaf in self.leaves()):
            raise InputError(
                f"~ cannot apply to {self!r}: a selection rule keeps keys by their scores, and its complement is "
                "not supported; write `A & rule` to let the rule choose among the keys A allows"
            )
        return self.part if isinstance(self, Not) else Not(self)

    def leaves(self) -> tuple[Pattern, ...]:
        """The leaves, left to right (with repeats)."""
        return self._leaves

    def _gather_leaves(self) -> tuple[Pattern, ...]:
        return (self,)

    def mask(self, Sq: int, Sk: int, **runtime) -> torch.Tensor:
        """Dense bool mask broadcastable to [B, H, Sq, Sk]: the positions this pattern allows. Takes the call-time
        tensors (`document_ids=`, `key_lengths=`) and `device=`. Selection rules are score-dependent: their
        positions are given by `attngen.reference`, not here."""
        Sq, Sk = _int("Sq", Sq), _int("Sk", Sk)
        return dense_mask(self, Sq, Sk, **runtime)

    def draw(self, Sq: int, Sk: int, *, cells: int = 64, **runtime) -> str:
        """The mask (batch 0, head 0) as text, at most `cells` characters a side: █ all kept, ▒ some, · none."""
        Sq, Sk, cells = _int("Sq", Sq, 1), _int("Sk", Sk, 1), _int("cells", cells, 1)
        kept = dense_mask(self, Sq, Sk, **runtime)[0, 0].float()
        kept = torch.nn.functional.adaptive_avg_pool2d(kept[None], (min(cells, Sq), min(cells, Sk)))[0]
        return "\n".join("".join("█" if f == 1 else "·" if f == 0 else "▒" for f in row) for row in kept.tolist())

    def plot(self, Sq: int, Sk: int, path=None, *, cells: int = 256, batch: int = 0, head: int = 0, **runtime):
        """The mask of `batch`, `head` as a matplotlib Figure (queries down, keys across, titled with this pattern),
        saved to `path` when given; larger masks are shrunk to `cells` cells a side. Takes `draw`'s call-time
        tensors. Needs matplotlib: `pip install "attngen[plot]"`."""
        from .plot import plot_mask  # matplotlib is optional: loaded only to draw

        Sq, Sk = _int("Sq", Sq, 1), _int("Sk", Sk, 1)
        mask = dense_mask(self, Sq, Sk, **runtime)
        return plot_mask(mask, repr(self), path, cells=cells, batch=batch, head=head)

    def structure(self) -> Pattern:
        """This pattern with every block layout replaced by a `LayoutSlot` (numbered by first appearance; equal
        layouts share a slot): what a kernel depends on. `layouts()` lists the replaced layouts in slot order."""
        return self._structure

    def layouts(self) -> tuple[BlockLayout, ...]:
        """The distinct block layouts of this pattern, in slot order (see `structure`)."""
        return tuple(dict.fromkeys(leaf for leaf in self.leaves() if isinstance(leaf, BlockLayout)))

    def _restructure(self, slots: dict) -> Pattern:
        """This node with layouts replaced by slots (numbered in `slots`); itself when it holds no layout."""
        return self

    @property
    def reorders(self) -> bool:
        """Whether this pattern has buckets or keep masks, and so runs on its tokens sorted by bucket."""
        return any(isinstance(leaf, REORDERING) for leaf in self.leaves())

    @property
    def runtime_inputs(self) -> frozenset[str]:
        """Names of the call-time tensors this pattern reads (`document_ids`, `key_lengths`, a rule's inputs)."""
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

    def _gather_leaves(self):
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    def _restructure(self, slots):
        parts = tuple(p._restructure(slots) for p in self.parts)
        return self if all(a is b for a, b in zip(parts, self.parts)) else And(parts)

    def __repr__(self):
        return " & ".join(p._paren(3) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Or(Pattern):
    parts: tuple[Pattern, ...]
    _prec = 1

    def _gather_leaves(self):
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    def _restructure(self, slots):
        parts = tuple(p._restructure(slots) for p in self.parts)
        return self if all(a is b for a, b in zip(parts, self.parts)) else Or(parts)

    def __repr__(self):
        return " | ".join(p._paren(2) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Not(Pattern):
    part: Pattern

    def _gather_leaves(self):
        return self.part.leaves()

    def _restructure(self, slots):
        part = self.part._restructure(slots)
        return self if part is self.part else Not(part)

    def __repr__(self):
        return f"~{self.part._paren(3)}"


# ----------------------------------------------------------------------------------------------- leaves


@dataclass(frozen=True, repr=False)
class Affine(Pattern):
    """A boolean combination of affine (in)equalities over q, k, Sq, Sk."""

    expr: X.Boolean
    text: str = field(compare=False)

    def __repr__(self):
        return self.text


@dataclass(frozen=True, repr=False)
class BlockLayout(Pattern):
    """A boolean grid over (query block, key block), optionally one per query head, optionally one per batch
    element."""

    data: bytes = field(repr=False)  # uint8, C order, shape `shape`
    shape: tuple[int, ...]  # (nbq, nbk), (H, nbq, nbk) or (B, H or 1, nbq, nbk)
    block_size: int
    digest: str = field(compare=False)
    # The same bytes as uint8 on the CPU: [H or 1, nbq, nbk], or [B, H or 1, nbq, nbk] per batch element.
    grid: torch.Tensor = field(compare=False, repr=False)

    @property
    def per_head(self) -> bool:
        return len(self.shape) >= 3

    @property
    def per_batch(self) -> bool:
        return len(self.shape) == 4

    def tensor(self) -> torch.Tensor:
        """The grid, uint8 [H or 1, nbq, nbk] (or [B, H or 1, nbq, nbk]) on the CPU (what kernels read as
        `layout{n}`)."""
        return self.grid

    def _restructure(self, slots):
        if self not in slots:
            slots[self] = LayoutSlot(len(slots), self.block_size, self.per_head, self.per_batch)
        return slots[self]

    def __repr__(self):
        dims = "x".join(map(str, self.shape))
        density = sum(self.data) / max(1, len(self.data))
        return f"block_layout(<{dims} {density:.0%} {self.digest[:8]}>, {self.block_size})"


@dataclass(frozen=True, repr=False)
class LayoutSlot(Pattern):
    """Structure of a block layout: its place among the pattern's layouts and its block size. Kernels read the
    grid itself at run time (`layout{index}` arguments), so one kernel serves every grid."""

    index: int
    block_size: int
    per_head: bool
    per_batch: bool = False  # a grid per batch element: the kernels step over its batch stride too

    def __repr__(self):
        heads = ("per batch, " if self.per_batch else "") + ("per head, " if self.per_head else "")
        return f"block_layout(<layout {self.index}: {heads}run-time grid>, {self.block_size})"


@dataclass(frozen=True, repr=False)
class Selector(Pattern):
    """Base of the selection rules: leaves that keep keys by their scores (or by data computed at call time), among
    the keys the rest of the pattern allows. Supported compositions: a rule alone (among all keys) and `A & rule`
    with a rule-free A (`attngen.select.split_selection`). A rule's module under `attngen/select/` subclasses this
    and implements the four methods below; its template under `templates/select/` implements the kernel hook."""

    def selection(self):
        """The frozen `attngen.select.Selection` this rule plans into (knobs, template, run-time arguments)."""
        raise NotImplementedError(f"{type(self).__name__} must define selection()")

    def reference_keep(self, scores: torch.Tensor, allowed: torch.Tensor, **runtime) -> torch.Tensor:
        """The rule's exact semantics: bool [B, H, Sq, Sk] of the keys it keeps, given fp32/fp64 scores
        s = scale·QKᵀ [B, H, Sq, Sk] and the positions the rest of the pattern allows (broadcastable)."""
        raise NotImplementedError(f"{type(self).__name__} must define reference_keep()")

    def prepare(self, q: torch.Tensor, k: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
        """Call-time pre-passes on the GPU (a scorer, hashing, sorting, ...): the tensors the kernels read, in the
        order of the rule's run-time arguments. `inputs` holds the call-time tensors named in `_inputs`."""
        return ()

    def bind(self, tensors: tuple[torch.Tensor, ...]) -> list:
        """Kernel argument values (numpy scalars) for the rule's run-time arguments, from `prepare`'s tensors."""
        return []

    def tile_keep(self, bm: int, bn: int, Sq: int, Sk: int, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The rule's share of the schedule, built on the GPU from `prepare`'s tensors: bool [LB, LH, Tq, Tk] of the
        bm x bn tiles (query tiles down, key tiles across; LB, LH 1 or the batch / query heads) in which it may keep
        a key, or None where it may keep keys anywhere. Tiles it rules out are never visited by any kernel."""
        return None


@dataclass(frozen=True, repr=False)
class Documents(Pattern):
    """q and k must carry the same document id (ids are given at call time)."""

    _inputs = ("document_ids",)

    def __repr__(self):
        return "documents()"


@dataclass(frozen=True, repr=False)
class InDocument(Pattern):
    """q and k carry the same document id, and `expr` (affine in q, k: no Sq, Sk) holds of their positions within
    that document, 0 at its first token (`document_offsets`); ids are given at call time."""

    expr: X.Boolean
    text: str = field(compare=False)
    _inputs = ("document_ids",)

    def __repr__(self):
        return f"in_document({self.text})"


@dataclass(frozen=True, repr=False)
class KeyPadding(Pattern):
    """k must be below its batch's key length (lengths are given at call time)."""

    _inputs = ("key_lengths",)

    def __repr__(self):
        return "key_padding()"


@dataclass(frozen=True, repr=False)
class Buckets(Pattern):
    """q and k must share a bucket: query_buckets[b, h, q] == key_buckets[b, h // group, k] (ids given at call time,
    any int32 values). A pattern with buckets or keep masks runs on its tokens sorted by bucket (`attngen.reorder`);
    every other leaf still applies to the original positions."""

    _inputs = ("query_buckets", "key_buckets")

    def __repr__(self):
        return "buckets()"


@dataclass(frozen=True, repr=False)
class LSH(Pattern):
    """Buckets from q and k by angular LSH (`attngen.hashing.lsh_buckets`): computed per call, so its structure is
    `buckets()` and one kernel serves every number of buckets and seed."""

    n: int
    seed: int | None

    def _restructure(self, slots):
        return Buckets()

    def __repr__(self):
        return f"lsh({self.n})" if self.seed is None else f"lsh({self.n}, seed={self.seed})"


@dataclass(frozen=True, repr=False)
class Keep(Pattern):
    """Only kept queries and keys take part: query_keep[b, h, q] and key_keep[b, h // group, k] (bool, given at call
    time). A dropped query's row has no key: its output is 0 and its LSE -inf."""

    _inputs = ("query_keep", "key_keep")

    def __repr__(self):
        return "keep()"


@dataclass(frozen=True, repr=False)
class TopkBlocks(Pattern):
    """Block top-k (MoBA / NSA style): per (batch, query head, query block of `block` rows), the `k` key blocks with
    the largest mean(q of the block) · mean(k of the block), among the key blocks where the leaf's &-context (the
    conjunction of its siblings under every enclosing &: `context_of`) allows some pair; ties to the lower block
    index. Selected per call on the GPU (`attngen.blockselect`), so its structure is `SelectedBlocks`."""

    k: int
    block: int

    def _restructure(self, slots):
        return SelectedBlocks(self.block)

    def __repr__(self):
        return f"topk_blocks({self.k}, block={self.block})"


@dataclass(frozen=True, repr=False)
class SelectedBlocks(Pattern):
    """Structure of `topk_blocks`: query block qb of batch b, query head h sees key block kb where the call's
    selection grid (uint8 [B, Hq, nbq, nbk], the kernels' `blocks` argument) holds 1."""

    block: int

    def __repr__(self):
        return f"topk_blocks(<run-time selection>, block={self.block})"


@dataclass(frozen=True, repr=False)
class KeyIndices(Pattern):
    """Query row i sees the keys listed in key_indices[b, h or h // group, i, :] (given at call time; entries
    outside [0, Sk) ignored, duplicates counted once): FlashMLA's and DeepSeek's sparse attention, a selection the
    caller brings. `attngen.keyindex` turns the lists into the bits the kernels read."""

    _inputs = ("key_indices",)

    @property
    def gathered(self) -> bool:
        """Whether `rest & this` runs on the gather kernels (`plan.Gather`)."""
        return True

    def __repr__(self):
        return "key_indices()"


@dataclass(frozen=True)
class LowRank(tracing.Numbered):
    """DSA's scorer: s̃(i, j) = (qᵢ P)·(kⱼ P) with P = `proj` given at call time, [D, r] or one per query head
    [Hq, D, r] (a key is projected with its query head's P)."""

    inputs = ("proj",)

    def __post_init__(self):
        tracing.register(self)

    def __repr__(self):
        return "lowrank()"


@dataclass(frozen=True)
class Indexer(tracing.Numbered):
    """DeepSeek's lightning indexer: s̃(i, j) = Σₕ index_w[b, i, h] · ReLU(index_q[b, i, h] · index_k[b, j]) with
    index_q [B, Sq, Hi, Di], index_k [B, Sk, Di], index_w [B, Sq, Hi] given at call time: one selection per token,
    shared by every query head."""

    inputs = ("index_q", "index_k", "index_w")

    def __post_init__(self):
        tracing.register(self)

    def __repr__(self):
        return "indexer()"


@dataclass(frozen=True, repr=False)
class TopkTokens(Pattern):
    """Top-k by token: per row (and per query head, unless the scorer is shared by the heads), the `k` keys with the
    largest score among the keys the leaf's &-context allows (`context_of`), ties to the lower key index; the exact
    scores, or a scorer's (`lowrank()`, `indexer()`). With `t` (`threshold`), the candidates whose softmax
    probability over the candidates' scores is at least t, and always the row's maximum (the lowest key among equal
    maxima); at most 1/t of them, so `k` bounds their lists. Selected per call (`attngen.tokenselect`) into
    key-index lists, so its structure is `SelectedKeys`."""

    k: int
    scorer: LowRank | Indexer | None = None
    t: float | None = None

    @property
    def _inputs(self) -> tuple[str, ...]:
        return self.scorer.inputs if self.scorer is not None else ()

    @property
    def shared(self) -> bool:
        """One selection per token for every query head (the indexer's), else one per query head."""
        return isinstance(self.scorer, Indexer)

    def _restructure(self, slots):
        return SelectedKeys(self.shared)

    def __repr__(self):
        head = f"topk({self.k}" if self.t is None else f"threshold({self.t!r}"
        return head + (f", scorer={self.scorer!r})" if self.scorer is not None else ")")


@dataclass(frozen=True, repr=False)
class SelectedKeys(KeyIndices):
    """Structure of `topk`: the call's choice as key-index lists (`key_indices`' tensors). Lists shared by the heads
    run on the gather kernels; one list per query head, where heads share no key, on the flash kernels with the
    lists as bits (a gather would fill one row of the tensor cores' 16)."""

    shared: bool = True

    @property
    def gathered(self) -> bool:
        return self.shared

    def __repr__(self):
        return f"topk(<run-time selection>, {'shared by the heads' if self.shared else 'per head'})"


BY_SCORE = (Selector, TopkBlocks, TopkTokens)  # leaves that keep keys by their scores: ~ on them is refused


def topk_leaf(pat: Pattern) -> TopkBlocks | SelectedBlocks | None:
    """The pattern's block top-k leaf (or its structure), or None."""
    found = [leaf for leaf in pat.leaves() if isinstance(leaf, (TopkBlocks, SelectedBlocks))]
    return found[0] if found else None


def context_of(pat: Pattern, leaf: Pattern) -> Pattern:
    """The &-context of `leaf` in `pat`: the conjunction of its siblings under every enclosing & (for
    `causal() & (topk_blocks(8, block=64) | sliding_window(512))`, `causal()`); `full()` where there is none. The
    siblings under | add keys and do not restrict it."""
    parts: list[Pattern] = []
    node = pat
    while node is not leaf:
        branch = (
            next(p for p in node.parts if any(x is leaf for x in p.leaves())) if isinstance(node, (And, Or)) else None
        )
        if branch is None:
            raise InputError(f"{leaf!r} cannot appear under ~ in {pat!r}")
        if isinstance(node, And):
            parts += [p for p in node.parts if p is not branch]
        node = branch
    return full() if not parts else parts[0] if len(parts) == 1 else And(tuple(parts))


REORDERING = (Buckets, LSH, Keep)  # leaves whose patterns run on tokens sorted by bucket, dropped tokens last


def linear_atoms(pat: Pattern) -> tuple[affine.LinearAtom, ...] | None:
    """An affine leaf's predicate as the conjunction of linear atoms `L >= 0` / `L == 0` it is, or None when it is
    not one (| ~ != // % in it)."""
    if not isinstance(pat, Affine):
        return None
    expr = pat.expr
    if expr == X.TRUE:
        return ()
    rels = expr.args if isinstance(expr, X.And) else (expr,)
    if not all(isinstance(r, X.Rel) and r.op != "ne" and not r.diff.terms() for r in rels):
        return None
    return tuple(affine.linear_atom(r) for r in rels)


def _range_atoms(pat: Pattern) -> tuple[affine.LinearAtom, ...] | None:
    """The linear atoms of a reordering pattern whose every query keeps one range of sorted keys (see
    `keeps_key_ranges`), or None when it does not have that form."""
    parts = pat.parts if isinstance(pat, And) else (pat,)
    if sum(isinstance(p, (Buckets, LSH)) for p in set(parts)) > 1:
        return None
    atoms: list[affine.LinearAtom] = []
    for p in parts:
        if isinstance(p, (Buckets, LSH, Keep, KeyPadding)):
            continue
        found = linear_atoms(p)
        if found is None:
            return None
        atoms += found
    return tuple(atoms)


def keeps_key_ranges(pat: Pattern) -> bool:
    """Whether, on its tokens sorted by (dropped, bucket, position), every query row of a reordering pattern keeps
    one contiguous range of keys: the pattern is a conjunction of at most one bucket leaf, keep(), key_padding() and
    affine leaves that are conjunctions of linear (in)equalities (causal, windows, local, "k < q", ...). Each of
    those allows, per query, one interval of key positions, and the keys of one bucket are sorted by position.
    `pat.range_atoms` holds those inequalities (made when the pattern is built)."""
    return pat.range_atoms is not None


# ----------------------------------------------------------------------------------------- constructors


# Sequence positions are 32-bit ints in the kernels: a size or offset up to 2**30 keeps every position ± offset
# within them (q + right, k - left, ...) and covers any sequence that fits in GPU memory.
MAX_INT = 2**30


def _int(name: str, value: object, minimum: int = 0, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        # A huge int is described, not printed (repr() refuses ints of more than 4300 digits).
        huge = isinstance(value, int) and value.bit_length() > 128
        shown = f"an integer of {value.bit_length()} bits" if huge else repr(value)
        raise InputError(
            f"{name} must be an integer from {minimum} to {maximum} (2**30; positions are 32-bit integers in the "
            f"kernels), got {shown}"
        )
    return value


_ALIGNS = ("top_left", "bottom_right")


def _diag(align: str) -> X.Expr:
    """The key index on the query's diagonal: q (top-left) or q + Sk - Sq (bottom-right, for decoding)."""
    if align not in _ALIGNS:
        raise InputError(f"align must be one of {_ALIGNS}, got {align!r}")
    return q if align == "top_left" else q + Sk - Sq


def _suffix(align: str) -> str:
    return "" if align == "top_left" else f"align={align!r}"


@built_when_traced
def full() -> Pattern:
    """Every query sees every key."""
    return Affine(X.TRUE, "full()")


@built_when_traced
def causal(align: str = "top_left") -> Pattern:
    """Query q sees keys k <= q. `align="bottom_right"` puts the last query on the last key (k <= q + Sk - Sq)."""
    return Affine(k <= _diag(align), f"causal({_suffix(align)})")


@built_when_traced
def sliding_window(window: int, align: str = "top_left") -> Pattern:
    """Causal window of `window` keys ending at the query's diagonal: q - window < k <= q."""
    w = _int("window", window, 1)
    d = _diag(align)
    sep = ", " if align != "top_left" else ""
    return Affine((k <= d) & (k > d - w), f"sliding_window({w}{sep}{_suffix(align)})")


@built_when_traced
def local(left: int, right: int) -> Pattern:
    """Two-sided band: q - left <= k <= q + right."""
    a, b = _int("left", left), _int("right", right)
    return Affine((k >= q - a) & (k <= q + b), f"local({a}, {b})")


@built_when_traced
def prefix_lm(n: int) -> Pattern:
    """Bidirectional over the first n keys, causal after: k < n or k <= q."""
    n = _int("n", n)
    return Affine((k < n) | (k <= q), f"prefix_lm({n})")


@built_when_traced
def global_tokens(n: int) -> Pattern:
    """The first n tokens see and are seen by everyone: k < n or q < n."""
    n = _int("n", n)
    return Affine((k < n) | (q < n), f"global_tokens({n})")


@built_when_traced
def documents() -> Pattern:
    """Attend only within a document; pass `document_ids=` to `attention`."""
    return Documents()


@built_when_traced
def in_document(pattern: Pattern) -> Pattern:
    """`pattern` within each document, on positions counted from the document's first token: a query attends only
    to keys of its own document, where `pattern` allows their positions inside it. `in_document(prefix_lm(16))` is a
    prefix LM per document, `in_document(global_tokens(4))` gives each document's first 4 tokens to all of it,
    `in_document(predicate("q // 64 == k // 64"))` chunks each document from its start. `pattern` is affine (causal,
    windows, local, prefix_lm, global_tokens, predicate; with & | ~) and does not read Sq or Sk. Pass
    `document_ids=` as one [B, S] or [S] tensor (Sq == Sk): a document is the tokens carrying its id, and a token's
    position in it counts the earlier ones; or, decoding with a cache, a (query, key) pair of ids with
    `document_positions=` (query, key) giving those positions."""
    expr = _in_document_expr(_check(pattern))
    if expr.gens() & {"Sq", "Sk"}:
        raise InputError(
            f"in_document({pattern!r}): positions within a document have no Sq or Sk; use patterns that read "
            "q and k only (the top-left forms)"
        )
    return InDocument(expr, repr(pattern))


def reads_document_offsets(pat: Pattern) -> bool:
    """Whether `pat` reads positions within documents (an in_document() leaf): the call then computes them."""
    return any(isinstance(leaf, InDocument) for leaf in pat.leaves())


def _in_document_expr(pat: Pattern) -> X.Boolean:
    if isinstance(pat, Affine):
        return pat.expr
    if isinstance(pat, (And, Or)):
        return (X.conj if isinstance(pat, And) else X.disj)(*map(_in_document_expr, pat.parts))
    if isinstance(pat, Not):
        return X.neg(_in_document_expr(pat.part))
    raise InputError(
        f"in_document() takes an affine pattern (causal, windows, local, prefix_lm, global_tokens, predicate, with "
        f"& | ~), got {pat!r}"
    )


@built_when_traced
def key_padding() -> Pattern:
    """Ignore keys at or past each batch's length; pass `key_lengths=` to `attention`."""
    return KeyPadding()


@built_when_traced
def buckets() -> Pattern:
    """Attend only within a bucket: pass `query_buckets=` [B, Hq, Sq] and `key_buckets=` [B, Hkv, Sk] (integers) to
    `attention`. The rest of the pattern applies to the original positions (`causal() & buckets()`)."""
    return Buckets()


@built_when_traced
def lsh(n: int, seed: int | None = None) -> Pattern:
    """Buckets by angular LSH of q and k (Sparse Flash Attention's hash): per KV head a D x n/2 standard-normal R,
    bucket(x) = argmax([xR, -xR]); queries use their KV head's R. `seed=None` draws a fresh R on every call.
    `attngen.lsh_buckets(q, k, n, seed)` returns the buckets it uses."""
    from . import hashing  # imported where used: its graph break imports torch._dynamo (~0.7 s)

    hashing.check(n, seed)
    return LSH(n, seed)


@built_when_traced
def keep() -> Pattern:
    """Drop queries and keys: pass `query_keep=` [B, Hq, Sq] and `key_keep=` [B, Hkv, Sk] (bool, True = kept) to
    `attention`. Dropped keys are never attended; a dropped query outputs 0 (LSE -inf) and gets zero gradients."""
    return Keep()


TOPK_BLOCK_SIZES = (64, 128)


@built_when_traced
def topk_blocks(k: int, block: int = 64) -> Pattern:
    """Block top-k: each query block of `block` rows attends to the `k` key blocks whose mean key has the largest dot
    product with its mean query (per batch and query head; blocks aligned at 0), among the key blocks the rest of the
    pattern allows for it; every element of a kept block still obeys the rest of the pattern. Inside |, the other
    branches add their keys: `causal() & (topk_blocks(16) | sliding_window(512))`. block is 64 or 128."""
    k = _int("k", k, 1)
    if isinstance(block, bool) or block not in TOPK_BLOCK_SIZES:
        raise InputError(f"topk_blocks(k, block): block must be one of {TOPK_BLOCK_SIZES}, got {block!r:.40}")
    return TopkBlocks(k, block)


@built_when_traced
def key_indices() -> Pattern:
    """Attend only to listed keys: pass `key_indices=` [B, Hkv, Sq, n] (one list per KV head, shared by its query
    heads) or [B, Hq, Sq, n], int32 or int64, to `attention`. Entries outside [0, Sk) are ignored (-1 pads a list),
    a key listed twice counts once; the rest of the pattern still applies (`causal() & key_indices()`)."""
    return KeyIndices()


@built_when_traced
def topk(k: int, scorer: LowRank | Indexer | None = None) -> Pattern:
    """Top-k by token: each query row attends to the `k` keys with the largest score among the keys the rest of the
    pattern allows for it (`causal() & topk(256)`; inside |, the other branches add their keys), ties to the lower
    key index, all of them where fewer exist. Scores: the exact q·k per query head (no scorer), DSA's low-rank
    prediction per query head (`scorer=lowrank()`, call time `proj=`), or DeepSeek's indexer, one selection per
    token for every head (`scorer=indexer()`, call time `index_q=`, `index_k=`, `index_w=`). Scorers rank in fp32;
    the attention over the kept keys is exact, and the choice is held fixed in the backward."""
    k = _int("k", k, 1)
    if scorer is not None and not isinstance(scorer, (LowRank, Indexer)):
        raise InputError(f"topk(k, scorer=): the scorer must be lowrank() or indexer() (or None), got {scorer!r:.60}")
    return TopkTokens(k, scorer)


@built_when_traced
def threshold(t: float, scorer: LowRank | Indexer | None = None) -> Pattern:
    """Keep candidate j of row i where p(i, j) >= t, p the softmax over the candidates (the keys the rest of the
    pattern allows) of their scores: the exact scaled scores s(i, j) = scale · qᵢ·kⱼ (then p(i, j) >= t means
    s(i, j) >= LSEᵢ + ln t), or a scorer's values as they are (`lowrank()`, `indexer()`, as for `topk`). The row's
    maximum is always kept (the lowest key among equal maxima). t is in (0, 1]; at most 1/t keys pass a row."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
        raise InputError(f"threshold(t): t must be a number in (0, 1], got {t!r:.40}")
    if scorer is not None and not isinstance(scorer, (LowRank, Indexer)):
        raise InputError(f"threshold(t, scorer=): the scorer must be lowrank(), indexer() or None, got {scorer!r:.60}")
    return TopkTokens(min(MAX_INT, math.floor(1 / t) + 1), scorer, float(t))  # + 1: fp32 rounding at p = t


@built_when_traced
def lowrank() -> LowRank:
    """DSA's scorer for `topk(k, scorer=lowrank())`: ranks by (qᵢ P)·(kⱼ P), P = `proj=` [D, r] or [Hq, D, r] given
    at call time (`random_projection` makes DSA's sparse one)."""
    return LowRank()


@built_when_traced
def indexer() -> Indexer:
    """DeepSeek's lightning indexer for `topk(k, scorer=indexer())`: ranks by Σₕ w[b, i, h] · ReLU(q̃[b, i, h] ·
    k̃[b, j]) from `index_q=` [B, Sq, Hi, Di], `index_k=` [B, Sk, Di], `index_w=` [B, Sq, Hi] given at call time; one
    selection per token, shared by every query head."""
    return Indexer()


def random_projection(head_dim: int, r: int, seed: int = 0) -> torch.Tensor:
    """DSA's sparse random projection: float32 [head_dim, r] with entries -1, 0, +1 drawn with probabilities 1/6,
    2/3, 1/6 (Achlioptas), from a CPU generator seeded with `seed`."""
    head_dim, r, seed = _int("head_dim", head_dim, 1), _int("r", r, 1), _int("seed", seed)
    u = torch.rand(head_dim, r, generator=torch.Generator().manual_seed(seed))
    return (u < 1 / 6).float() - (u >= 5 / 6).float()


def token_leaf(pat: Pattern) -> TopkTokens | None:
    """The pattern's `topk` leaf, or None."""
    found = [leaf for leaf in pat.leaves() if isinstance(leaf, TopkTokens)]
    return found[0] if found else None


@built_when_traced
def block_layout(layout: torch.Tensor, block_size: int) -> Pattern:
    """A bool grid `layout[qb, kb]` (or `[head, qb, kb]`, or `[batch, head or 1, qb, kb]`: one grid per batch
    element): query block qb sees key block kb."""
    bs = _int("block_size", block_size, 1)
    if not isinstance(layout, torch.Tensor) or layout.dim() not in (2, 3, 4):
        raise InputError(
            "layout must be a 2-d [q_blocks, k_blocks], 3-d [heads, q_blocks, k_blocks] or 4-d [batch, heads or 1, "
            "q_blocks, k_blocks] tensor"
        )
    if layout.dtype != torch.bool:
        raise InputError(f"layout must be a torch.bool tensor (True = the blocks see each other), got {layout.dtype}")
    if layout.is_meta or layout.numel() == 0:
        got = f"{layout.device} {tuple(layout.shape)}"
        raise InputError(f"layout must hold data with at least one block a side, got {got}")
    data = layout.detach().to("cpu", torch.bool).contiguous().to(torch.uint8).numpy().tobytes()
    grid = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(layout.shape)
    grid = grid if layout.dim() >= 3 else grid.unsqueeze(0)
    return BlockLayout(data, tuple(layout.shape), bs, hashlib.sha256(data).hexdigest(), grid)


@built_when_traced
def predicate(expr: str | X.Boolean) -> Pattern:
    """An arbitrary boolean combination of affine (in)equalities in q, k, Sq, Sk, e.g. "k <= q - 4": a string, a
    predicate built from `attngen.q`, `.k`, `.Sq`, `.Sk` (`(ag.k <= ag.q - 4) & (ag.q < ag.Sk)`), or a sympy
    expression in symbols named q, k, Sq, Sk."""
    if isinstance(expr, str):
        e = _parse_predicate(expr)
    elif X.is_sympy(expr):
        e = X.from_sympy(expr)
    else:
        e = expr
    if not isinstance(e, X.Boolean):
        raise InputError(
            f"predicate takes a string, a comparison of positions (e.g. ag.k <= ag.q - 4) or a sympy expression, "
            f"got {type(expr).__name__}"
        )
    for rel in e.relations():
        _check_coefficients(rel)
    return Affine(e, f"predicate({str(expr)!r})" if isinstance(expr, str) else f"predicate({expr})")


def _check_coefficients(rel: X.Rel) -> None:
    """Positions are 32-bit integers in the kernels: integer forms with multipliers up to 2**30."""
    for _, c in (*rel.lhs.parts, *rel.rhs.parts, (None, rel.lhs.const), (None, rel.rhs.const)):
        if max(abs(c.numerator), c.denominator) > MAX_INT:
            raise InputError(
                f"predicate coefficients must be integers or fractions of integers up to 2**30 = {MAX_INT} "
                f"(positions are 32-bit integers in the kernels); {rel} has {c}"
            )
    atom = affine.modular_atom(rel)
    big = [c for c in (*atom.coef, atom.const, *(m for m, _ in atom.terms)) if abs(c) > MAX_INT]
    if big:
        raise InputError(
            f"predicate coefficients must be integers or fractions of integers up to 2**30 = {MAX_INT} "
            f"(positions are 32-bit integers in the kernels); {rel} has {big[0]} in its integer form"
        )


_PRED_OPS = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq", ast.NotEq: "ne"}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_BOOL = {ast.BitAnd: X.conj, ast.BitOr: X.disj}


def _parse_predicate(text: str) -> X.Boolean:
    """Parse without eval: numbers, q k Sq Sk, + - *, // % by positive integer constants, comparisons (chained
    too), & | ~ and/or/not."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise InputError(f"cannot parse predicate {text!r}: {e.msg}") from None

    def number(n: ast.AST) -> X.Expr:  # an operand of + - * and of comparisons
        value = conv(n)
        if isinstance(value, X.Boolean):
            raise InputError(f"predicate {text!r}: {ast.unparse(n)!r} is a truth value where a number is expected")
        return value

    def truth(n: ast.AST) -> X.Boolean:  # an operand of & | ~ and/or/not
        value = conv(n)
        if not isinstance(value, X.Boolean):
            raise InputError(f"predicate {text!r}: {ast.unparse(n)!r} is a number where a comparison is expected")
        return value

    def arithmetic(n: ast.BinOp) -> X.Expr:
        x, c = number(n.left), number(n.right)
        if isinstance(n.op, (ast.FloorDiv, ast.Mod)):
            sym = "//" if isinstance(n.op, ast.FloorDiv) else "%"
            if not (c.is_constant and c.const.denominator == 1 and c.const > 0):
                raise InputError(
                    f"predicate {text!r}: {ast.unparse(n)!r} must divide by a positive integer constant "
                    f"(x {sym} c with c from 1 to 2**30), got {ast.unparse(n.right)!r}"
                )
            if x.terms():
                raise InputError(f"predicate {text!r}: {ast.unparse(n)!r}: nested // and % are not supported")
        try:
            return (_ARITH | {ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod})[type(n.op)](x, c)
        except InputError as err:
            raise InputError(f"predicate {text!r}: {ast.unparse(n)!r}: {err}") from None

    def conv(n: ast.AST) -> X.Expr | X.Boolean:
        if isinstance(n, ast.Constant) and type(n.value) is int:
            if n.value > MAX_INT:  # literals are never negative: -5 parses as unary minus on 5
                digits = str(n.value)
                shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
                raise InputError(
                    f"predicate {text!r}: the integer {shown} is too large; integers from 0 to 2**30 = {MAX_INT} "
                    "are accepted (positions are 32-bit integers in the kernels)"
                )
            return X.Expr.of(n.value)
        if isinstance(n, ast.Constant) and type(n.value) is bool:
            return X.TRUE if n.value else X.FALSE
        if isinstance(n, ast.Name) and n.id in SYMBOLS:
            return SYMBOLS[n.id]
        if isinstance(n, ast.BinOp) and isinstance(n.op, (*_ARITH, ast.FloorDiv, ast.Mod)):
            return arithmetic(n)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            raise InputError(
                f"predicate {text!r}: true division {ast.unparse(n)!r} is not allowed (positions are integers); "
                "use // or % by a positive integer constant"
            )
        if isinstance(n, ast.BinOp) and type(n.op) in _BOOL:
            return _BOOL[type(n.op)](truth(n.left), truth(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -number(n.operand)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Invert, ast.Not)):
            return X.neg(truth(n.operand))
        if isinstance(n, ast.BoolOp):
            return (X.conj if isinstance(n.op, ast.And) else X.disj)(*map(truth, n.values))
        if isinstance(n, ast.Compare):
            terms = [number(n.left), *map(number, n.comparators)]
            if not all(type(o) in _PRED_OPS for o in n.ops):
                raise InputError(f"predicate {text!r}: only < <= > >= == != comparisons are allowed")
            return X.conj(*(X.relation(_PRED_OPS[type(o)], a, b) for o, a, b in zip(n.ops, terms, terms[1:])))
        raise InputError(
            f"predicate {text!r}: {ast.unparse(n)!r} is not allowed "
            "(use integers, q, k, Sq, Sk, + - *, // and % by constants, comparisons, & | ~)"
        )

    return conv(tree)


# ------------------------------------------------------------------------------------------ dense semantics


def document_ids_pair(document_ids, Sq: int, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise `document_ids` (one [B, S] / [S] tensor when Sq == Sk, or a (query, key) pair) to [B', S]."""
    if isinstance(document_ids, (tuple, list)):
        if len(document_ids) != 2:
            raise InputError(f"document_ids as a pair must be (query_ids, key_ids), got {len(document_ids)} items")
        qd, kd = document_ids
    else:
        if Sq != Sk:
            raise InputError("with Sq != Sk pass document_ids=(query_ids, key_ids)")
        qd = kd = document_ids
    for name, d in (("query", qd), ("key", kd)):
        if not isinstance(d, torch.Tensor) or d.dim() not in (1, 2):
            raise InputError(f"document ids ({name}) must be a [B, S] or [S] integer tensor, got {d!r:.60}")
    qd, kd = (d if d.dim() == 2 else d.unsqueeze(0) for d in (qd, kd))
    if qd.shape[-1] != Sq or kd.shape[-1] != Sk:
        raise InputError(f"document ids must have lengths Sq={Sq} and Sk={Sk}, got {qd.shape[-1]} and {kd.shape[-1]}")
    return qd, kd


def document_offsets(document_ids, Sq: int, Sk: int) -> torch.Tensor:
    """Each token's position within its document, [B', S] int64: the number of earlier tokens that carry its id (for
    packed documents, its distance from its document's first token), counted on one sequence (Sq == Sk, one id
    tensor); otherwise the call gives them (`document_positions`)."""
    if isinstance(document_ids, (tuple, list)) or Sq != Sk:
        raise InputError(
            "in_document() counts positions within a document on one sequence (Sq == Sk, document_ids one [B, S] or "
            f"[S] tensor); got Sq={Sq}, Sk={Sk}{', a (query, key) pair of ids' if Sq == Sk else ''}: pass "
            "document_positions=(query_positions, key_positions) too"
        )
    ids, _ = document_ids_pair(document_ids, Sq, Sk)
    order = torch.sort(ids, dim=-1, stable=True).indices
    ranked = ids.gather(-1, order)
    pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[..., 1:] = ranked[..., 1:] != ranked[..., :-1]
    start = torch.cummax(torch.where(first, pos, 0), dim=-1).values  # where each sorted id's run begins
    return torch.empty_like(pos).scatter_(-1, order, pos - start)


def document_positions_pair(document_ids, document_positions, Sq: int, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) positions within their documents, [B', S]: `document_positions` as given (one [B, S] / [S]
    tensor when Sq == Sk, or a (query, key) pair), else counted from one id tensor (`document_offsets`)."""
    if document_positions is None:
        within = document_offsets(document_ids, Sq, Sk)
        return within, within
    if isinstance(document_positions, (tuple, list)):
        if len(document_positions) != 2:
            raise InputError(
                f"document_positions as a pair must be (query, key) positions, got {len(document_positions)}"
            )
        qp, kp = document_positions
    elif Sq != Sk:
        raise InputError("with Sq != Sk pass document_positions=(query_positions, key_positions)")
    else:
        qp = kp = document_positions
    for name, t, n in (("query", qp, Sq), ("key", kp, Sk)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or t.shape[-1] != n:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"document_positions ({name}) must be a [B, {n}] or [{n}] integer tensor, got {got}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"document_positions ({name}) must be integers, got {t.dtype}")
    return tuple(t if t.dim() == 2 else t.unsqueeze(0) for t in (qp, kp))


def dense_mask(
    pat: Pattern,
    Sq: int,
    Sk: int,
    *,
    document_ids=None,
    document_positions=None,
    key_lengths: torch.Tensor | None = None,
    query_buckets: torch.Tensor | None = None,
    key_buckets: torch.Tensor | None = None,
    query_keep: torch.Tensor | None = None,
    key_keep: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    order: tuple[torch.Tensor, torch.Tensor] | None = None,
    selected_blocks: torch.Tensor | None = None,
    key_indices: torch.Tensor | None = None,
    proj: torch.Tensor | None = None,
    index_q: torch.Tensor | None = None,
    index_k: torch.Tensor | None = None,
    index_w: torch.Tensor | None = None,
    scale: float | None = None,
    score_mods: tuple = (),
    device: torch.device | str = "cpu",
    _selected: torch.Tensor | None = None,
    **_,
) -> torch.Tensor:
    """Dense bool mask [B', H', Sq, Sk] of the positions `pat` allows (B', H' are 1 unless the pattern depends on
    batch or head). A selection rule allows every position here: it chooses among them by score (`reference`).
    Buckets and keep masks are compared as given ([B, Hq, S] for queries, [B, Hkv, S] for keys); `lsh` hashes `q`
    and `k`. With `order` = (query positions [B, Hq, Sq], key positions [B, Hkv, Sk]), the mask of tokens in that
    order: every leaf but buckets and keep masks reads the original position of each token (what the kernels of a
    reordered call evaluate; `attngen.reorder`). `topk_blocks` selects by the float64 scores of `q` and `k` among
    the blocks its &-context allows (`context_of`), or takes the choice as `selected_blocks`, bool [B, Hq, nbq, nbk]
    (what `attngen.selected_blocks` returns). `topk` selects by the float64 scores of `q` and `k` (or its scorer's,
    from `proj` or `index_q`, `index_k`, `index_w`) among the keys its &-context allows; exact scores are
    scale · q·k with `score_mods` (score modifications bound to the call's tensors, `scoremod.bind`) applied."""
    runtime = dict(document_ids=document_ids, key_lengths=key_lengths, query_buckets=query_buckets)
    runtime |= dict(document_positions=document_positions)
    runtime |= dict(key_buckets=key_buckets, query_keep=query_keep, key_keep=key_keep, q=q, k=k, order=order)
    runtime |= dict(key_indices=key_indices, proj=proj, index_q=index_q, index_k=index_k, index_w=index_w, scale=scale)
    runtime |= dict(score_mods=score_mods)
    leaf = topk_leaf(pat) or token_leaf(pat)
    if _selected is None and isinstance(leaf, TopkTokens):
        _selected = _token_mask(pat, leaf, Sq, Sk, device, runtime)
    elif _selected is None and leaf is not None:
        _selected = _topk_mask(pat, leaf, Sq, Sk, selected_blocks, device, runtime)
    runtime["_selected"] = _selected
    sub = functools.partial(dense_mask, Sq=Sq, Sk=Sk, device=device, **runtime)
    if isinstance(pat, (And, Or)):
        return functools.reduce(operator.and_ if isinstance(pat, And) else operator.or_, map(sub, pat.parts))
    if isinstance(pat, Not):
        return ~sub(pat.part)
    if isinstance(pat, (Buckets, LSH, Keep)):
        return _pairs(pat, device, **runtime)
    if order is None:
        qi = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
        kj = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
    else:  # original positions, [B, Hq, S, 1] and [B, Hq, 1, S] (a key head serves its group of query heads)
        qo, ko = (t.to(device, torch.int64) for t in order)
        qi, kj = qo[..., :, None], ko.repeat_interleave(qo.shape[1] // ko.shape[1], dim=1)[..., None, :]
    if isinstance(pat, Affine):
        m = torch.as_tensor(affine.evaluate(pat.expr, {"q": qi, "k": kj, "Sq": Sq, "Sk": Sk}), device=device)
        return m.expand(*torch.broadcast_shapes(qi.shape, kj.shape))
    if isinstance(pat, Selector):
        return torch.ones(1, 1, Sq, Sk, dtype=torch.bool, device=device)
    if isinstance(pat, (TopkBlocks, SelectedBlocks, TopkTokens)):
        return _selected
    if isinstance(pat, BlockLayout):
        lay = pat.tensor().to(device).bool()
        nq, nk = math.ceil(Sq / pat.block_size), math.ceil(Sk / pat.block_size)
        if lay.shape[-2] < nq or lay.shape[-1] < nk:
            raise InputError(f"layout {tuple(lay.shape)} does not cover {nq}x{nk} blocks of {pat.block_size}")
        lay = lay if pat.per_batch else lay[None]
        batches = torch.arange(lay.shape[0], device=device).view(-1, 1, 1, 1)
        heads = torch.arange(lay.shape[1], device=device).view(1, -1, 1, 1)
        return lay[batches, heads, qi // pat.block_size, kj // pat.block_size]
    if isinstance(pat, (Documents, InDocument)):
        if document_ids is None:
            name = "in_document" if isinstance(pat, InDocument) else "documents"
            raise InputError(f"the pattern uses {name}(): pass document_ids=")
        qd, kd = (d.to(device).unsqueeze(1) for d in document_ids_pair(document_ids, Sq, Sk))  # [B', 1, S]
        qs, ks = [qd], [kd]
        if isinstance(pat, InDocument):  # and the positions within documents
            qo, ko = document_positions_pair(document_ids, document_positions, Sq, Sk)
            qs.append(qo.to(device, torch.int64).unsqueeze(1))
            ks.append(ko.to(device, torch.int64).unsqueeze(1))
        if order is not None:  # the values at the tokens' original positions
            qs = [torch.gather(t.expand(qi.shape[0], qi.shape[1], Sq), 2, qi[..., 0]) for t in qs]
            ks = [torch.gather(t.expand(kj.shape[0], kj.shape[1], Sk), 2, kj[..., 0, :]) for t in ks]
        same = qs[0][..., :, None] == ks[0][..., None, :]
        if isinstance(pat, Documents):
            return same
        inner = affine.evaluate(pat.expr, {"q": qs[1][..., :, None], "k": ks[1][..., None, :]})
        return same & torch.as_tensor(inner, device=device)
    if isinstance(pat, KeyIndices):
        return _listed(key_indices, Sq, Sk, q, order, device)
    if isinstance(pat, KeyPadding):
        if key_lengths is None:
            raise InputError("the pattern uses key_padding(): pass key_lengths=")
        return kj < key_lengths.to(device).view(-1, 1, 1, 1)
    raise InputError(f"{pat!r} has no dense mask (a pattern's structure has none: use the pattern itself)")


def _listed(key_indices, Sq: int, Sk: int, q, order, device) -> torch.Tensor:
    """bool [B, H, Sq, Sk]: the keys each row lists (H: the query heads where `q` tells them, else the lists')."""
    if key_indices is None:
        raise InputError("the pattern uses key_indices(): pass key_indices=")
    if order is not None:
        raise InputError("key_indices() does not run on reordered tokens")
    idx = key_indices.to(device, torch.int64)
    if idx.dim() != 4 or idx.shape[2] != Sq:
        raise InputError(f"key_indices must be [B, H, Sq={Sq}, n], got {tuple(idx.shape)}")
    B, H = idx.shape[:2]
    out = torch.zeros(B, H, Sq, Sk + 1, dtype=torch.bool, device=device)
    out.scatter_(-1, torch.where((idx >= 0) & (idx < Sk), idx, Sk), True)
    out = out[..., :Sk]
    if q is not None and q.shape[1] != H:
        out = out.repeat_interleave(q.shape[1] // H, dim=1)
    return out


def _topk_mask(pat, leaf, Sq, Sk, selected_blocks, device, runtime) -> torch.Tensor:
    """bool [B, Hq, Sq, Sk]: the pairs inside the key blocks `leaf` (a `topk_blocks`, or its structure when the
    choice is given as `selected_blocks`) keeps."""
    bs = leaf.block
    nbq, nbk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    if selected_blocks is None and not isinstance(leaf, TopkBlocks):
        raise InputError(f"{leaf!r} has no dense mask without selected_blocks= (the choice of a call)")
    if selected_blocks is not None:
        grid = selected_blocks.to(device, torch.bool)
        if grid.dim() != 4 or tuple(grid.shape[-2:]) != (nbq, nbk):
            raise InputError(f"selected_blocks must be bool [B, Hq, {nbq}, {nbk}], got {tuple(grid.shape)}")
        return blocktopk.expand(grid, bs, Sq, Sk)
    q, k = runtime["q"], runtime["k"]
    if q is None or k is None:
        raise InputError(f"the mask of {leaf!r} needs q= and k= (it selects blocks by their scores)")
    if runtime["order"] is not None:
        raise InputError(f"{leaf!r} does not run on reordered tokens")
    context = dense_mask(context_of(pat, leaf), Sq, Sk, device=device, **{**runtime, "_selected": None})
    cand = blocktopk.candidates_of(context, bs, Sq, Sk)
    scores = blocktopk.block_scores(q.to(device), k.to(device), bs, torch.float64)
    return blocktopk.expand(blocktopk.choose(scores, cand, leaf.k), bs, Sq, Sk)


def _token_mask(pat, leaf: TopkTokens, Sq: int, Sk: int, device, runtime) -> torch.Tensor:
    """bool [B, Hq or 1, Sq, Sk]: the keys `leaf` keeps, chosen by float64 scores (`tokentopk`) among the keys its
    &-context allows (for a selection shared by the heads, allowed for some head). Exact scores are ranked as the
    softmax sees them: scale · q·k, then the score modifications (a key they set to -inf is never kept); a scorer's
    values are ranked as they are."""
    q, k = runtime["q"], runtime["k"]
    if q is None or k is None:
        raise InputError(f"the mask of {leaf!r} needs q= and k= (it selects keys by their scores)")
    if runtime["order"] is not None:
        raise InputError(f"{leaf!r} does not run on reordered tokens")
    inputs = {n: runtime[n] for n in leaf._inputs}
    if any(t is None for t in inputs.values()):
        raise InputError(f"the pattern uses {leaf!r}: pass {', '.join(f'{n}=' for n in leaf._inputs)}")
    B, Hq, _, D = q.shape
    tokentopk.check(leaf.scorer, inputs, B, Hq, Sq, Sk, D)
    context = dense_mask(context_of(pat, leaf), Sq, Sk, device=device, **{**runtime, "_selected": None})
    q, k = q.detach().to(device), k.detach().to(device)
    keys = tokentopk.keys_of(leaf.scorer, k, inputs, Hq, torch.float64)
    scores = tokentopk.scores(leaf.scorer, q, keys, inputs, slice(0, Sq), slice(0, Sk), torch.float64)
    cand = context.any(1, keepdim=True) if leaf.shared else context
    if leaf.scorer is None:
        scale = runtime["scale"] if runtime["scale"] is not None else 1 / math.sqrt(D)
        scores = scoremod.reference(runtime["score_mods"], scores * scale)
        cand = cand & (scores > -math.inf)
    if leaf.t is None:
        return blocktopk.choose(scores, cand, leaf.k)
    return tokentopk.above_threshold(scores, cand, leaf.t)


def _pairs(pat: Pattern, device, *, query_buckets, key_buckets, query_keep, key_keep, q, k, **_) -> torch.Tensor:
    """[B, Hq, Sq, Sk]: the pairs of tokens a bucket or keep leaf allows, from per-token values given in the tokens'
    order (query values per query head, key values per key head)."""
    if isinstance(pat, LSH):
        if pat.seed is None or q is None or k is None:
            raise InputError(f"the mask of {pat!r} needs q=, k= and a seed (lsh(n, seed=...) hashes them)")
        from .hashing import lsh_buckets

        qv, kv = lsh_buckets(q, k, pat.n, pat.seed)
    elif isinstance(pat, Buckets):
        if query_buckets is None or key_buckets is None:
            raise InputError("the pattern uses buckets(): pass query_buckets= and key_buckets=")
        qv, kv = query_buckets, key_buckets
    else:
        if query_keep is None or key_keep is None:
            raise InputError("the pattern uses keep(): pass query_keep= and key_keep=")
        qv, kv = query_keep.bool(), key_keep.bool()
    qv, kv = qv.to(device), kv.to(device)
    kv = kv.repeat_interleave(qv.shape[1] // kv.shape[1], dim=1)
    if isinstance(pat, Keep):
        return qv[..., :, None] & kv[..., None, :]
    return qv[..., :, None] == kv[..., None, :]


def _differences(expr: X.Boolean) -> X.Boolean:
    """`expr` with every comparison a < b written as a - b < 0: equal for predicates that compare the same
    differences, such as k <= q and k + 5 <= q + 5."""
    return X.map_relations(expr, lambda r: X.relation(r.op, r.diff, 0))


def shifted(pat: Pattern, dq: int, dk: int, Sq: int, Sk: int, *, sliced_data: bool = False) -> Pattern:
    """`pat` on one block of a longer sequence, as a pattern over the block's own positions: query q of the block is
    query q + dq of a sequence of Sq queries, key k is key k + dk of Sk keys (context parallelism runs a sequence
    as such blocks). Affine leaves (with & | ~) move with the block; a selection rule whose key groups the shift
    keeps aligned (N:M with dk a multiple of m) stays as it is; documents(), in_document(), key_padding(),
    key_indices(), buckets() and keep() stay as they are with `sliced_data`, where the caller passes the block's
    slice of their call-time data (its query and key document ids and positions within documents, key lengths less
    dk, its rows' lists less dk, its rows' and keys' bucket ids and keep flags); a block layout becomes its grid
    from the block's first blocks on, where dq and dk are multiples of its block size; other leaves are refused with an
    InputError. An affine leaf that reads q - k only (causal(), windows) moves by dq - dk alone: blocks on the
    diagonal keep the leaf itself, and blocks as far from it share one structure (one compile), whatever their place
    and the lengths."""
    if isinstance(pat, Affine):
        expr = X.substitute(pat.expr, {"q": q + dq, "k": k + dk, "Sq": X.Expr.of(Sq), "Sk": X.Expr.of(Sk)})
        moved = X.substitute(pat.expr, {"q": q + 1, "k": k + 1})
        if not pat.expr.gens() & {"Sq", "Sk"} and _differences(moved) == _differences(pat.expr):
            if dq == dk:
                return pat
            return Affine(_differences(expr), f"{pat!r} with q - k {dq - dk:+d}")
        return Affine(expr, f"{pat!r} at +({dq}, {dk}) of {Sq}x{Sk}")
    if isinstance(pat, (And, Or)):
        parts = tuple(shifted(p, dq, dk, Sq, Sk, sliced_data=sliced_data) for p in pat.parts)
        return And(parts) if isinstance(pat, And) else Or(parts)
    if isinstance(pat, Not):
        return Not(shifted(pat.part, dq, dk, Sq, Sk, sliced_data=sliced_data))
    if sliced_data and isinstance(pat, (Documents, InDocument, KeyPadding, KeyIndices, Buckets, Keep)):
        return pat
    if isinstance(pat, BlockLayout) and dq % pat.block_size == 0 and dk % pat.block_size == 0:
        bs = pat.block_size  # the grid from the block's first query and key blocks on (a larger grid is fine)
        g = pat.grid[..., dq // bs :, dk // bs :].bool()
        g = g if g.shape[-2] and g.shape[-1] else torch.zeros(*g.shape[:-2], 1, 1, dtype=torch.bool)  # past the grid
        return block_layout(g if pat.per_head else g[0], bs)
    m = getattr(pat, "m", None)  # a selection rule grouping keys by ⌊k / m⌋ (N:M)
    if isinstance(pat, Selector) and isinstance(m, int) and dk % m == 0:
        return pat
    raise InputError(
        f"{pat!r} cannot be moved to a block of a longer sequence (offsets {dq}, {dk}); supported: affine patterns "
        "(causal, windows, local, prefix_lm, global_tokens, predicate) combined with & | ~, documents() and "
        "key_padding(), key_indices(), buckets() and keep() where their call-time data is sliced to the block, "
        "block layouts and nm(n, m) on blocks that start at multiples of their block size and m"
    )


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
        in_document,
        key_padding,
        predicate,
        buckets,
        lsh,
        keep,
        topk_blocks,
        key_indices,
        topk,
        threshold,
        lowrank,  # scorers, for topk(k, scorer=...) and threshold(t, scorer=...)
        indexer,
    )
}
