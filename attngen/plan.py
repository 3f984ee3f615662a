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

    def __str__(self) -> str:
        q = ", Q fragments in registers" if self.q_in_regs else ""
        return (
            f"BLOCK_M {self.block_m} x BLOCK_N {self.block_n}, {self.warps} warps{q}, "
            f"{self.stages}-stage cp.async pipeline, {self.smem_bytes / 1024:.0f} KiB shared memory"
        )


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


def _affine_c(e: sp.Basic) -> str:
    if e is sp.true or e is sp.false:
        return str(bool(e)).lower()
    if isinstance(e, (sp.And, sp.Or)):
        joint = " && " if isinstance(e, sp.And) else " || "
        return joint.join(f"({_affine_c(a)})" for a in e.args)
    if isinstance(e, sp.Not):
        return f"!({_affine_c(e.args[0])})"
    diff = sp.expand(e.lhs - e.rhs)
    if all(c.is_integer for c in sp.Poly(diff, P.q, P.k, P.Sq, P.Sk).coeffs()):
        return ccode(e)
    a = linear_atom(e)
    lin = " + ".join(f"{c}*{s}" for c, s in zip(a.coef, ("q", "k", "Sq", "Sk")) if c) or "0"
    return f"{lin} + {a.const} {dict(ge='>=', eq='==', ne='!=')[a.op]} 0"


def _lower(pat: P.Pattern, layouts: list[P.BlockLayout]) -> str:
    """C text of the pattern; collects distinct block layouts (their index names their arguments)."""
    if isinstance(pat, (P.And, P.Or)):
        joint = " && " if isinstance(pat, P.And) else " || "
        return joint.join(f"({_lower(p, layouts)})" for p in pat.parts)
    if isinstance(pat, P.Not):
        return f"!({_lower(pat.part, layouts)})"
    if isinstance(pat, P.Affine):
        return _affine_c(pat.expr)
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
    """Forward tiling. `lean` 1 re-reads Q from shared memory instead of holding it in registers; 2 also gives
    each warp one m16 tile instead of two. Masks with much per-element code need the leaner forms to fit 255
    registers without spilling (see `launch.get_kernel`)."""
    bn, warps, mt, q_regs = FORWARD_CONFIGS[d]
    mt = 1 if lean >= 2 else mt
    bm = 16 * mt * warps
    return Tiles(bm, bn, warps, 2, _smem(bm, bn, d, 2), m_tiles=mt, q_in_regs=q_regs and lean == 0)


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


def normalize_dtype(dtype: object) -> str:
    """torch.float16 / torch.bfloat16 (or their names) -> "fp16" / "bf16"."""
    import torch

    names = {torch.float16: "fp16", "fp16": "fp16", "float16": "fp16"}
    names |= {torch.bfloat16: "bf16", "bf16": "bf16", "bfloat16": "bf16"}
    if dtype not in names:
        raise InputError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return names[dtype]


def leaner(plan: KernelPlan) -> KernelPlan | None:
    """The next leaner forward tiling of `plan` (fewer live registers, a little slower), or None."""
    for level in (1, 2):
        tiles = forward_tiles(plan.head_dim, lean=level)
        if (tiles.q_in_regs, tiles.m_tiles) < (plan.fwd.q_in_regs, plan.fwd.m_tiles):
            return replace(plan, fwd=tiles)
    return None


def make_plan(pattern: P.Pattern, *, head_dim: int, dtype: object, arch: str) -> KernelPlan:
    """Plan the forward and backward kernels of `pattern` for one dtype, head dim and arch."""
    if not isinstance(pattern, P.Pattern):
        raise InputError(f"expected an attngen pattern, got {type(pattern).__name__}")
    if head_dim not in HEAD_DIMS:
        raise InputError(f"head_dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    layouts: list[P.BlockLayout] = []
    mask_c = _lower(pattern, layouts)
    return KernelPlan(
        pattern=pattern,
        dtype=normalize_dtype(dtype),
        head_dim=head_dim,
        arch=arch,
        fwd=forward_tiles(head_dim),
        bwd=backward_tiles(head_dim),
        dq=dq_tiles(head_dim),
        mask_c=mask_c,
        runtime_args=_runtime_args(pattern, layouts),
        layouts=tuple(layouts),
    )
