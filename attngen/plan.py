"""Stage 2: Pattern + problem (dtype, head dim, arch) -> KernelPlan. Pure: no GPU, no sequence lengths.

A plan fixes the tile shapes, warps and pipeline depth of the forward and backward kernels, the C expression
evaluated on partial tiles, and the run-time arguments (layout tensors, document ids, key lengths) that follow
the fixed argument prefix of docs/design.md. Which tiles are full / partial / empty is a per-length question,
answered by `schedule.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy as sp
from sympy.printing.c import ccode

from . import pattern as P
from .errors import InputError

DTYPES = ("fp16", "bf16")
HEAD_DIMS = (32, 64, 96, 128, 256)
ELEM_BYTES = 2
SMEM_LIMIT = 227 * 1024  # dynamic shared memory a block may have on sm_80 and sm_90


@dataclass(frozen=True)
class RuntimeArg:
    name: str
    ctype: str


@dataclass(frozen=True)
class Tiles:
    """One kernel's tiling: BLOCK_M query rows x BLOCK_N keys per step, `warps` warps, K/V pipeline depth."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    smem_bytes: int
    m_tiles: int = 1  # m16 tiles per warp (forward): each K/V fragment read from shared memory feeds m_tiles mmas
    q_in_regs: bool = False  # forward: Q fragments held in registers rather than re-read per key tile
    min_blocks: int = 1  # __launch_bounds__ occupancy hint
    consumers: int = 0  # sm_90a kernels: wgmma warpgroups of 64 rows fed by a TMA producer warpgroup; 0: mma.sync
    q_buffers: int = 1  # sm_90a forward: Q tiles in flight (persistent blocks load the next item's during this one)

    @property
    def wgmma(self) -> bool:
        return self.consumers > 0

    def __str__(self) -> str:
        size = f"BLOCK_M {self.block_m} x BLOCK_N {self.block_n}"
        smem = f"{self.smem_bytes / 1024:.0f} KiB shared memory"
        if self.wgmma:
            return f"{size}, {self.consumers} wgmma warpgroups + a TMA producer, {self.stages}-stage K/V ring, {smem}"
        q = ", Q fragments in registers" if self.q_in_regs else ""
        return f"{size}, {self.warps} warps{q}, {self.stages}-stage cp.async pipeline, {smem}"


@dataclass(frozen=True)
class KernelPlan:
    pattern: P.Pattern
    dtype: str  # "fp16" | "bf16"
    head_dim: int
    arch: str
    fwd: Tiles
    bwd: Tiles  # dK/dV kernel: BLOCK_N keys per block, BLOCK_M queries per step
    dq: Tiles  # dQ kernel: BLOCK_M queries per block, BLOCK_N keys per step (forward schedule shape)
    mask_c: str  # C boolean expression over b, h, q, k, Sq, Sk and the run-time arguments
    branch_free: bool  # the mask only compares positions (no loads): bitwise & | and a fully unrolled evaluation
    runtime_args: tuple[RuntimeArg, ...]
    layouts: tuple[P.BlockLayout, ...]  # distinct block layouts, in argument order

    @property
    def name(self) -> str:
        """Readable prefix of cache keys, e.g. `causal_bf16_hd64`."""
        kinds = sorted({type(leaf).__name__.lower() for leaf in self.pattern.leaves()})
        stem = "dense" if self.is_dense else "_".join(kinds)
        return f"{stem}_{self.dtype}_hd{self.head_dim}"

    @property
    def is_dense(self) -> bool:
        return self.mask_c == "true"

    @property
    def keep_c(self) -> str:
        """Whether element (q, k) of a partial tile is kept: the mask, guarded so that positions past Sq or Sk are
        never kept and never index the run-time tensors."""
        if self.branch_free:
            return f"(q < Sq) & (k < Sk) & ({self.mask_c})"
        return f"q < Sq && k < Sk && ({self.mask_c})"

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes of the pattern's layouts: tiles that divide them are never partial."""
        return tuple(leaf.block_size for leaf in self.layouts)

    def __str__(self) -> str:
        args = ", ".join(f"{a.ctype} {a.name}" for a in self.runtime_args) or "none"
        return "\n".join(
            [
                f"KernelPlan for {self.pattern!r}",
                f"  problem   {self.dtype}, head_dim {self.head_dim}, {self.arch}",
                f"  forward   {self.fwd}",
                f"  dK/dV     {self.bwd}",
                f"  dQ        {self.dq}",
                f"  mask      evaluated on partial tiles only: {self.mask_c}",
                "  tiles     full tiles run with no mask, empty tiles are never visited (see Schedule)",
                f"  run-time  {args}",
            ]
        )


# -------------------------------------------------------------------------------------------- affine atoms


@dataclass(frozen=True)
class LinearAtom:
    """`coef · (q, k, Sq, Sk) + const  (>= | == | !=)  0` with integer coefficients."""

    coef: tuple[int, int, int, int]
    const: int
    op: str  # "ge" | "eq" | "ne"


def linear_atom(rel: sp.Rel) -> LinearAtom:
    """Normalise an affine comparison over the integers to one of `L >= 0`, `L == 0`, `L != 0`."""
    syms = (P.q, P.k, P.Sq, P.Sk)
    diff = sp.expand(rel.lhs - rel.rhs)
    poly = sp.Poly(diff, *syms)
    coeffs = [sp.Rational(poly.coeff_monomial(s)) for s in syms]
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


# --------------------------------------------------------------------------------------------- C lowering


# C operators for & and |: short-circuit where a later operand may load memory that an earlier one guards,
# bitwise (no branches, a select per element) where every operand is a comparison.
GUARDED, BRANCH_FREE = (" && ", " || "), (" & ", " | ")


def _affine_c(e: sp.Basic, ops: tuple[str, str]) -> str:
    if e is sp.true or e is sp.false:
        return str(bool(e)).lower()
    if isinstance(e, (sp.And, sp.Or)):
        joint = ops[0] if isinstance(e, sp.And) else ops[1]
        return joint.join(f"({_affine_c(a, ops)})" for a in e.args)
    if isinstance(e, sp.Not):
        return f"!({_affine_c(e.args[0], ops)})"
    diff = sp.expand(e.lhs - e.rhs)
    if all(c.is_integer for c in sp.Poly(diff, P.q, P.k, P.Sq, P.Sk).coeffs()):
        return ccode(e)
    a = linear_atom(e)
    lin = " + ".join(f"{c}*{s}" for c, s in zip(a.coef, ("q", "k", "Sq", "Sk")) if c) or "0"
    return f"{lin} + {a.const} {dict(ge='>=', eq='==', ne='!=')[a.op]} 0"


def _lower(pat: P.Pattern, layouts: list[P.BlockLayout], ops: tuple[str, str]) -> str:
    """C text of the pattern; collects distinct block layouts (their index names their arguments)."""
    if isinstance(pat, (P.And, P.Or)):
        joint = ops[0] if isinstance(pat, P.And) else ops[1]
        return joint.join(f"({_lower(p, layouts, ops)})" for p in pat.parts)
    if isinstance(pat, P.Not):
        return f"!({_lower(pat.part, layouts, ops)})"
    if isinstance(pat, P.Affine):
        return _affine_c(pat.expr, ops)
    if isinstance(pat, P.Documents):
        return "qdoc[b * qdoc_sb + q] == kdoc[b * kdoc_sb + k]"
    if isinstance(pat, P.KeyPadding):
        return "k < key_len[b]"
    if isinstance(pat, P.BlockLayout):
        if pat not in layouts:
            layouts.append(pat)
        n, bs = layouts.index(pat), pat.block_size
        return f"layout{n}[h * layout{n}_sh + (q / {bs}) * layout{n}_nk + k / {bs}] != 0"
    raise InputError(f"unknown pattern node {pat!r}")


def _runtime_args(pat: P.Pattern, layouts: list[P.BlockLayout]) -> tuple[RuntimeArg, ...]:
    args: list[RuntimeArg] = []
    for n in range(len(layouts)):
        args += [
            RuntimeArg(f"layout{n}", "const unsigned char* __restrict__"),
            RuntimeArg(f"layout{n}_sh", "long long"),
            RuntimeArg(f"layout{n}_nk", "int"),
        ]
    if "document_ids" in pat.runtime_inputs:
        args += [
            RuntimeArg("qdoc", "const int* __restrict__"),
            RuntimeArg("qdoc_sb", "long long"),
            RuntimeArg("kdoc", "const int* __restrict__"),
            RuntimeArg("kdoc_sb", "long long"),
        ]
    if "key_lengths" in pat.runtime_inputs:
        args.append(RuntimeArg("key_len", "const int* __restrict__"))
    return tuple(args)


# ---------------------------------------------------------------------------------------------- tiling


def _smem(block_m: int, block_n: int, d: int, stages: int) -> int:
    row = (d + 8) * ELEM_BYTES  # rows padded by 16 bytes: ldmatrix and cp.async free of bank conflicts
    return block_m * row + stages * 2 * block_n * row


# head_dim -> (BLOCK_N, warps, m16 tiles per warp, Q in registers). Two m16 tiles per warp halve the shared-memory
# reads per mma, which otherwise bound the kernel; head_dim 128+ re-reads Q to stay within 255 registers.
FORWARD_CONFIGS = {
    32: (64, 4, 2, True),
    64: (64, 4, 2, True),
    96: (32, 4, 2, False),
    128: (32, 4, 2, False),
    256: (32, 4, 1, False),
}


def forward_tiles(d: int, lean: int = 0) -> Tiles:
    """mma.sync forward tiling. `lean` 1 re-reads Q from shared memory instead of holding it in registers; 2 also
    gives each warp one m16 tile instead of two. Masks with much per-element code need the leaner forms to fit 255
    registers without spilling (see `launch.get_kernel`)."""
    bn, warps, mt, q_regs = FORWARD_CONFIGS[d]
    mt = 1 if lean >= 2 else mt
    bm = 16 * mt * warps
    return Tiles(bm, bn, warps, 2, _smem(bm, bn, d, 2), m_tiles=mt, q_in_regs=q_regs and lean == 0)


# head_dim -> (consumer warpgroups, BLOCK_N, stages of each of the K and V rings) of the sm_90a forward. The
# producer warpgroup gives its registers to the consumers (setmaxnreg): 2 consumer warpgroups get 240 a thread,
# 3 get 160, which head_dim 64 fits in (3 warpgroups keep the tensor cores busier than 2: docs/performance.md).
WGMMA_FORWARD_CONFIGS = {64: (3, 128, 2), 128: (2, 128, 2), 256: (1, 64, 2)}
WGMMA_ARCHS = ("sm_90", "sm_90a")  # wgmma and TMA are Hopper-only (sm_90a code runs on compute capability 9.0)


def _aligned_to_layouts(consumers: int, width: int, block_sizes: tuple[int, ...]) -> tuple[int, int]:
    """The largest warpgroup count (64 rows each) and tile width, at most the given ones, whose tiles divide every
    layout block, so that no tile straddles two blocks (a tile inside one block is full or empty, never partial).
    Blocks that no multiple of 64 divides cannot be lined up; the tiles then stay as they are."""
    if not all(bs % 64 == 0 for bs in block_sizes):
        return consumers, width
    while any(bs % (64 * consumers) for bs in block_sizes):
        consumers -= 1
    while any(bs % width for bs in block_sizes):
        width //= 2
    return consumers, width


def wgmma_forward_tiles(d: int, block_sizes: tuple[int, ...] = (), consumers: int | None = None) -> Tiles:
    """sm_90a forward tiling: persistent blocks whose `consumers` warpgroups (default: the head dim's) own 64 query
    rows each; a producer warpgroup fills the Q buffers and rings of K and V buffers with TMA. Tiles line up with
    the pattern's layout blocks where they can (`_aligned_to_layouts`). Shared memory: 1 KiB of alignment slack,
    the Q buffers, the two rings, the Q buffers' item slots, two mbarriers per Q buffer and four per stage."""
    default, bn, stages = WGMMA_FORWARD_CONFIGS[d]
    consumers, bn = _aligned_to_layouts(consumers or default, bn, block_sizes)
    bm, row = 64 * consumers, d * ELEM_BYTES
    for q_buffers in (2, 1):
        smem = 1024 + q_buffers * bm * row + stages * 2 * bn * row + 16 + 8 * (2 * q_buffers + 4 * stages)
        if smem <= SMEM_LIMIT:
            break
    return Tiles(bm, bn, 4 * (consumers + 1), stages, smem, consumers=consumers, q_buffers=q_buffers)


# head_dim -> (consumer warpgroups, queries per step, Q/dO stages) of the sm_90a dK/dV kernel and
# (consumer warpgroups, keys per step, K/V stages) of its dQ kernel. dK and dV take D fp32 registers a thread
# together, which head_dim 256 does not leave room for: it keeps the mma.sync backward.
WGMMA_BACKWARD_CONFIGS = {64: ((2, 64, 2), (2, 128, 2)), 128: ((2, 64, 3), (2, 64, 3))}


def wgmma_backward_tiles(d: int, block_sizes: tuple[int, ...] = ()) -> tuple[Tiles, Tiles]:
    """sm_90a dK/dV and dQ tilings: warpgroups of 64 keys (dK/dV) or queries (dQ) fed by a TMA producer warpgroup,
    lined up with the pattern's layout blocks where they can be. Shared memory as the kernels lay it out."""
    (kv_consumers, bm, kv_stages), (q_consumers, bn, q_stages) = WGMMA_BACKWARD_CONFIGS[d]
    kv_consumers, bm = _aligned_to_layouts(kv_consumers, bm, block_sizes)
    q_consumers, bn = _aligned_to_layouts(q_consumers, bn, block_sizes)
    row = d * ELEM_BYTES
    bkv, bq = 64 * kv_consumers, 64 * q_consumers
    kv_smem = 1024 + 2 * bkv * row + kv_stages * 2 * bm * (row + 4) + 8 * (1 + 4 * kv_stages)
    q_smem = 1024 + 2 * bq * row + q_stages * 2 * bn * row + 8 * (1 + 4 * q_stages)
    return (
        Tiles(bm, bkv, 4 * (kv_consumers + 1), kv_stages, kv_smem, consumers=kv_consumers),
        Tiles(bq, bn, 4 * (q_consumers + 1), q_stages, q_smem, consumers=q_consumers),
    )


# Plans hold for every length, so the planner judges a pattern's tile map at one nominal length. Partial tiles cost
# more than full ones (the mask) and taller tiles turn more of a band pattern's tiles partial: above this share of
# partial tiles, the shorter tiling wins (measured in docs/performance.md).
NOMINAL_LENGTH = 8192
PARTIAL_SHARE = 0.2


def _partial_share(pattern: P.Pattern, tiles: Tiles) -> float:
    """Share of the visited tiles that are partial, for an affine pattern at the nominal length."""
    from .schedule import FULL, PARTIAL, classes  # schedule.py builds on this module

    cls = classes(pattern, tiles.block_m, tiles.block_n, NOMINAL_LENGTH, NOMINAL_LENGTH, "cpu", {})
    partial, full = int((cls == PARTIAL).sum()), int((cls == FULL).sum())
    return partial / max(partial + full, 1)


def forward_tilings(
    d: int, arch: str, pattern: P.Pattern | None = None, block_sizes: tuple[int, ...] = ()
) -> tuple[Tiles, ...]:
    """The forward tilings to try, fastest first: the planner takes the first whose kernel does not spill. On
    sm_90, warpgroup counts from the head dim's down to 2; for an affine `pattern`, the tallest that leaves at most
    PARTIAL_SHARE of its tiles partial comes first, or else the one that leaves the fewest."""
    fast: list[Tiles] = []
    if arch in WGMMA_ARCHS and d in WGMMA_FORWARD_CONFIGS:
        most = WGMMA_FORWARD_CONFIGS[d][0]
        fast = [wgmma_forward_tiles(d, block_sizes, c) for c in (most, *range(most - 1, 1, -1))]
        if pattern is not None and len(fast) > 1 and all(isinstance(leaf, P.Affine) for leaf in pattern.leaves()):
            shares = {t: _partial_share(pattern, t) for t in fast}
            fast.sort(key=lambda t: (shares[t] > PARTIAL_SHARE, shares[t] if shares[t] > PARTIAL_SHARE else 0))
    return tuple(dict.fromkeys((*fast, *(forward_tiles(d, lean) for lean in (0, 1, 2)))))


def backward_tiles(d: int) -> Tiles:
    """dK/dV kernel: BLOCK_N keys per block, each warp owning 16; BLOCK_M-query tiles of Q and dO stream through
    a 2-stage cp.async pipeline. Shared memory as the kernel lays it out: K, V tiles, the Q and dO stages, and the
    stages' row statistics (lse2 and delta, fp32)."""
    bn, bm, warps = {32: (128, 128, 8), 64: (128, 96, 8), 96: (128, 64, 8), 128: (128, 64, 8), 256: (64, 32, 4)}[d]
    row = (d + 8) * ELEM_BYTES
    smem = 2 * bn * row + 2 * 2 * bm * row + 2 * 2 * bm * 4
    return Tiles(bm, bn, warps, 2, smem)


def dq_tiles(d: int) -> Tiles:
    """dQ kernel: BLOCK_M queries per block, each warp owning 16; BLOCK_N-key tiles of K and V stream through a
    2-stage cp.async pipeline (forward schedule shape). Shared memory: Q, dO, then the K and V stages."""
    bm, bn, warps = {32: (128, 128, 8), 64: (128, 96, 8), 96: (128, 64, 8), 128: (128, 48, 8), 256: (64, 32, 4)}[d]
    row = (d + 8) * ELEM_BYTES
    smem = 2 * bm * row + 2 * 2 * bn * row
    return Tiles(bm, bn, warps, 2, smem)


PREPROCESS_THREADS = 128
PREPROCESS_ROWS = 64  # rows of O / dO per preprocess block
BACKWARD_ROW_PAD = 128  # sm_90a backward: row statistics padded to a multiple of every query tile


def normalize_dtype(dtype: object) -> str:
    """torch.float16 / torch.bfloat16 (or their names) -> "fp16" / "bf16"."""
    import torch

    names = {torch.float16: "fp16", "fp16": "fp16", "float16": "fp16"}
    names |= {torch.bfloat16: "bf16", "bf16": "bf16", "bfloat16": "bf16"}
    if dtype not in names:
        raise InputError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return names[dtype]


def leaner(plan: KernelPlan) -> KernelPlan | None:
    """The forward tiling after `plan`'s in `forward_tilings` (fewer live registers, a little slower), or None."""
    tilings = forward_tilings(plan.head_dim, plan.arch, plan.pattern, plan.block_sizes)
    at = tilings.index(plan.fwd)
    return replace(plan, fwd=tilings[at + 1]) if at + 1 < len(tilings) else None


def make_plan(pattern: P.Pattern, *, head_dim: int, dtype: object, arch: str) -> KernelPlan:
    """Plan the forward and backward kernels of `pattern` for one dtype, head dim and arch."""
    if not isinstance(pattern, P.Pattern):
        raise InputError(f"expected an attngen pattern, got {type(pattern).__name__}")
    if head_dim not in HEAD_DIMS:
        raise InputError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    layouts: list[P.BlockLayout] = []
    branch_free = all(isinstance(leaf, P.Affine) for leaf in pattern.leaves())
    mask_c = _lower(pattern, layouts, BRANCH_FREE if branch_free else GUARDED)
    block_sizes = tuple(leaf.block_size for leaf in layouts)
    if arch in WGMMA_ARCHS and head_dim in WGMMA_BACKWARD_CONFIGS:
        bwd, dq = wgmma_backward_tiles(head_dim, block_sizes)
    else:
        bwd, dq = backward_tiles(head_dim), dq_tiles(head_dim)
    return KernelPlan(
        pattern=pattern,
        dtype=normalize_dtype(dtype),
        head_dim=head_dim,
        arch=arch,
        fwd=forward_tilings(head_dim, arch, pattern, block_sizes)[0],
        bwd=bwd,
        dq=dq,
        mask_c=mask_c,
        branch_free=branch_free,
        runtime_args=_runtime_args(pattern, layouts),
        layouts=tuple(layouts),
    )
