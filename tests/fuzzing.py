"""Seeded, reproducible attention fuzz cases: one generator for the CPU checks (tests/test_fuzz.py: planning,
scheduling, mask lowering, a few compiles) and the GPU run (bench/fuzz_gpu.py: kernels against attngen.reference).

`case(seed)` is a pure function of `seed` (Python's `random.Random` and a CPU `torch.Generator`, nothing global): a
random pattern composed from every constructor with & | ~ (depth <= 3), in some groups of cases with a selection rule on
top (`A & nm(2, 4)`, `A & nm(1, 2)`), in others (`TOPK_SHARE`) a `topk_blocks(k, block)` leaf (`A & topk`, NSA's `A &
(topk | B)`, `topk | A`, alone), in others (`INDEX_SHARE`) a `key_indices()` leaf with its lists (random, clustered
runs, every key, none; shared by a group's heads or per query head), shapes (batch, GQA heads, odd and tile-boundary
lengths, Sq != Sk), head dim, dtype, input storage (strided views), scale, return_lse, backward, and the run-time inputs
the pattern reads (document ids as [S] / [B, S] / a pair, key lengths incl. 0 and Sk). In other groups (`REORDER_SHARE`,
never with a rule, which refuses them) the pattern has hash buckets or dropped tokens: `buckets()`, `lsh(n, seed)` or
`keep()`, mostly on top (`A & buckets()`, `A & documents() & lsh(n, seed) & keep()`), sometimes alone, on a conjunction
of linear leaves (each query then keeps one range of sorted keys), or nested under | and ~ anywhere in the tree; such a
pattern reorders (its tokens are sorted by bucket inside `attngen.attention`), and the case draws its bucket ids (one
bucket to a few dozen, all distinct, sorted runs; int32 or int64, negative and extreme int32 values, shared by every
head or not) and keep masks (any rate from every token dropped to none). `lsh` always has a seed, so that
`attngen.reference` hashes q and k as the kernels' call does. In other groups (`TOKEN_SHARE`, never with a rule,
reordering, topk_blocks or key_indices(), which refuse it) the pattern has a top-k-by-token leaf `topk(k, scorer)`:
on top (`A & topk`), NSA's `A & (topk | B)`, `documents() & (topk | A)`, `topk | A`, alone, or around any subtree
outside ~ (`s & topk`, `s | topk`); the group draws the scorer (exact q·k, `lowrank()`, `indexer()`) and the place, each
case its own k (1, a few, up to every key and past it) and the scorer's call-time tensors: `proj=` [D, r] or
[Hq, D, r] (sparse as DSA's, dense signs, all 0; fp32, fp16, bf16 or fp64), `index_q=` [B, Sq, Hi, Di], `index_k=`
[B, Sk, Di], `index_w=` [B, Sq, Hi] (random Hi and Di; 16-bit dtypes, fp32 or mixed; contiguous, column-major or
expanded over the batch). Every case is valid input: the API must accept it and the kernels must match the reference.

A rule or a topk(k) leaf chooses keys by their scores, and a near-tie could go either way between a kernel's fp32
scores and the reference's float64 ones; so those cases draw q and k from a grid of quarters (`GRID`), where every dot
product is exact in fp32 and float64 alike, and a topk leaf's scorer inputs alike: proj holds 0 and signed powers of
two (r * D^2 <= 2^20: (qP)·(kP) stays below 2^24 of its units), index_q and index_k quarters, index_w quarters times a
power of two (Hi * Di <= 2^13). The scores are then ordered alike, exact ties go to the lower key index in both, and
the comparison stays exact. Score modifications (`MOD_SHARE`: softcap, alibi, bias(), rel_bias(), combined) go with
no rule; with reordering (`REORDER_MOD_SHARE` of those groups) a softcap only; with a topk(k) leaf
(`TOKEN_MOD_SHARE` of those groups), which ranks the modified scores, only exact ones: alibi's slopes 2^-i, a bias
and a T5 table of small integers, at a scale of 2^-i.
`Case.repro()` is the one command line that runs it again on a GPU.

Consecutive seeds share a pattern *recipe*, head dim, dtype and kernel variant (`GROUP` of them: the tree, its
constants, layout block sizes), so that a GPU run compiles a quarter as many kernels; each seed draws its own shapes,
layout grids, run-time tensors and inputs. Importable without pytest and without a GPU."""

from __future__ import annotations

import functools
import math
import operator
import random
from dataclasses import dataclass, field

import sympy as sp
import torch

import attngen as ag
from attngen import pattern as P
from attngen import scoremod
from attngen.select.nm import NM

GROUP = 4  # consecutive seeds sharing a pattern recipe, head dim, dtype and variant (so, compiled kernels)
HEAD_DIMS = (32, 64, 96, 128, 256)
HEAD_DIM_WEIGHTS = (1, 4, 1, 4, 1)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_SIZES = (16, 32, 64, 128, 96)
# Lengths at and beside every tile edge the kernels use (BLOCK_M 64 / 128 / 192, BLOCK_N 64 / 128).
EDGE_LENGTHS = (1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 383, 384, 385, 511, 512)
LONG_LENGTHS = (767, 768, 769, 1023, 1024, 1025, 1151, 1152, 1153, 1535, 1536, 1537, 2047, 2048, 2049, 2999, 3000)
MAX_LONG = 3073
# The reference materialises B * Hq * Sq * Sk scores (and, with backward, a few more of them): capped per case.
MAX_SCORES = 1 << 24
MAX_INPUT = 1 << 23  # B * H * S * D elements of one input tensor
LONG_SHARE = 0.12  # cases with a length above 512
STORAGES = ("contiguous", "bshd", "sliced", "misaligned", "expand")
STORAGE_WEIGHTS = (10, 4, 3, 1, 2)
VARIANTS = ("auto", "mma_sync")  # mma_sync: the mma.sync tilings forced (on sm_90, where auto takes wgmma)
REPRO = "python bench/fuzz_gpu.py --seed {seed} --cases 1"
RULE_SHARE = 0.2  # groups whose pattern is `A & rule`
RULES = ((2, 4), (1, 2))  # nm(n, m)
GRID = 4  # cases with a rule draw q and k from {-1, -3/4, ..., 1}: 16-bit exact, exact scores
REORDER_SHARE = 0.2  # groups whose pattern has buckets(), lsh(n, seed) or keep() (all of them groups without a rule)
LSH_SIZES = (2, 4, 8, 16, 32, 64)  # lsh(n): n buckets
TOPK_SHARE = 0.15  # groups whose pattern has a topk_blocks leaf (never with a rule or reordering, which refuse it)
TOPK_KS = (1, 2, 3, 5, 1000)  # topk_blocks(k): 1000 keeps every candidate
INDEX_SHARE = 0.12  # groups whose pattern has a key_indices() leaf (never with reordering, which refuses it)
# Groups whose pattern has a topk(k, scorer) leaf: never with a rule, reordering, topk_blocks or key_indices(), which
# refuse it. Every share is of all groups: rule 0.2, reordering 0.2, topk_blocks 0.15 and topk 0.1 exclude each
# other; key_indices 0.12 goes beside a rule or topk_blocks too; about 0.28 of the groups have none of them.
TOKEN_SHARE = 0.1
# Groups whose calls carry score modifications (softcap, alibi, bias, T5 buckets): never with a rule (its exact
# choice on grid inputs would then depend on rounding the modification); with reordering, a softcap only
# (`REORDER_MOD_SHARE` of those groups: the others read positions, which the sorted tokens' kernels refuse).
MOD_SHARE = 0.15
REORDER_MOD_SHARE = 0.3
# Of the groups with a topk(k) leaf, those whose calls carry modifications that keep every modified score exact in
# fp32 (alibi's slopes 2^-i, a bias and a T5 table of small integers, a scale of 2^-i; no softcap), so that the
# choice still equals the float64 reference's exactly.
TOKEN_MOD_SHARE = 0.4
EXACT_MOD_KINDS = [("alibi",), ("bias",), ("rel_bias",), ("alibi", "rel_bias", "bias")]
TOKEN_SCORERS = ("exact", "lowrank", "indexer")  # topk(k, scorer=None | lowrank() | indexer())
TOKEN_SCORER_WEIGHTS = (4, 3, 3)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_SCORER_INPUTS = ("proj", "index_q", "index_k", "index_w")


@dataclass
class Case:
    seed: int
    pattern: ag.Pattern
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    head_dim: int
    dtype: str  # "fp16" | "bf16"
    storage: str  # one of STORAGES: how q, k, v are laid out in memory
    scale: float | None
    return_lse: bool
    backward: bool
    variant: str  # one of VARIANTS
    document_ids: object = None  # [S] / [B or 1, S] tensor, or a (query, key) pair
    key_lengths: torch.Tensor | None = None
    query_buckets: torch.Tensor | None = None  # [B, Hq, Sq] integers, for buckets()
    key_buckets: torch.Tensor | None = None  # [B, Hkv, Sk]
    query_keep: torch.Tensor | None = None  # [B, Hq, Sq] bool, for keep()
    key_keep: torch.Tensor | None = None  # [B, Hkv, Sk]
    key_indices: torch.Tensor | None = None  # [B, Hkv or Hq, Sq, n] int32 / int64, for key_indices()
    proj: torch.Tensor | None = None  # [D, r] or [Hq, D, r] float, for topk(k, scorer=lowrank())
    index_q: torch.Tensor | None = None  # [B, Sq, Hi, Di] float, for topk(k, scorer=indexer())
    index_k: torch.Tensor | None = None  # [B, Sk, Di]
    index_w: torch.Tensor | None = None  # [B, Sq, Hi]
    score_mod: tuple = ()  # softcap / alibi (slopes on the CPU) / bias() / rel_bias(), passed as `score_mod=`
    bias: torch.Tensor | None = None  # bias()'s call tensor, broadcastable to [B, Hq, Sq, Sk]
    rel_table: torch.Tensor | None = None  # rel_bias()'s [Hq, num_buckets]
    layouts: dict = field(default_factory=dict)  # BlockLayout leaf -> the bool grid it was built from
    notes: tuple[str, ...] = ()  # what was drawn, for coverage checks: "doc:pair", "keylen:0", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def family(self) -> str:
        """The kinds of leaf the pattern reads: affine, layout, documents, key_padding, buckets, lsh, keep, nm,
        topk_blocks, key_indices, topk (top-k by token), joined by +."""
        kinds = {
            P.Affine: "affine",
            P.BlockLayout: "layout",
            P.Documents: "documents",
            P.InDocument: "in_document",
            P.KeyPadding: "key_padding",
            P.Buckets: "buckets",
            P.LSH: "lsh",
            P.Keep: "keep",
            NM: "nm",
            P.TopkBlocks: "topk_blocks",
            P.KeyIndices: "key_indices",
            P.TopkTokens: "topk",
        }
        return "+".join(sorted({kinds.get(type(leaf), type(leaf).__name__) for leaf in self.pattern.leaves()}))

    @property
    def selects(self) -> bool:
        """Whether the pattern has a selection rule (its q and k are then drawn from the grid)."""
        return any(isinstance(leaf, P.Selector) for leaf in self.pattern.leaves())

    @property
    def on_grid(self) -> bool:
        """Whether q and k are drawn from the grid: the pattern chooses keys by their exact scores (a selection rule,
        or a topk(k) leaf, whose scorer inputs are then exact too)."""
        return self.selects or P.token_leaf(self.pattern) is not None

    @property
    def reorders(self) -> bool:
        """Whether the pattern has buckets(), lsh() or keep() (its tokens are then sorted by bucket in a call)."""
        return self.pattern.reorders

    @property
    def scores(self) -> int:
        return self.B * self.Hq * self.Sq * self.Sk

    def repro(self) -> str:
        """The one command line that runs this case again on a GPU."""
        return REPRO.format(seed=self.seed)

    def describe(self) -> str:
        scale = "default" if self.scale is None else f"{self.scale:.6g}"
        extra = []
        if self.document_ids is not None:
            ids = self.document_ids if isinstance(self.document_ids, (tuple, list)) else (self.document_ids,)
            extra.append("document_ids " + " / ".join(f"{tuple(t.shape)} {t.dtype}" for t in ids))
        if self.key_lengths is not None:
            extra.append(f"key_lengths {self.key_lengths.tolist()}")
        if self.score_mod:
            extra.append(f"score_mod {self.score_mod}")
        for name in ("query_buckets", "key_buckets"):
            if (t := getattr(self, name)) is not None:
                distinct = len(torch.unique(t))
                extra.append(f"{name} {t.dtype} {distinct} ids in [{int(t.min())}, {int(t.max())}]")
        for name in ("query_keep", "key_keep"):
            if (t := getattr(self, name)) is not None:
                extra.append(f"{name} {int(t.sum())}/{t.numel()} kept")
        for name in _SCORER_INPUTS:
            if (t := getattr(self, name)) is not None:
                layout = " expanded" if 0 in t.stride() else "" if t.is_contiguous() else " column-major"
                extra.append(f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}{layout}")
        return (
            f"seed={self.seed} pattern={self.pattern!r} B={self.B} Hq={self.Hq} Hkv={self.Hkv} Sq={self.Sq} "
            f"Sk={self.Sk} D={self.head_dim} {self.dtype} storage={self.storage} scale={scale} "
            f"return_lse={self.return_lse} backward={self.backward} variant={self.variant}"
            + "".join(f" {e}" for e in extra)
        )

    def runtime(self, device: torch.device | str = "cpu") -> dict:
        """The call-time keyword arguments (`document_ids=`, `key_lengths=`, `query_buckets=` and `key_buckets=`,
        `query_keep=` and `key_keep=`, `key_indices=`, a topk scorer's `proj=` or `index_q=`, `index_k=`,
        `index_w=`) on `device`: what both `attngen.attention` and `attngen.reference.attention` take (an
        `lsh(n, seed)` leaf needs none: both hash q and k)."""
        rt: dict = {}
        if self.document_ids is not None:
            ids = self.document_ids
            rt["document_ids"] = tuple(t.to(device) for t in ids) if isinstance(ids, tuple) else ids.to(device)
        for name in ("key_lengths", "query_buckets", "key_buckets", "query_keep", "key_keep", "key_indices"):
            if (t := getattr(self, name)) is not None:
                rt[name] = t.to(device)
        for name in _SCORER_INPUTS:  # strides kept (a copy to another device would make them contiguous)
            if (t := getattr(self, name)) is not None:
                rt[name] = t if t.device == torch.device(device) else _moved(t, device)
        return rt

    def mods(self, device: torch.device | str = "cpu") -> tuple:
        """The call's `score_mod=`, alibi's slopes on `device` (what attngen.attention and the reference take)."""
        move = lambda m: ag.alibi(m.slopes.to(device), m.align) if isinstance(m, scoremod.Alibi) else m
        return tuple(move(m) for m in self.score_mod)

    def mod_tensors(self, device: torch.device | str = "cpu") -> dict:
        """The call's `bias=` and `rel_table=` on `device` (those the modifications take)."""
        named = {"bias": self.bias, "rel_table": self.rel_table}
        return {name: t.to(device) for name, t in named.items() if t is not None}

    def mod_structures(self) -> tuple:
        """The modifications' structures as a call binds them (`scoremod.bind`: a bias read in q's dtype or fp32)."""
        q = torch.empty(self.B, self.Hq, self.Sq, self.head_dim, dtype=self.torch_dtype)
        return scoremod.structures(scoremod.bind(self.mods(), q, self.Sk, **self.mod_tensors()))

    def inputs(self, device: torch.device | str, requires_grad: bool = False):
        """(q, k, v, dout, dlse) on `device`, drawn from the seed on the CPU (the same values on every machine).
        q, k, v are laid out as `storage` says; with `requires_grad` they are views of leaves that require grad.
        With a selection rule or a topk(k) leaf, q and k lie on the grid (see the module's docstring)."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + 17)
        q = self._tensor(gen, self.Hq, self.Sq, device, requires_grad, query=True, grid=self.on_grid)
        k = self._tensor(gen, self.Hkv, self.Sk, device, requires_grad, grid=self.on_grid)
        v = self._tensor(gen, self.Hkv, self.Sk, device, requires_grad)
        dout = torch.randn(self.B, self.Hq, self.Sq, self.head_dim, generator=gen).to(device, self.torch_dtype)
        dlse = torch.randn(self.B, self.Hq, self.Sq, generator=gen).to(device)
        return q, k, v, dout, dlse

    def _tensor(self, gen, H: int, S: int, device, requires_grad: bool, query: bool = False, grid: bool = False):
        B, D = self.B, self.head_dim
        storage = "bshd" if self.storage == "expand" and query else self.storage
        shape = {
            "contiguous": (B, H, S, D),
            "bshd": (B, S, H, D),
            "sliced": (B, H, S, D + 8),
            "misaligned": (B, H, S, D + 1),
            "expand": (1, H, S, D),
        }[storage]
        values = (
            torch.randint(-GRID, GRID + 1, shape, generator=gen) / GRID if grid else torch.randn(shape, generator=gen)
        )
        base = values.to(device, self.torch_dtype).requires_grad_(requires_grad)
        if storage == "bshd":
            return base.transpose(1, 2)
        if storage == "sliced":
            return base[..., :D]  # rows 16-byte aligned: used as they are
        if storage == "misaligned":
            return base[..., 1:]  # rows start 2 bytes in: copied before the kernels run
        if storage == "expand":
            return base.expand(B, H, S, D)  # batch stride 0
        return base


# ----------------------------------------------------------------------------------------------- patterns

_OPS = ("<", "<=", ">", ">=", "==", "!=")
_NAMES = dict(zip(("q", "k", "Sq", "Sk"), sp.symbols("q k Sq Sk", integer=True)))  # for sympy input


def _const(g: random.Random, hi: int = 300) -> int:
    return g.choice([0, 1, 2, g.randint(0, 20), g.randint(0, 70), g.randint(0, hi), g.randint(0, 3 * hi)])


def _term(g: random.Random) -> str:
    pieces = []
    for _ in range(g.randint(1, 3)):
        r = g.random()
        if r < 0.45:
            pieces.append(g.choice(["q", "k", "q", "k", "Sq", "Sk"]))
        elif r < 0.65:
            pieces.append(f"{g.choice([2, 3, -1, -2])}*{g.choice(['q', 'k', 'Sk', 'Sq'])}")
        elif r < 0.75:
            pieces.append("(Sk - Sq)")
        else:
            pieces.append(str(_const(g)))
    text = pieces[0]
    for p in pieces[1:]:
        text += g.choice([" + ", " - "]) + p
    return f"-({text})" if g.random() < 0.08 else text


def _sides(g: random.Random) -> tuple[str, str]:
    """Mostly band-like comparisons (masks neither empty nor full), sometimes general affine terms, sometimes floor
    division and remainders by constants (block-diagonal chunks, dilated windows, strided keys)."""
    c = _const(g)
    if g.random() < 0.15:
        return g.choice(
            [
                (f"q // {c % 61 + 4}", f"k // {c % 61 + 4}"),
                (f"(q - k) % {c % 5 + 2}", "0"),
                (f"k % {c % 7 + 2}", str(c % 3)),
                (f"k // {c % 29 + 3}", f"q // {c % 29 + 3} - 1"),
            ]
        )
    return g.choice(
        [
            ("k", f"q + {c}"),
            ("k", f"q - {c}"),
            ("q", str(c)),
            ("k", str(c)),
            ("k - q", str(c - 20)),
            ("2*q", f"k + {c}"),
            ("k", f"q + Sk - Sq - {c}"),
            ("q + k", "Sk"),
            ("3*k", f"2*q - {c}"),
            ("k", f"Sk - {c}"),
            ("q", f"Sq - {c}"),
            ("Sk - k", f"Sq - q + {c}"),
            ("k", "-1*q + 2*Sk - Sq"),
            (_term(g), _term(g)),
            (_term(g), _term(g)),
        ]
    )


def _predicate_text(g: random.Random, depth: int) -> str:
    if depth == 0 or g.random() < 0.5:
        if g.random() < 0.25:  # chained, e.g. 0 <= k - q < 5
            lo, hi = sorted(_const(g) - 10 for _ in range(2))
            middle = g.choice(["k - q", "k", "q", "q - k + Sk - Sq", _term(g)])
            return f"{lo} {g.choice(_OPS)} {middle} {g.choice(_OPS)} {hi}"
        lhs, rhs = _sides(g)
        return f"{lhs} {g.choice(_OPS)} {rhs}"
    a, b = _predicate_text(g, depth - 1), _predicate_text(g, depth - 1)
    return g.choice(["({}) and ({})", "({}) or ({})", "({}) & ({})", "({}) | ({})", "not ({})", "~({})"]).format(a, b)


def _predicate_sympy(g: random.Random, depth: int) -> sp.Basic:
    if depth == 0 or g.random() < 0.5:
        lhs, rhs = (sp.sympify(t, locals=_NAMES) for t in _sides(g))
        return g.choice((sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne))(lhs, rhs)
    a, b = _predicate_sympy(g, depth - 1), _predicate_sympy(g, depth - 1)
    return g.choice([lambda: a & b, lambda: a | b, lambda: ~a, lambda: sp.Or(a, b), lambda: sp.Not(a)])()


class _Builder:
    """Draws a pattern: its recipe (tree, constants, block sizes) from the group's `g`, its data (layout grids)
    from the case's `rng` / `gen`, so that every case of a group has the same structure."""

    def __init__(self, g: random.Random, rng: random.Random, gen: torch.Generator, case: Case):
        self.g, self.rng, self.gen, self.case = g, rng, gen, case
        self.made: list[ag.Pattern] = []  # layout leaves of this case, in recipe order

    def leaf(self) -> ag.Pattern:
        g = self.g
        kind = g.choices(
            ["full", "causal", "window", "local", "prefix", "global", "text", "sympy", "docs", "keylen", "layout"],
            weights=[1, 3, 3, 2, 1, 1, 4, 2, 2, 2, 4],
        )[0]
        align = g.choice(["top_left", "bottom_right"])
        if kind == "full":
            return ag.full()
        if kind == "causal":
            return ag.causal(align=align)
        if kind == "window":
            return ag.sliding_window(max(1, _const(g)), align=align)
        if kind == "local":
            return ag.local(_const(g), _const(g))
        if kind == "prefix":
            return ag.prefix_lm(_const(g))
        if kind == "global":
            return ag.global_tokens(_const(g))
        if kind == "text":
            return ag.predicate(_predicate_text(g, 2))
        if kind == "sympy":
            return ag.predicate(_predicate_sympy(g, 2))
        if kind == "docs":
            # positions within documents (one sequence only): the recipe is drawn for every case of the group
            inner = self.within_document(depth=1) if g.random() < 0.4 else None
            return ag.documents() if inner is None or self.case.Sq != self.case.Sk else ag.in_document(inner)
        if kind == "keylen":
            return ag.key_padding()
        return self.layout()

    def within_document(self, depth: int) -> ag.Pattern:
        """An affine pattern of q and k only (what in_document() takes), from the group's recipe."""
        g = self.g
        if depth and g.random() < 0.4:
            a, b = self.within_document(depth - 1), self.within_document(depth - 1)
            return g.choice([a & b, a | b, ~a])
        c = max(1, _const(g))
        return g.choice(
            [
                ag.causal(),
                ag.sliding_window(c),
                ag.local(_const(g), c),
                ag.prefix_lm(c),
                ag.global_tokens(c),
                ag.predicate(f"q // {c} == k // {c}"),
                ag.predicate(f"(q - k) % {c} == 0"),
            ]
        )

    def layout(self) -> ag.Pattern:
        g, case = self.g, self.case
        if self.made and g.random() < 0.25:  # the same layout again: one slot
            return self.made[g.randrange(len(self.made))]
        bs = g.choice(BLOCK_SIZES)
        per_head = g.random() < 0.4
        density = g.choice([0.0, 1.0, 0.2, 0.5, 0.8, 0.5])
        # data: per case (the grid must cover this case's lengths and heads)
        nbq = math.ceil(case.Sq / bs) + self.rng.choice([0, 0, 0, 1, 2])
        nbk = math.ceil(case.Sk / bs) + self.rng.choice([0, 0, 0, 1, 2])
        heads = (case.Hq,) if per_head else self.rng.choice([(), (), (1,)])
        grid = torch.rand((*heads, nbq, nbk), generator=self.gen) < density
        leaf = ag.block_layout(grid, bs)
        case.layouts.setdefault(leaf, grid)
        self.made.append(leaf)
        return leaf

    def tree(self, depth: int) -> ag.Pattern:
        g = self.g
        if depth == 0 or g.random() < 0.35:
            return self.leaf()
        r = g.random()
        if r < 0.15:
            return ~self.tree(depth - 1)
        parts = [self.tree(depth - 1) for _ in range(g.choice([2, 2, 3]))]
        return functools.reduce(operator.and_ if r < 0.6 else operator.or_, parts)

    # Reordering patterns. `r` is the group's reordering generator (`_reorder`): which leaves and where, the same
    # for every case of the group; lsh's n and seed are the case's own (they do not change the kernels).

    def reordering(self, r: random.Random, depth: int) -> ag.Pattern:
        kinds = r.choices(
            [("buckets",), ("lsh",), ("keep",), ("buckets", "keep"), ("lsh", "keep")], weights=[7, 4, 4, 3, 2]
        )[0]
        form = r.choices(["top", "ranges", "nested", "alone"], weights=[10, 4, 5, 1])[0]
        leaves = [self.reordering_leaf(kind) for kind in kinds]
        if form == "alone":
            return functools.reduce(operator.and_, leaves)
        if form == "nested":  # each leaf somewhere in the tree, under & | ~
            pat = self.tree(depth)
            for leaf in leaves:
                pat = _insert(pat, leaf, r)
            return pat
        parts = [self.linear(r) if form == "ranges" else self.tree(depth), *leaves]
        if form == "top" and r.random() < 0.25:  # packed sequences, hashed (documents & causal & buckets)
            parts.insert(1, ag.documents())
        if r.random() < 0.2:
            r.shuffle(parts)
        return functools.reduce(operator.and_, parts)

    def reordering_leaf(self, kind: str) -> ag.Pattern:
        if kind == "lsh":  # always seeded: the reference hashes q and k itself, with the same seed
            seed = self.rng.choice([0, 1, self.rng.randrange(2**31), self.rng.randrange(2**63)])
            return ag.lsh(self.rng.choice(LSH_SIZES), seed=seed)
        return ag.buckets() if kind == "buckets" else ag.keep()

    def linear(self, r: random.Random) -> ag.Pattern:
        """A conjunction of linear leaves (with a bucket or keep leaf, each query keeps one range of sorted keys:
        `reorder.Route.ranges`)."""
        align = r.choice(["top_left", "bottom_right"])
        c = _const(r)
        options = [
            ag.causal(align=align),
            ag.causal(align=align),
            ag.sliding_window(max(1, c), align=align),
            ag.local(_const(r), _const(r)),
            ag.predicate("k < q"),
            ag.predicate(f"2*k == q + {c % 7}"),
            ag.predicate(f"k >= q - {c}"),
            ag.predicate(f"k <= {c}"),
            ag.key_padding(),
            ag.full(),
        ]
        return functools.reduce(operator.and_, r.sample(options, r.choice([1, 1, 2, 2, 3])))


_WRAPS = (  # subtree s, reordering leaf x
    lambda s, x: s | x,
    lambda s, x: s & ~x,
    lambda s, x: ~(s | x),
    lambda s, x: s & x,
    lambda s, x: ~x | s,
)


def _paths(pat: ag.Pattern, path: tuple[int, ...] = ()):
    """The path (child indices from the root) of every node of `pat`."""
    yield path
    children = pat.parts if isinstance(pat, (P.And, P.Or)) else (pat.part,) if isinstance(pat, P.Not) else ()
    for i, child in enumerate(children):
        yield from _paths(child, (*path, i))


def _replaced(pat: ag.Pattern, path: tuple[int, ...], fn) -> ag.Pattern:
    if not path:
        return fn(pat)
    if isinstance(pat, P.Not):
        return ~_replaced(pat.part, path[1:], fn)
    parts = list(pat.parts)
    parts[path[0]] = _replaced(parts[path[0]], path[1:], fn)
    return functools.reduce(operator.and_ if isinstance(pat, P.And) else operator.or_, parts)


def _insert(pat: ag.Pattern, leaf: ag.Pattern, r: random.Random) -> ag.Pattern:
    """`pat` with one of its subtrees s (the root too) replaced by s | leaf, s & ~leaf, ~(s | leaf), ..."""
    wrap = r.choice(_WRAPS)
    return _replaced(pat, r.choice(list(_paths(pat))), lambda s: wrap(s, leaf))


# ------------------------------------------------------------------------------------------------- shapes


def _length(rng: random.Random, long: bool) -> int:
    if long:
        return rng.choice(LONG_LENGTHS) if rng.random() < 0.6 else rng.randint(513, MAX_LONG)
    r = rng.random()
    if r < 0.45:
        return rng.choice(EDGE_LENGTHS)
    n = rng.randint(1, 512)
    return n | 1 if r < 0.75 else n  # biased to odd


def _shape(rng: random.Random, D: int) -> tuple[int, int, int, int, int]:
    """(B, Hkv, group, Sq, Sk) within the size caps."""
    long = rng.random() < LONG_SHARE
    Sq = _length(rng, long and rng.random() < 0.7)
    Sk = Sq if rng.random() < 0.35 else _length(rng, long)
    if long and max(Sq, Sk) <= 512:  # one of the two at least is long
        Sk = _length(rng, True)
    B, Hkv, group = rng.randint(1, 3), rng.randint(1, 4), rng.choice([1, 1, 2, 3, 4])
    while B * Hkv * group * Sq * Sk > MAX_SCORES or B * Hkv * group * max(Sq, Sk) * D > MAX_INPUT:
        # shrink the largest of batch, kv heads, group; lengths are kept as drawn
        if B >= max(Hkv, group) and B > 1:
            B -= 1
        elif Hkv >= group and Hkv > 1:
            Hkv -= 1
        elif group > 1:
            group -= 1
        else:
            break
    return B, Hkv, group, Sq, Sk


def _doc_ids(rng: random.Random, gen: torch.Generator, rows: int, S: int) -> torch.Tensor:
    shape = (rows, S) if rows else (S,)
    r = rng.random()
    if r < 0.6:  # sorted segments, as packed sequences
        starts = torch.rand(shape, generator=gen) < rng.choice([0.005, 0.02, 0.1, 0.3])
        ids = starts.to(torch.int64).cumsum(-1)
    elif r < 0.9:
        ids = torch.randint(0, rng.choice([1, 2, 4]), shape, generator=gen)
    else:  # negative and large ids are ids too
        ids = torch.randint(-3, 3, shape, generator=gen) * rng.choice([1, 1000003])
    return ids.to(rng.choice([torch.int64, torch.int32]))


def _document_ids(rng, gen, B: int, Sq: int, Sk: int, one: bool = False) -> tuple[object, str]:
    """Ids as one tensor ([S], [B, S] or [1, S], where Sq == Sk) or a (query, key) pair; only one tensor with `one`
    (in_document())."""
    form = rng.choice(["1d", "2d", "2d1", "pair"]) if Sq == Sk else "pair"
    form = rng.choice(["1d", "2d", "2d1"]) if one else form
    if form == "pair":
        rows_q, rows_k = (rng.choice([0, B, 1]) for _ in range(2))
        return (_doc_ids(rng, gen, rows_q, Sq), _doc_ids(rng, gen, rows_k, Sk)), "doc:pair"
    rows = {"1d": 0, "2d": B, "2d1": 1}[form]
    return _doc_ids(rng, gen, rows, Sq), f"doc:{form}"


def _key_lengths(rng: random.Random, B: int, Sk: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    choices = [0, Sk, rng.randint(0, Sk), rng.randint(Sk // 2, Sk), rng.randint(0, Sk), Sk + rng.randint(1, 9)]
    lengths = [rng.choice(choices) for _ in range(B)]
    notes = tuple(f"keylen:{n}" for n, hit in (("0", 0 in lengths), ("Sk", Sk in lengths)) if hit)
    notes += ("keylen:>Sk",) if any(n > Sk for n in lengths) else ()
    return torch.tensor(lengths, dtype=rng.choice([torch.int32, torch.int64])), notes


def _bucket_ids(rng: random.Random, gen: torch.Generator, c: Case) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(query_buckets [B, Hq, Sq], key_buckets [B, Hkv, Sk], notes): one bucket, a few, a few dozen, every token
    its own (a permutation, or the position itself), or sorted runs; then mapped alike on both sides to other int32
    values (negative ones, the extremes); per head or one row shared by every head (a stride-0 view)."""
    form = rng.choices(["one", "few", "many", "distinct", "runs"], weights=[1, 4, 3, 2, 2])[0]
    n = {"one": 1, "few": rng.randint(2, 6), "many": rng.randint(7, 40)}.get(form, 0)
    shared = rng.random() < 0.2

    def ids(H: int, S: int) -> torch.Tensor:
        shape = (c.B, 1 if shared else H, S)
        if form == "distinct":
            out = torch.rand(shape, generator=gen).argsort(-1) if rng.random() < 0.7 else torch.arange(S).expand(shape)
        elif form == "runs":  # contiguous runs of one bucket, as chunked sequences: already sorted
            out = (torch.arange(S) * rng.randint(1, 30) // S).expand(shape)
        else:  # sometimes a few ids more on one side: buckets the other side lacks
            out = torch.randint(0, n + rng.choice([0, 0, 0, 1, 3]), shape, generator=gen)
        return out.expand(c.B, H, S) if shared else out

    qb, kb = ids(c.Hq, c.Sq), ids(c.Hkv, c.Sk)
    notes = [f"buckets:{form}"] + ["buckets:shared"] * shared
    qb, kb = _map_ids(rng, qb, kb)
    if min(int(qb.min()), int(kb.min())) < 0:
        notes.append("buckets:negative")
    if {INT32_MIN, INT32_MAX} & {int(qb.min()), int(kb.min()), int(qb.max()), int(kb.max())}:
        notes.append("buckets:extreme")
    qb, kb = (t.to(rng.choice([torch.int64, torch.int32])) for t in (qb, kb))
    notes += [f"buckets:{str(t.dtype).removeprefix('torch.')}" for t in (qb, kb)]
    return qb, kb, notes


def _map_ids(rng: random.Random, qb: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' ids (0 .. a few thousand) through one injective map to int32 values: kept, negated, shifted to
    either end of int32 (the high end reversing their order), spread, or through a table of distinct values that
    holds the extremes, -1 and 0."""
    top = max(int(qb.max()), int(kb.max()))
    how = rng.choices(["kept", "negated", "low", "high", "spread", "table"], weights=[6, 2, 1, 1, 1, 1])[0]
    if how == "table" and top < 64:
        values = [INT32_MIN, INT32_MAX, -1, 0, 1]
        while len(values) <= top:
            values = list(dict.fromkeys([*values, rng.randint(INT32_MIN, INT32_MAX)]))
        rng.shuffle(values)
        table = torch.tensor(values[: top + 1], dtype=torch.int64)
        return table[qb], table[kb]
    offset = rng.choice([0, 1, 1000])
    f = {
        "negated": lambda x: -x - offset,
        "low": lambda x: x + INT32_MIN,
        "high": lambda x: INT32_MAX - x,
        "spread": lambda x: x * 600_000 - 2**30,
    }.get(how, lambda x: x)
    return f(qb.to(torch.int64)), f(kb.to(torch.int64))


def _keep_masks(rng: random.Random, gen: torch.Generator, c: Case) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(query_keep [B, Hq, Sq], key_keep [B, Hkv, Sk], notes): each side at a rate of its own (0 and 1 among them),
    every query or every key dropped, none dropped, or kept prefixes of random lengths per row (as padding)."""
    form = rng.choices(["rates", "queries dropped", "keys dropped", "none dropped", "prefixes"], [6, 1, 1, 1, 1])[0]

    def flags(H: int, S: int, dropped: bool) -> torch.Tensor:
        if form == "prefixes":
            return torch.arange(S) < torch.randint(0, S + 1, (c.B, H, 1), generator=gen)
        rate = rng.choice([0.0, 1.0, 0.1, 0.5, 0.9, rng.random()]) if form == "rates" else float(not dropped)
        return torch.rand(c.B, H, S, generator=gen) < rate

    qk, kk = flags(c.Hq, c.Sq, form == "queries dropped"), flags(c.Hkv, c.Sk, form == "keys dropped")
    notes = [f"keep:{form}"]
    for side, kept in (("query", qk), ("key", kk)):
        notes.append(f"keep:{side} " + ("all dropped" if not kept.any() else "none dropped" if kept.all() else "some"))
    return qk, kk, notes


def _rule(seed: int) -> NM | None:
    """The selection rule of the seed's group, or None. Drawn from a generator of its own: a group's positional
    recipe is the same with or without a rule."""
    g = random.Random(f"attngen-fuzz-rule-{seed // GROUP}")
    return ag.nm(*g.choice(RULES)) if g.random() < RULE_SHARE else None


def _reorder(seed: int) -> random.Random | None:
    """The generator of the seed's group's reordering recipe (which of buckets(), lsh(), keep() and where), or None:
    a generator of its own, as the rule's, so that the group's other draws are the same with or without them. Never
    with a selection rule (the pair is refused); REORDER_SHARE of all groups."""
    if _rule(seed) is not None:
        return None
    g = random.Random(f"attngen-fuzz-reorder-{seed // GROUP}")
    return g if g.random() < REORDER_SHARE / (1 - RULE_SHARE) else None


def _topk(seed: int) -> random.Random | None:
    """The generator of the seed's group's block top-k recipe (k, block, where the leaf goes), or None: never with
    a rule or reordering; TOPK_SHARE of all groups."""
    if _rule(seed) is not None or _reorder(seed) is not None:
        return None
    g = random.Random(f"attngen-fuzz-topk-{seed // GROUP}")
    return g if g.random() < TOPK_SHARE / (1 - RULE_SHARE - REORDER_SHARE) else None


def _with_topk(pat: ag.Pattern, t: random.Random, builder: _Builder) -> ag.Pattern:
    """`pat` with a topk_blocks leaf: on top (`pat & topk`), beside another subtree under | (`pat & (topk | s)`, NSA's
    form; `documents() & (topk | pat)`), at the top of a | (`topk | pat`: its context is then every key), or
    alone."""
    leaf = ag.topk_blocks(t.choice(TOPK_KS), block=t.choice(P.TOPK_BLOCK_SIZES))
    form = t.choices(["and", "and-or", "documents", "or", "alone"], weights=[4, 3, 2, 2, 2])[0]
    if form == "and":
        return pat & leaf
    if form == "and-or":
        return pat & (leaf | builder.tree(1))
    if form == "documents":  # packed sequences: the blocks compete within the query's documents
        return ag.documents() & (leaf | pat)
    return leaf | pat if form == "or" else leaf


def _indexed(seed: int) -> random.Random | None:
    """The generator of the seed's group's key-index recipe (where the leaf goes), or None: never with reordering;
    INDEX_SHARE of all groups."""
    if _reorder(seed) is not None:
        return None
    g = random.Random(f"attngen-fuzz-indices-{seed // GROUP}")
    return g if g.random() < INDEX_SHARE / (1 - REORDER_SHARE) else None


def _with_indices(pat: ag.Pattern, t: random.Random, builder: _Builder) -> ag.Pattern:
    """`pat` with a key_indices() leaf: on top, beside another subtree under |, complemented, at the top of a |."""
    leaf = ag.key_indices()
    form = t.choices(["and", "and-or", "not", "or"], weights=[4, 3, 2, 2])[0]
    if form == "and":
        return pat & leaf
    if form == "and-or":
        return pat & (leaf | builder.tree(1))
    return pat & ~leaf if form == "not" else leaf | pat


def _key_lists(rng: random.Random, gen: torch.Generator, c: Case) -> tuple[torch.Tensor, list[str]]:
    """[B, Hkv or Hq, Sq, n]: random keys (duplicates, -1 padding and entries past Sk among them), runs of
    consecutive keys (clustered, as block selections), every key, or nothing; int32 or int64."""
    form = rng.choices(["random", "runs", "every", "none"], weights=[6, 3, 1, 1])[0]
    heads = c.Hkv if rng.random() < 0.6 else c.Hq
    n = {"every": c.Sk, "none": rng.choice([0, 3])}.get(form, rng.choice([1, 3, 16, 64]))
    shape = (c.B, heads, c.Sq, n)
    if form == "random":
        idx = torch.randint(-2, c.Sk + 3, shape, generator=gen)
    elif form == "runs":
        start = torch.randint(0, max(c.Sk, 1), (c.B, heads, c.Sq, 1), generator=gen)
        idx = start + torch.arange(n)
    elif form == "every":
        idx = torch.arange(n).expand(shape)
    else:
        idx = torch.full(shape, -1)
    notes = [f"indices:{form}", "indices:per query head" if heads != c.Hkv or c.Hq == c.Hkv else "indices:shared"]
    return idx.to(rng.choice([torch.int32, torch.int64])), notes


def _tokens(seed: int) -> random.Random | None:
    """The generator of the seed's group's top-k-by-token recipe (the scorer, where the leaf goes), or None: never
    with a rule, reordering, topk_blocks or key_indices(); TOKEN_SHARE of all groups (the others' draws are left as
    they are: this one divides what they leave)."""
    if any(f(seed) is not None for f in (_rule, _reorder, _topk, _indexed)):
        return None
    g = random.Random(f"attngen-fuzz-tokens-{seed // GROUP}")
    free = (1 - RULE_SHARE - REORDER_SHARE - TOPK_SHARE) * (1 - INDEX_SHARE / (1 - REORDER_SHARE))
    return g if g.random() < TOKEN_SHARE / free else None


def _mods(seed: int) -> random.Random | None:
    """The generator of the seed's group's score modifications, or None (MOD_SHARE of the groups it may take
    besides those with a topk(k) leaf or reordering; TOKEN_MOD_SHARE of the first, exact ones, REORDER_MOD_SHARE of
    the others, a softcap: `_draw_mods`)."""
    if _rule(seed) is not None:
        return None
    if _reorder(seed) is not None:
        g = random.Random(f"attngen-fuzz-reorder-mods-{seed // GROUP}")
        return g if g.random() < REORDER_MOD_SHARE else None
    if _tokens(seed) is not None:
        g = random.Random(f"attngen-fuzz-token-mods-{seed // GROUP}")
        return g if g.random() < TOKEN_MOD_SHARE else None
    g = random.Random(f"attngen-fuzz-mods-{seed // GROUP}")
    return g if g.random() < MOD_SHARE / (1 - RULE_SHARE - REORDER_SHARE - TOKEN_SHARE) else None


MOD_KINDS = [
    ("softcap",),
    ("alibi",),
    ("alibi", "softcap"),
    ("softcap", "alibi"),
    ("bias",),
    ("rel_bias",),
    ("bias", "softcap"),
    ("softcap", "bias"),
    ("alibi", "rel_bias", "bias"),
]
BIAS_SHAPES = ("full", "heads", "plane", "keys", "rows")


def _draw_mods(g: random.Random, Hq: int, exact: bool = False, softcap_only: bool = False) -> tuple:
    """softcap (a cap that bites or not), alibi (slopes 2^-i, either alignment), bias(), T5's rel_bias (buckets
    both ways), alone or combined in either order (`MOD_KINDS`; `exact`: no softcap, `EXACT_MOD_KINDS`;
    `softcap_only`: a softcap); the tensors are the case's (`_mod_tensors`)."""
    kinds = ("softcap",) if softcap_only else g.choice(EXACT_MOD_KINDS if exact else MOD_KINDS)
    slopes = torch.tensor([2.0 ** -g.randint(0, 6) for _ in range(Hq)])
    made = {
        "softcap": lambda: ag.softcap(g.choice([0.5, 2.0, 5.0, 30.0])),
        "alibi": lambda: ag.alibi(slopes, g.choice(["top_left", "bottom_right"])),
        "bias": ag.bias,
        "rel_bias": lambda: ag.rel_bias(*g.choice([(32, 128, True), (8, 20, False), (16, 40, True)])),
    }
    return tuple(made[kind]() for kind in kinds)


def _mod_tensors(rng: random.Random, gen: torch.Generator, c: Case, exact: bool = False) -> list[str]:
    """A bias() of one of BIAS_SHAPES (every broadcast; finite: a row the bias alone empties has no float64
    gradient to compare with), in q's dtype or fp32; rel_bias()'s table. `exact`: both of small integers."""
    notes = []
    if any(isinstance(m, scoremod.Bias) for m in c.score_mod):
        shape = rng.choice(BIAS_SHAPES)
        dims = {
            "full": (c.B, c.Hq, c.Sq, c.Sk),
            "heads": (1, c.Hq, c.Sq, c.Sk),
            "plane": (c.Sq, c.Sk),
            "keys": (c.B, 1, 1, c.Sk),
            "rows": (c.B, c.Hq, c.Sq, 1),
        }[shape]
        dtype = rng.choice([c.torch_dtype, torch.float32])
        if exact:
            c.bias = torch.randint(-2, 3, dims, generator=gen).to(dtype)
        else:
            c.bias = (torch.randn(*dims, generator=gen) * rng.choice([0.5, 3.0])).to(dtype)
        notes.append(f"bias:{shape}:{'input' if dtype == c.torch_dtype else 'float32'}")
    for m in c.score_mod:
        if isinstance(m, scoremod.RelBias):
            if exact:
                c.rel_table = torch.randint(-3, 4, (c.Hq, m.num_buckets), generator=gen).float()
            else:
                c.rel_table = torch.randn(c.Hq, m.num_buckets, generator=gen) * 2
            notes.append(f"rel_bias:{m.num_buckets}")
    return notes


def _with_tokens(pat: ag.Pattern, t: random.Random, builder: _Builder) -> ag.Pattern:
    """`pat` with a topk(k, scorer) leaf: on top (`pat & topk`), beside another subtree under | (`pat & (topk |
    s)`; `documents() & (topk | pat)`), at the top of a | (`topk | pat`: its context is then every key), alone, or
    wrapped around a subtree anywhere outside ~ (`s & topk`, `s | topk`: its context is what the enclosing &s
    allow). The scorer and the place are the group's; k is the case's own (data: one structure for every k), from
    1 to past every key."""
    scorer = {"exact": None, "lowrank": ag.lowrank(), "indexer": ag.indexer()}[
        t.choices(TOKEN_SCORERS, weights=TOKEN_SCORER_WEIGHTS)[0]
    ]
    form = t.choices(["and", "and-or", "documents", "or", "alone", "nested"], weights=[4, 3, 2, 2, 1, 2])[0]
    wrap = t.choice([operator.and_, operator.or_])
    path = t.choice(list(_open_paths(pat)))
    rng, Sk = builder.rng, builder.case.Sk
    ks = [1, rng.randint(2, 3), rng.randint(4, 64), rng.randint(1, max(1, Sk)), Sk, Sk + rng.randint(1, 9), 1 << 20]
    k = rng.choices(ks, weights=[3, 2, 4, 3, 1, 1, 1])[0]  # from 1 to past every key (then all candidates kept)
    leaf = ag.topk(k, scorer=scorer)
    if form == "and":
        return pat & leaf
    if form == "and-or":
        return pat & (leaf | builder.tree(1))
    if form == "documents":  # packed sequences: the keys compete within the query's documents
        return ag.documents() & (leaf | pat)
    if form == "nested":
        return _replaced(pat, path, lambda s: wrap(s, leaf))
    return leaf | pat if form == "or" else leaf


def _open_paths(pat: ag.Pattern, path: tuple[int, ...] = ()):
    """The path of every node of `pat` outside ~ (where a top-k leaf may go)."""
    yield path
    if isinstance(pat, (P.And, P.Or)):
        for i, child in enumerate(pat.parts):
            yield from _open_paths(child, (*path, i))


def _grid(gen: torch.Generator, shape: tuple[int, ...], low: int = -GRID) -> torch.Tensor:
    """Quarters from low / GRID to 1 (as q and k with a rule): exact in every float dtype, exact products."""
    return torch.randint(low, GRID + 1, shape, generator=gen) / GRID


def _laid_out(rng: random.Random, t: torch.Tensor, notes: list[str], name: str) -> torch.Tensor:
    """`t` as given (contiguous), with its last two dimensions in column-major order, or (its values taken from
    batch 0) expanded over the batch: a stride-0 view."""
    how = rng.choices(["contiguous", "column-major", "expanded"], weights=[6, 1, 1])[0]
    if how == "expanded" and t.shape[0] > 1:
        notes.append(f"{name}:expanded")
        return t[:1].expand(t.shape)
    if how == "column-major" and t.dim() >= 2:
        notes.append(f"{name}:column-major")
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _moved(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device` with its layout: stride-0 dimensions stay expanded (`.to` keeps a dense tensor's strides)."""
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
    return t[index].to(device).expand(t.shape)


def _scorer_inputs(rng: random.Random, gen: torch.Generator, c: Case, leaf: P.TopkTokens) -> list[str]:
    """A topk leaf's call-time tensors, set on `c` (its notes returned). Every score is exact in fp32 and float64
    alike, so that the call's fp32 choice and the reference's float64 one rank keys the same way (exact ties go to
    the lower key in both): with q and k on the grid of quarters, lowrank()'s proj= [D, r] or [Hq, D, r] holds
    -1, 0, 1 times a power of two (sparse as DSA's, dense signs, or all 0: every key tied), r at most 2^20 / D^2 (so
    that (qP)·(kP), a multiple of 1/16 times the scale squared, stays below 2^24 units); indexer()'s index_q=
    [B, Sq, Hi, Di] and index_k= [B, Sk, Di] are quarters (fp16, bf16 or fp32, mixed sometimes), index_w=
    [B, Sq, Hi] quarters (any sign, or nonnegative) times a power of two, Hi * Di at most 64 * 128."""
    notes = [f"tokens:k={'1' if leaf.k == 1 else '>=Sk' if leaf.k >= c.Sk else 'some'}"]
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if isinstance(leaf.scorer, P.LowRank):
        D = c.head_dim
        r = rng.choice([r for r in (1, 2, 3, 8, 16, 32, 64) if r * D * D <= 1 << 20])
        per_head = rng.random() < 0.4
        form = rng.choices(["sparse", "signs", "zero"], weights=[5, 4, 1])[0]
        u = torch.rand((c.Hq, D, r) if per_head else (D, r), generator=gen)
        if form == "sparse":  # DSA's: -1, 0, +1 with probabilities 1/6, 2/3, 1/6
            p = (u < 1 / 6).float() - (u >= 5 / 6).float()
        else:
            p = torch.where(u < 0.5, -1.0, 1.0) * (form == "signs")
        p = p * 2.0 ** rng.choice([0, 0, -2, 1, 3])
        c.proj = p.to(rng.choices(floats, weights=[6, 1, 1, 1])[0])
        return [*notes, f"tokens:lowrank {'[Hq, D, r]' if per_head else '[D, r]'}", f"proj:{form}"]
    if isinstance(leaf.scorer, P.Indexer):
        Hi, Di = rng.choice([1, 2, 4, 8, 16, 64]), rng.choice([1, 8, 16, 32, 48, 64, 128])
        while Hi > 1 and c.B * c.Sq * c.Sk * Hi > MAX_SCORES:  # the reference's float64 logits, [B, Sq Hi, Sk]
            Hi //= 2
        while Di > 1 and c.B * max(c.Sq, c.Sk) * Hi * Di > MAX_INPUT:
            Di //= 2
        pair = rng.choices(["same", "mixed"], weights=[4, 1])[0]
        dq = rng.choice(floats[:3])
        dk = dq if pair == "same" else rng.choice([d for d in floats[:3] if d != dq])
        c.index_q = _laid_out(rng, _grid(gen, (c.B, c.Sq, Hi, Di)).to(dq), notes, "index_q")
        c.index_k = _laid_out(rng, _grid(gen, (c.B, c.Sk, Di)).to(dk), notes, "index_k")
        sign = rng.choice(["any", "nonnegative"])
        w = _grid(gen, (c.B, c.Sq, Hi), low=-GRID if sign == "any" else 0) * 2.0 ** rng.choice([0, 0, -3, 2])
        c.index_w = _laid_out(rng, w.to(rng.choices(floats[:3], weights=[4, 1, 1])[0]), notes, "index_w")
        return [*notes, "tokens:indexer", f"index:{pair} dtypes", f"index_w:{sign}"]
    return [*notes, "tokens:exact"]


# ------------------------------------------------------------------------------------------------ the case


@functools.lru_cache(maxsize=512)
def case(seed: int) -> Case:
    """The fuzz case of `seed` (cached: treat it as read-only)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    g = random.Random(f"attngen-fuzz-group-{seed // GROUP}")  # recipe, head dim, dtype, variant
    rng = random.Random(f"attngen-fuzz-case-{seed}")  # shapes, data, inputs
    gen = torch.Generator().manual_seed(seed)
    D = g.choices(HEAD_DIMS, weights=HEAD_DIM_WEIGHTS)[0]
    dtype = g.choice(list(DTYPES))
    variant = "mma_sync" if g.random() < 0.15 else "auto"
    depth = g.randint(1, 3)
    B, Hkv, group, Sq, Sk = _shape(rng, D)
    storage = rng.choices(STORAGES, weights=STORAGE_WEIGHTS)[0]
    if storage == "expand" and B == 1:
        storage = "contiguous"
    r = rng.random()
    scale = None if r < 0.7 else rng.choice([rng.uniform(0.01, 0.3), 1.0 / D, 0.5 / math.sqrt(D), 0.25])
    c = Case(
        seed=seed,
        pattern=ag.full(),
        B=B,
        Hq=Hkv * group,
        Hkv=Hkv,
        Sq=Sq,
        Sk=Sk,
        head_dim=D,
        dtype=dtype,
        storage=storage,
        scale=scale,
        return_lse=rng.random() < 0.6,
        backward=rng.random() < 0.35,
        variant=variant,
    )
    builder = _Builder(g, rng, gen, c)
    reordering = _reorder(seed)
    c.pattern = builder.tree(depth) if reordering is None else builder.reordering(reordering, depth)
    if (rule := _rule(seed)) is not None:
        c.pattern = c.pattern & rule
    if (indexed := _indexed(seed)) is not None:
        c.pattern = _with_indices(c.pattern, indexed, builder)
    if (topk := _topk(seed)) is not None:
        c.pattern = _with_topk(c.pattern, topk, builder)
    if (tokens := _tokens(seed)) is not None:
        c.pattern = _with_tokens(c.pattern, tokens, builder)
    need = c.pattern.runtime_inputs
    notes: list[str] = []
    if "document_ids" in need:
        c.document_ids, note = _document_ids(rng, gen, B, Sq, Sk, one=P.reads_document_offsets(c.pattern))
        notes.append(note)
    if "key_lengths" in need:
        c.key_lengths, more = _key_lengths(rng, B, Sk)
        notes += more
    if "query_buckets" in need:
        c.query_buckets, c.key_buckets, more = _bucket_ids(rng, gen, c)
        notes += more
    if "query_keep" in need:
        c.query_keep, c.key_keep, more = _keep_masks(rng, gen, c)
        notes += more
    if "key_indices" in need:
        c.key_indices, more = _key_lists(rng, gen, c)
        notes += more
    if (leaf := P.token_leaf(c.pattern)) is not None:
        notes += _scorer_inputs(rng, gen, c, leaf)
    if (m := _mods(seed)) is not None:
        exact = leaf is not None  # top-k by token ranks the modified scores: exact ones, at a scale of 2^-i
        c.score_mod = _draw_mods(m, c.Hq, exact, softcap_only=c.reorders)
        notes.append("mods:" + "+".join(type(x).__name__.lower() for x in c.score_mod))
        notes += _mod_tensors(rng, gen, c, exact)
        if exact:
            c.scale = rng.choice([0.25, 0.125, 0.0625])
    c.notes = tuple(notes)
    return c


def selection_errors(grid: torch.Tensor, q: torch.Tensor, k: torch.Tensor, pat: ag.Pattern, runtime: dict) -> list[str]:
    """How a call's block top-k selection (bool [B, Hq, nbq, nbk]) differs from the float64 one of the reference
    on the same q, k, beyond near-ties (rows whose swapped blocks score within 1e-3 of the row's largest |score|)."""
    from attngen import blocktopk

    leaf = P.topk_leaf(pat)
    Sq, Sk = q.shape[2], k.shape[2]
    context = P.dense_mask(P.context_of(pat, leaf), Sq, Sk, device=q.device, **runtime)
    cand = blocktopk.candidates_of(context, leaf.block, Sq, Sk)
    scores = blocktopk.block_scores(q.detach(), k.detach(), leaf.block, torch.float64)
    want = blocktopk.choose(scores, cand, leaf.k)
    if grid.shape != want.shape:
        return [f"selection shape {tuple(grid.shape)}, expected {tuple(want.shape)}"]
    scores = scores.masked_fill(~cand.expand(scores.shape), -math.inf)
    errors = []
    for row in (grid != want).any(-1).nonzero().tolist():
        s, swapped = scores[tuple(row)], scores[tuple(row)][grid[tuple(row)] != want[tuple(row)]]
        top = s[torch.isfinite(s)].abs().max() if torch.isfinite(s).any() else 0.0
        if not torch.isfinite(swapped).all() or swapped.max() - swapped.min() > 1e-3 * top:
            errors.append(f"selection of (b, h, query block) {tuple(row)} differs beyond a near-tie")
    return errors


def cases(first: int, count: int):
    """Cases first .. first + count - 1."""
    return (case(s) for s in range(first, first + count))
