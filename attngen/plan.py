"""Stage 2: Pattern + problem (dtype, head dim, arch) -> KernelPlan. Pure: no GPU, no sequence lengths.

A plan is every decision the kernel templates branch on: the tilings of the forward, dK/dV and dQ kernels
(`tiling.Tiles`), the position mask lowered to C (evaluated on partial tiles), the selection rule (`Selection`,
applied on every visited tile) and the run-time arguments that follow the fixed argument prefix of docs/design.md.
A plan depends on the pattern's structure only (`Pattern.structure`): block layouts, document ids, key lengths and
a rule's inputs are run-time arguments, so new data never means a new kernel. Which tiles are full / partial /
empty is a per-length question, answered by `schedule.py`."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from . import affine, scoremod, tiling
from . import expr as X
from . import pattern as P
from .abi import POINTER, RuntimeArg
from .errors import InputError
from .select import Selection, selection_of, split_selection
from .tiling import GATHER_HEAD_DIMS, HEAD_DIMS, WGMMA_ARCHS, GatherTiles, Tiles

DTYPES = ("fp16", "bf16")


@dataclass(frozen=True)
class Gather:
    """Kernels that visit only the listed keys, for a pattern `rest & key_indices()` (key_indices() one of its
    top-level & parts): the lists, sorted and without duplicates (`keyindex.sorted_lists`), drive cp.async gathers of
    K and V rows (forward, dQ), and their inverse at the granularity of `tiles.keys` keys drives the gathers of Q and
    dO rows (dK/dV). The rest of the pattern is evaluated on every listed pair."""

    rest: P.Pattern  # the other & parts (full() where there are none)
    rest_c: str  # C boolean over b, h, q, k and the run-time arguments: whether the rest keeps a listed (q, k)
    tiles: GatherTiles

    def __str__(self) -> str:
        return f"listed keys only, gathered ({self.tiles}); rest of the pattern per pair: {self.rest_c}"


@dataclass(frozen=True)
class KernelPlan:
    pattern: P.Pattern  # the structure (layouts as slots); its positional part is lowered to `mask_c`
    dtype: str  # "fp16" | "bf16"
    head_dim: int
    arch: str
    fwd: Tiles
    dkdv: Tiles  # dK/dV kernel: BLOCK_N keys per block, BLOCK_M queries per step
    dq: Tiles  # dQ kernel: BLOCK_M queries per block, BLOCK_N keys per step (forward schedule shape)
    mask_c: str  # C boolean expression over b, h, q, k, Sq, Sk and the run-time arguments
    # The mask evaluates every leaf unguarded (position compares, and key-index bit loads clamped into their
    # tensor): bitwise & | and a fully unrolled evaluation.
    branch_free: bool
    row_ranges: bool  # sorted tokens (reordered) whose every row keeps one range of keys: the mask is that range
    select: Selection
    runtime_args: tuple[RuntimeArg, ...]  # the position leaves' arguments, then the rule's
    layouts: tuple[P.LayoutSlot, ...]  # the pattern's block layouts, in argument order
    gather: Gather | None = None  # key-index lists walked by gather kernels instead of tiles (then fwd/dkdv/dq unused)
    score_mods: tuple = ()  # scoremod structures (Softcap, AlibiSlot, Bias, RelBias), in order, on every visited score

    @property
    def name(self) -> str:
        """Readable prefix of cache keys, e.g. `causal_bf16_hd64`."""
        kinds = sorted({type(leaf).__name__.lower() for leaf in self.pattern.leaves()})
        stem = "dense" if self.is_dense and self.select.rule == "none" else "_".join(kinds)
        mods = "".join(f"_{type(m).__name__.lower().removesuffix('slot')}" for m in self.score_mods)
        return f"{stem}{mods}_{self.dtype}_hd{self.head_dim}"

    @property
    def mod_grad(self) -> bool:
        """The score modifications' derivative is not 1 (a softcap): the backward multiplies dS by it."""
        return any(isinstance(m, scoremod.Softcap) for m in self.score_mods)

    @property
    def score_grad(self) -> bool:
        """A bias or a T5 table: the dK/dV kernel can write dL/ds at their step, for their gradients."""
        return scoremod.takes_grad(self.score_mods)

    @property
    def score_grad_kind(self) -> str:
        """The dtype dL/ds is written in: "input" (the kernels') or "float32" (scoremod.score_grad_kind)."""
        return scoremod.score_grad_kind(self.score_mods)

    @property
    def score_grad_capped(self) -> bool:
        """A softcap follows the bias / table: dL/ds at their step carries the softcap's derivative."""
        return scoremod.grad_after_softcap(self.score_mods)

    @property
    def is_dense(self) -> bool:
        return self.mask_c == "true"

    @property
    def reordered(self) -> bool:
        """The kernels run on tokens sorted by bucket (`reorder.Route`); the mask reads their original positions."""
        return self.pattern.reorders

    @property
    def cheap_mask(self) -> bool:
        """The mask costs a compare or two per element and a load or two per row: evaluated fully unrolled."""
        return self.branch_free or self.row_ranges

    @property
    def keep_c(self) -> str:
        """Whether element (q, k) of a partial tile is kept: the mask, guarded so that positions past Sq or Sk are
        never kept and never index the run-time tensors."""
        return _keep_c(self.mask_c, self.branch_free, self.reordered, self.row_ranges)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes of the pattern's layouts and block top-k: tiles that divide them are never partial."""
        return _block_sizes(self.pattern, self.layouts)

    @functools.cached_property
    def positions(self) -> P.Pattern:
        """The positional part of the structure (the rule removed): what the mask and the schedule are built from."""
        return split_selection(self.pattern)[0]

    @functools.cached_property
    def rule(self) -> P.Selector | None:
        """The selection rule of the structure (its `Selection` is `select`), or None."""
        return split_selection(self.pattern)[1]

    def tiles_of(self, kernel: str) -> Tiles:
        """The tiling of kernel "fwd", "dkdv" or "dq"."""
        return {"fwd": self.fwd, "dkdv": self.dkdv, "dq": self.dq}[kernel]

    def __str__(self) -> str:
        args = ", ".join(map(str, self.runtime_args)) or "none"
        mods = ", ".join(map(repr, self.score_mods))
        head = [f"KernelPlan for {self.pattern!r}", f"  problem   {self.dtype}, head_dim {self.head_dim}, {self.arch}"]
        if self.gather is not None:
            return "\n".join([*head, f"  gather    {self.gather}", f"  run-time  {args}"])
        return "\n".join(
            [
                *head,
                f"  forward   {self.fwd}",
                f"  dK/dV     {self.dkdv}",
                f"  dQ        {self.dq}",
                f"  mask      evaluated on partial tiles only: {self.mask_c}",
                f"  select    {self.select}",
                *([f"  score mod {mods}, on every visited tile"] if mods else []),
                "  tiles     full tiles run with no mask, empty tiles are never visited (see Schedule)",
                f"  run-time  {args}",
            ]
        )


# --------------------------------------------------------------------------------------------- C lowering


# A reordered call's kernels run on sorted tokens (`reorder.Route`): the mask reads each token's original position,
# qo = q_order[...] and ko = k_order[...], where every leaf but buckets and keep masks sees it.
_SORTED_ROW = ("((long long)b * Hq + h) * Sq", "((long long)b * (Hq / group) + h / group) * Sk")
ORIGINAL = ("qo", "ko")


def _lower(pat: P.Pattern, ops: tuple[str, str], at: tuple[str, str] = affine.POSITIONS) -> str:
    """C text of a positional pattern structure, reading the query and key positions as the C variables `at`."""
    qp, kp = at
    if isinstance(pat, (P.And, P.Or)):
        joint = ops[0] if isinstance(pat, P.And) else ops[1]
        return joint.join(f"({_lower(p, ops, at)})" for p in pat.parts)
    if isinstance(pat, P.Not):
        return f"!({_lower(pat.part, ops, at)})"
    if isinstance(pat, P.Affine):
        text = affine.lower_c(pat.expr, ops)  # in q, k, Sq, Sk: renamed as whole words (Sq, Sk stay)
        return re.sub(r"\bk\b", kp, re.sub(r"\bq\b", qp, text))
    if isinstance(pat, (P.Documents, P.InDocument)):
        same = f"qdoc[b * qdoc_sb + {qp}] == kdoc[b * kdoc_sb + {kp}]"
        if isinstance(pat, P.Documents):
            return same
        # in_document(): the predicate on the positions within the document (prepare: qoff, koff)
        qo, ko = f"qoff[b * qoff_sb + {qp}]", f"koff[b * koff_sb + {kp}]"
        inner = re.sub(r"\bk\b", ko, re.sub(r"\bq\b", qo, affine.lower_c(pat.expr, ops)))
        return f"({same}){ops[0]}({inner})"
    if isinstance(pat, P.KeyPadding):
        return f"{kp} < key_len[b]"
    if isinstance(pat, P.KeyIndices):
        # keyindex.bits: bit k % 32 of word k / 32 of the row's list. The load is clamped into the bits, so the mask
        # needs no guard: a thread's elements of one row then share a few words, each loaded once.
        row = "(long long)b * kbits_sb + (long long)(h / kbits_div) * kbits_sh"
        word = f"(long long)min({qp}, Sq - 1) * kbits_w + min({kp} >> 5, (int)kbits_w - 1)"
        return f"((kbits[{row} + {word}] >> ({kp} & 31)) & 1) != 0"
    if isinstance(pat, P.LayoutSlot):
        n, bs = pat.index, pat.block_size
        batch = f"b * layout{n}_sb + " if pat.per_batch else ""
        return f"layout{n}[{batch}h * layout{n}_sh + ({qp} / {bs}) * layout{n}_nk + {kp} / {bs}] != 0"
    if isinstance(pat, P.SelectedBlocks):
        bs = pat.block
        return f"blocks[b * blocks_sb + h * blocks_sh + ({qp} / {bs}) * blocks_nk + {kp} / {bs}] != 0"
    if isinstance(pat, P.Buckets):  # compared in sorted order
        return f"qbucket[{_SORTED_ROW[0]} + q] == kbucket[{_SORTED_ROW[1]} + k]"
    if isinstance(pat, P.Keep):
        return f"qkeep[{_SORTED_ROW[0]} + q] != 0{ops[0]}kkeep[{_SORTED_ROW[1]} + k] != 0"
    raise InputError(f"unknown pattern node {pat!r}")


def _block_sizes(structure: P.Pattern, layouts: tuple[P.LayoutSlot, ...]) -> tuple[int, ...]:
    topk = P.topk_leaf(structure)
    return tuple(slot.block_size for slot in layouts) + ((topk.block,) if topk is not None else ())


def _keep_c(mask_c: str, branch_free: bool, reordered: bool, row_ranges: bool) -> str:
    if row_ranges:  # needs no guard: rows past Sq read row Sq - 1's range (and are never stored), ranges end below Sk
        return mask_c
    if branch_free:
        return f"(q < Sq) & (k < Sk) & ({mask_c})"
    if reordered:
        qo, ko = (f"{name}[{row} + {pos}]" for name, row, pos in zip(("q_order", "k_order"), _SORTED_ROW, "qk"))
        return f"q < Sq && k < Sk && [&](int qo, int ko) -> bool {{ return {mask_c}; }}({qo}, {ko})"
    return f"q < Sq && k < Sk && ({mask_c})"


def _runtime_args(pat: P.Pattern, layouts: tuple[P.LayoutSlot, ...]) -> tuple[RuntimeArg, ...]:
    args: list[RuntimeArg] = []
    for n, slot in enumerate(layouts):
        args.append(RuntimeArg(f"layout{n}", POINTER.format("unsigned char")))
        args += [RuntimeArg(f"layout{n}_sb", "long long")] if slot.per_batch else []
        args += [RuntimeArg(f"layout{n}_sh", "long long"), RuntimeArg(f"layout{n}_nk", "int")]
    if P.topk_leaf(pat) is not None:  # blockselect.select's grid
        args += [
            RuntimeArg("blocks", POINTER.format("unsigned char")),
            RuntimeArg("blocks_sb", "long long"),
            RuntimeArg("blocks_sh", "long long"),
            RuntimeArg("blocks_nk", "int"),
        ]
    if "document_ids" in pat.runtime_inputs:  # prepare.Prepared.document_ids: ids, then positions within them
        names = ("qdoc", "kdoc", "qoff", "koff") if P.reads_document_offsets(pat) else ("qdoc", "kdoc")
        for name in names:
            args += [RuntimeArg(name, POINTER.format("int")), RuntimeArg(f"{name}_sb", "long long")]
    if "key_lengths" in pat.runtime_inputs:
        args.append(RuntimeArg("key_len", POINTER.format("int")))
    if "key_indices" in pat.runtime_inputs:  # keyindex.bits
        args.append(RuntimeArg("kbits", POINTER.format("int")))
        args += [RuntimeArg(n, "long long") for n in ("kbits_sb", "kbits_sh", "kbits_w")]
        args.append(RuntimeArg("kbits_div", "int"))
    if pat.reorders and P.keeps_key_ranges(pat):  # reorder.Route.kernel_tensors
        args.append(RuntimeArg("qrange", POINTER.format("int2")))
    elif pat.reorders:
        names = ["q_order", "k_order"]
        names += ["qbucket", "kbucket"] if "query_buckets" in pat.runtime_inputs else []
        args += [RuntimeArg(n, POINTER.format("int")) for n in names]
        if "query_keep" in pat.runtime_inputs:
            args += [RuntimeArg(n, POINTER.format("unsigned char")) for n in ("qkeep", "kkeep")]
    return tuple(args)


# ---------------------------------------------------------------------------------------------- tilings

# Plans hold for every length, so the planner judges a pattern's tile map at one nominal length. Partial tiles cost
# more than full ones (the mask) and taller tiles turn more of a band pattern's tiles partial: above this share of
# partial tiles, the shorter tiling wins (measured in docs/performance.md).
NOMINAL_LENGTH = 8192
PARTIAL_SHARE = 0.2


def _partial_share(pattern: P.Pattern, tiles: Tiles) -> float:
    """Share of the visited tiles that are partial, for an affine pattern at the nominal length."""
    expr = pattern.expr if isinstance(pattern, P.Affine) else _affine_expr(pattern)
    cls = affine.classes(expr, tiles.block_m, tiles.block_n, NOMINAL_LENGTH, NOMINAL_LENGTH)
    partial, full = int((cls == affine.PARTIAL).sum()), int((cls == affine.FULL).sum())
    return partial / max(partial + full, 1)


def _affine_expr(pat: P.Pattern) -> X.Boolean:
    """The predicate of a pattern made of affine leaves only."""
    if isinstance(pat, P.Affine):
        return pat.expr
    if isinstance(pat, P.Not):
        return X.neg(_affine_expr(pat.part))
    return (X.conj if isinstance(pat, P.And) else X.disj)(*map(_affine_expr, pat.parts))


def forward_tilings(
    d: int, arch: str, pattern: P.Pattern | None = None, block_sizes: tuple[int, ...] = (), cheap_mask: bool = True
) -> tuple[Tiles, ...]:
    """The forward tilings to try, fastest first: the planner takes the first whose kernel does not spill. On
    sm_90, warpgroup counts from the head dim's down to 2; for an affine `pattern`, the tallest that leaves at most
    PARTIAL_SHARE of its tiles partial comes first, or else the one that leaves the fewest. A mask that is not
    `cheap_mask` (KernelPlan.cheap_mask) is evaluated a few elements at a time."""
    fast: list[Tiles] = []
    if arch in WGMMA_ARCHS and d in tiling.WGMMA_FORWARD_CONFIGS:
        most = tiling.WGMMA_FORWARD_CONFIGS[d][0]
        fast = [tiling.wgmma_forward_tiles(d, block_sizes, c) for c in (most, *range(most - 1, 1, -1))]
        if not cheap_mask:
            fast = [replace(tiling.with_guarded_mask(t), coords_per_tile=True) for t in fast]
        if pattern is not None and len(fast) > 1 and all(isinstance(leaf, P.Affine) for leaf in pattern.leaves()):
            shares = {t: _partial_share(pattern, t) for t in fast}
            fast.sort(key=lambda t: (shares[t] > PARTIAL_SHARE, shares[t] if shares[t] > PARTIAL_SHARE else 0))
    return tuple(dict.fromkeys((*fast, *(tiling.forward_tiles(d, lean) for lean in (0, 1, 2, 3)))))


def backward_tilings(d: int, arch: str, block_sizes: tuple[int, ...], cheap_mask: bool) -> tuple[Tiles, Tiles]:
    """The dK/dV and dQ tilings: Hopper's where the head dim has them, mma.sync's otherwise."""
    if arch in WGMMA_ARCHS and d in tiling.WGMMA_BACKWARD_CONFIGS:
        dkdv, dq = tiling.wgmma_backward_tiles(d, block_sizes)
        return (dkdv, dq) if cheap_mask else (tiling.with_guarded_mask(dkdv), tiling.with_guarded_mask(dq))
    return tiling.dkdv_tiles(d), tiling.dq_tiles(d)


def normalize_dtype(dtype: object) -> str:
    """torch.float16 / torch.bfloat16 (or their names) -> "fp16" / "bf16"."""
    import torch

    names = {torch.float16: "fp16", "fp16": "fp16", "float16": "fp16"}
    names |= {torch.bfloat16: "bf16", "bf16": "bf16", "bfloat16": "bf16"}
    if not isinstance(dtype, (torch.dtype, str)) or dtype not in names:
        raise InputError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return names[dtype]


def next_tiling(plan: KernelPlan, kernel: str) -> KernelPlan | None:
    """`plan` with kernel "fwd", "dkdv" or "dq" one step leaner (fewer live registers, a little slower), or None
    when it is as lean as it gets. The forward steps through `forward_tilings`, the backward kernels `tiling.leaner`."""
    if plan.gather is not None:
        return None  # one gather tiling (tiling.gather_tiles), which fits every head dim it is planned for
    if kernel == "fwd":
        tilings = forward_tilings(plan.head_dim, plan.arch, plan.positions, plan.block_sizes, plan.cheap_mask)
        tilings = [replace(t, bias_preload=plan.fwd.bias_preload) for t in tilings]
        at = tilings.index(plan.fwd)
        return replace(plan, fwd=tilings[at + 1]) if at + 1 < len(tilings) else None
    lean = tiling.leaner(plan.tiles_of(kernel), kernel, plan.head_dim)
    return None if lean is None else replace(plan, **{kernel: lean})


def make_plan(pattern: P.Pattern, *, head_dim: int, dtype: object, arch: str, score_mods: tuple = ()) -> KernelPlan:
    """Plan the forward and backward kernels of `pattern`'s structure for one dtype, head dim and arch, with the
    score modifications' structures `score_mods` (scoremod: Softcap, AlibiSlot)."""
    if not isinstance(pattern, P.Pattern):
        raise InputError(f"expected an attngen pattern, got {type(pattern).__name__}")
    if type(head_dim) is not int or head_dim not in HEAD_DIMS:
        raise InputError(f"head_dim {head_dim!r} is not supported; supported: {HEAD_DIMS} (an int)")
    structure = pattern.structure()
    positions = split_selection(structure)[0]
    select = selection_of(structure)
    layouts = tuple(dict.fromkeys(leaf for leaf in structure.leaves() if isinstance(leaf, P.LayoutSlot)))
    branch_free = all(isinstance(leaf, (P.Affine, P.KeyIndices)) for leaf in positions.leaves())
    row_ranges = positions.reorders and P.keeps_key_ranges(positions)
    if row_ranges:
        # k - first < count as unsigned: one compare per element. The row is clamped into the sequence, so its load
        # needs no guard and the compiler loads each of a thread's rows once per tile. No key past Sk is in a range.
        r = f"qrange[{_SORTED_ROW[0]} + min(q, Sq - 1)]"
        mask_c = f"unsigned(k - {r}.x) < unsigned({r}.y)"
    else:
        at = ORIGINAL if positions.reorders else affine.POSITIONS
        mask_c = _lower(positions, affine.BRANCH_FREE if branch_free else affine.GUARDED, at)
    block_sizes = _block_sizes(structure, layouts)
    cheap_mask = branch_free or row_ranges
    score_mods = scoremod.structures(score_mods)  # alibi's slopes -> its slot
    if positions.reorders and any(not isinstance(m, scoremod.Softcap) for m in score_mods):
        raise InputError(
            f"{pattern!r}: on reordered (bucketed) calls only softcap is supported among the score modifications: "
            "alibi, a bias and T5's buckets read positions, which the sorted tokens' kernels do not give them yet"
        )
    # The gather kernels take no score modification: the lists then run as bits on the ordinary kernels.
    gather = _gather(positions, head_dim) if select.rule == "none" and not score_mods else None
    # A gather plan's kernels are mma.sync kernels of their own; the tile tilings below are then unused, and kept to
    # the mma.sync family's so that nothing takes the plan for a TMA one.
    tile_arch = "sm_80" if gather is not None else arch
    dkdv, dq = backward_tilings(head_dim, tile_arch, block_sizes, cheap_mask)
    fwd = forward_tilings(head_dim, tile_arch, positions, block_sizes, cheap_mask)[0]
    if any(isinstance(m, scoremod.Bias) for m in score_mods):
        ahead = fwd.wgmma and head_dim <= 64
        fwd, dq = replace(fwd, bias_preload="ahead" if ahead else "tile"), replace(dq, bias_preload="tile")
        dkdv = replace(dkdv, bias_preload="tile" if dkdv.wgmma else "")  # mma.sync dK/dV: read where it is used
    return KernelPlan(
        pattern=structure,
        dtype=normalize_dtype(dtype),
        head_dim=head_dim,
        arch=arch,
        fwd=fwd,
        dkdv=dkdv,
        dq=dq,
        mask_c=mask_c,
        branch_free=branch_free,
        row_ranges=row_ranges,
        select=select,
        runtime_args=_runtime_args(positions, layouts) + select.runtime_args + _score_mod_args(score_mods),
        layouts=layouts,
        gather=gather,
        score_mods=tuple(score_mods),
    )


def _score_mod_args(score_mods: tuple) -> tuple[RuntimeArg, ...]:
    """alibi's slopes, a bias (its pointer and [B, Hq, Sq, Sk] element strides), a T5 table, in the modifications'
    order; then, with a bias or a table, where the backward writes dL/ds at their step (null: not wanted)."""
    args = []
    for m in score_mods:
        if isinstance(m, scoremod.AlibiSlot):
            args.append(RuntimeArg("alibi_slopes", POINTER.format("float")))
        elif isinstance(m, scoremod.Bias):
            args.append(RuntimeArg("bias", POINTER.format("float" if m.dtype == "float32" else "elem_t")))
            args += [RuntimeArg(f"bias_s{dim}", "long long") for dim in "bhqk"]
        elif isinstance(m, scoremod.RelBias):
            args.append(RuntimeArg("rel_table", POINTER.format("float")))
    if scoremod.takes_grad(score_mods):
        ctype = "float" if scoremod.score_grad_kind(score_mods) == "float32" else "elem_t"
        args.append(RuntimeArg("score_grad", f"{ctype} * __restrict__"))
    return tuple(args)


def _gather(positions: P.Pattern, head_dim: int) -> Gather | None:
    """The gather kernels' plan where `positions` is `rest & key_indices()`, else None: the ordinary kernels then
    read the lists as bits on every tile they touch (a key_indices() under | or ~, a head dim past GATHER_HEAD_DIMS)."""
    parts = positions.parts if isinstance(positions, P.And) else (positions,)
    lists = [p for p in parts if isinstance(p, P.KeyIndices) and p.gathered]
    if not lists or head_dim not in GATHER_HEAD_DIMS or positions.reorders:
        return None
    others = [p for p in parts if p is not lists[0]]
    rest = P.And(tuple(others)) if len(others) > 1 else others[0] if others else P.full()
    free = all(isinstance(leaf, (P.Affine, P.KeyIndices)) for leaf in rest.leaves())
    rest_c = _lower(rest, affine.BRANCH_FREE if free else affine.GUARDED)
    return Gather(rest=rest, rest_c=rest_c, tiles=tiling.gather_tiles(head_dim))
