"""Per-family tile tables: the tilings the planner chooses from, their shared-memory sizes, and leaner variants.

A `Tiles` value is every decision a kernel template branches on: tile shape, warps, pipeline depth, operands kept
in registers, how a partial tile's mask is unrolled, split dK/dV sweeps. Templates read these fields and nothing
else; the planner chooses them and `KernelPlan` prints them. Shared-memory sizes here are the layouts the templates
carve (one formula each, checked against the templates by tests/test_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

HEAD_DIMS = (32, 64, 96, 128, 256)
ELEM_BYTES = 2
SMEM_LIMIT = 227 * 1024  # dynamic shared memory a block may have on sm_80 and sm_90
SMEM_PER_SM = 228 * 1024  # shared memory of an sm_90 SM, for all its resident blocks (1 KiB of each is reserved)
WGMMA_ARCHS = ("sm_90", "sm_90a")  # wgmma and TMA are Hopper-only (sm_90a code runs on compute capability 9.0)


@dataclass(frozen=True)
class Tiles:
    """One kernel's tiling: BLOCK_M query rows x BLOCK_N keys per step, `warps` warps, K/V pipeline depth.

    For the dK/dV kernel BLOCK_N is the keys a block owns and BLOCK_M the queries of one step."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    smem_bytes: int
    m_tiles: int = 1  # m16 tiles per warp (mma.sync forward): each K/V fragment from shared memory feeds m_tiles mmas
    operands_in_regs: bool = False  # mma.sync: the block's own operands (forward Q; dK/dV K, V; dQ Q, dO) in registers
    min_blocks: int = 1  # __launch_bounds__ occupancy hint
    consumers: int = 0  # sm_90a kernels: wgmma warpgroups of 64 rows fed by a TMA producer warpgroup; 0: mma.sync
    q_buffers: int = 1  # sm_90a forward: Q tiles in flight (persistent blocks load the next item's during this one)
    mask_unroll: int = 4  # partial tiles: mask elements evaluated per unrolled step (>= a thread's share: fully)
    split: bool = False  # mma.sync dK/dV: two sweeps (dK, then dV) instead of both accumulators at once
    # sm_90a forward: each tile's (query, key) coordinates made afresh rather than from a per-item value. With a mask
    # that loads run-time tensors, the per-item value held across the tile loop made ptxas schedule the loop worse
    # (+12% forward time on the H200 for a block layout).
    coords_per_tile: bool = False
    # A bias() score modification: each tile's bias is loaded into registers while its products run ("tile"; the
    # forward and dQ always, dK/dV where registers allow: the leaner step turns it off), or in the sm_90a forward a
    # whole step ahead of its use ("ahead": at head dim 64 -10% forward time on the H200, at 128 +29%).
    bias_preload: str = ""

    @property
    def wgmma(self) -> bool:
        return self.consumers > 0

    def __str__(self) -> str:
        size = f"BLOCK_M {self.block_m} x BLOCK_N {self.block_n}"
        smem = f"{self.smem_bytes / 1024:.0f} KiB shared memory"
        mask = f"mask unrolled x{self.mask_unroll}"
        if self.wgmma:
            ring = f"{self.stages}-stage ring" + (", coordinates per tile" if self.coords_per_tile else "")
            ring += f", {self.min_blocks} blocks per SM" if self.min_blocks > 1 else ""
            ring += {"": "", "tile": ", bias preloaded", "ahead": ", bias preloaded a step ahead"}[self.bias_preload]
            return f"{size}, {self.consumers} wgmma warpgroups + a TMA producer, {ring}, {mask}, {smem}"
        regs = ", operands in registers" if self.operands_in_regs else ""
        regs += ", bias preloaded" if self.bias_preload else ""  # "tile" (the mma.sync kernels)
        split = ", dK and dV in two sweeps" if self.split else ""
        return f"{size}, {self.warps} warps{regs}{split}, {self.stages}-stage cp.async pipeline, {mask}, {smem}"


# ------------------------------------------------------------------------------------------------- mma.sync


def padded_smem(rows: int, d: int) -> int:
    """Bytes of `rows` rows of head dim `d`, padded by 16 bytes: ldmatrix and cp.async free of bank conflicts."""
    return rows * (d + 8) * ELEM_BYTES


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
    gives each warp one m16 tile instead of two; 3 also evaluates a partial tile's mask a few elements at a time.
    Masks with much per-element code need the leaner forms to fit 255 registers without spilling."""
    bn, warps, mt, q_regs = FORWARD_CONFIGS[d]
    mt = 1 if lean >= 2 else mt
    bm = 16 * mt * warps
    smem = padded_smem(bm, d) + 2 * 2 * padded_smem(bn, d)  # Q, then two stages of K and V
    unroll = 4 if lean >= 3 else bn // 2  # bn / 8 n8 tiles of 4 elements a thread, per m16 tile
    return Tiles(bm, bn, warps, 2, smem, m_tiles=mt, operands_in_regs=q_regs and lean == 0, mask_unroll=unroll)


def dkdv_tiles(d: int) -> Tiles:
    """mma.sync dK/dV kernel: BLOCK_N keys per block, each warp owning 16; BLOCK_M-query tiles of Q and dO stream
    through a 2-stage cp.async pipeline. K and V fragments stay in registers while, with dK, dV (D) and Pᵀ, dPᵀ
    (BLOCK_M), they leave room for ~60 registers of addresses and temporaries; head_dim > 128 splits the sweep.
    Shared memory: K, V, the Q and dO stages, and the stages' row statistics (lse2 and Δ, fp32)."""
    bn, bm, warps = {32: (128, 128, 8), 64: (128, 96, 8), 96: (128, 64, 8), 128: (128, 64, 8), 256: (64, 32, 4)}[d]
    return Tiles(bm, bn, warps, 2, _dkdv_smem(bm, bn, d), operands_in_regs=d + bm + d // 2 <= 176, split=d > 128)


def _dkdv_smem(bm: int, bn: int, d: int) -> int:
    return 2 * padded_smem(bn, d) + 2 * 2 * padded_smem(bm, d) + 2 * 2 * bm * 4


def dq_tiles(d: int) -> Tiles:
    """mma.sync dQ kernel: BLOCK_M queries per block, each warp owning 16; BLOCK_N-key tiles of K and V stream
    through a 2-stage cp.async pipeline. Q and dO fragments stay in registers under the dK/dV kernel's budget,
    with dQ (D / 2) and P, dP (BLOCK_N) beside them. Shared memory: Q, dO, then the K and V stages."""
    bm, bn, warps = {32: (128, 128, 8), 64: (128, 96, 8), 96: (128, 64, 8), 128: (128, 48, 8), 256: (64, 32, 4)}[d]
    return Tiles(bm, bn, warps, 2, _dq_smem(bm, bn, d), operands_in_regs=d + bn <= 176)


def _dq_smem(bm: int, bn: int, d: int) -> int:
    return 2 * padded_smem(bm, d) + 2 * 2 * padded_smem(bn, d)


# ------------------------------------------------------------------------------------------------- sm_90a

# head_dim -> (consumer warpgroups, BLOCK_N, stages of each of the K and V rings) of the sm_90a forward. The
# producer warpgroup gives its registers to the consumers (setmaxnreg): 2 consumer warpgroups get 240 a thread,
# 3 get 160, which head_dim 64 fits in (3 warpgroups keep the tensor cores busier than 2: docs/performance.md).
WGMMA_FORWARD_CONFIGS = {64: (3, 128, 2), 128: (2, 128, 2), 256: (1, 64, 2)}

# head_dim -> (consumer warpgroups, queries per step, Q/dO stages) of the sm_90a dK/dV kernel and
# (consumer warpgroups, keys per step, K/V stages) of its dQ kernel. dK and dV take D fp32 registers a thread
# together, which head_dim 256 does not leave room for: it keeps the mma.sync backward.
WGMMA_BACKWARD_CONFIGS = {64: ((2, 64, 2), (2, 128, 2)), 128: ((2, 64, 3), (2, 64, 3))}

BARRIER_BYTES = 8
ALIGN_SLACK = 1024  # 128-byte swizzled tiles start on 1024-byte boundaries


def aligned_to_layouts(consumers: int, width: int, block_sizes: tuple[int, ...]) -> tuple[int, int]:
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


def wgmma_forward_smem(bm: int, bn: int, d: int, stages: int, q_buffers: int) -> int:
    """Alignment slack, the Q buffers, the K and V rings, the Q buffers' item slots (16 bytes), two mbarriers per Q
    buffer and four per stage (attn_fwd_sm90.cu.j2 carves it in this order)."""
    row = d * ELEM_BYTES
    bars = BARRIER_BYTES * (2 * q_buffers + 4 * stages)
    return ALIGN_SLACK + q_buffers * bm * row + stages * 2 * bn * row + 16 + bars


def wgmma_forward_tiles(d: int, block_sizes: tuple[int, ...] = (), consumers: int | None = None) -> Tiles:
    """sm_90a forward tiling: persistent blocks whose `consumers` warpgroups (default: the head dim's) own 64 query
    rows each; a producer warpgroup fills the Q buffers and rings of K and V buffers with TMA. Tiles line up with
    the pattern's layout blocks where they can (`aligned_to_layouts`)."""
    default, bn, stages = WGMMA_FORWARD_CONFIGS[d]
    consumers, bn = aligned_to_layouts(consumers or default, bn, block_sizes)
    bm = 64 * consumers
    q_buffers = 2 if wgmma_forward_smem(bm, bn, d, stages, 2) <= SMEM_LIMIT else 1
    smem = wgmma_forward_smem(bm, bn, d, stages, q_buffers)
    # Affine masks are a compare per element, fully unrolled; head_dim 256's large O accumulator leaves no room.
    unroll = bn // 2 if d <= 128 else 4
    warps = 4 * (consumers + 1)
    # One consumer warpgroup leaves the tensor cores idle while it runs its softmax: two blocks share the SM where
    # their shared memory fits, each consumer then with half the registers (attn_fwd_sm90.cu.j2, MIN_BLOCKS).
    blocks = 2 if consumers == 1 and 2 * smem <= SMEM_PER_SM and d <= 128 else 1
    return Tiles(
        bm, bn, warps, stages, smem, consumers=consumers, q_buffers=q_buffers, mask_unroll=unroll, min_blocks=blocks
    )


def wgmma_dkdv_smem(bkv: int, bm: int, d: int, stages: int) -> int:
    """Slack, K, V, the Q and dO rings, their lse2 and Δ rows (fp32), one K/V barrier and four per stage."""
    row = d * ELEM_BYTES
    return ALIGN_SLACK + 2 * bkv * row + stages * 2 * bm * (row + 4) + BARRIER_BYTES * (1 + 4 * stages)


def wgmma_dq_smem(bq: int, bn: int, d: int, stages: int) -> int:
    """Slack, Q, dO, the K and V rings, one Q/dO barrier and four per stage."""
    row = d * ELEM_BYTES
    return ALIGN_SLACK + 2 * bq * row + stages * 2 * bn * row + BARRIER_BYTES * (1 + 4 * stages)


def wgmma_backward_tiles(d: int, block_sizes: tuple[int, ...] = ()) -> tuple[Tiles, Tiles]:
    """sm_90a dK/dV and dQ tilings: warpgroups of 64 keys (dK/dV) or queries (dQ) fed by a TMA producer warpgroup,
    lined up with the pattern's layout blocks where they can be."""
    (kv_consumers, bm, kv_stages), (q_consumers, bn, q_stages) = WGMMA_BACKWARD_CONFIGS[d]
    kv_consumers, bm = aligned_to_layouts(kv_consumers, bm, block_sizes)
    q_consumers, bn = aligned_to_layouts(q_consumers, bn, block_sizes)
    bkv, bq = 64 * kv_consumers, 64 * q_consumers
    return (
        Tiles(bm, bkv, 4 * (kv_consumers + 1), kv_stages, wgmma_dkdv_smem(bkv, bm, d, kv_stages),
              consumers=kv_consumers, mask_unroll=bm // 2),
        Tiles(bq, bn, 4 * (q_consumers + 1), q_stages, wgmma_dq_smem(bq, bn, d, q_stages),
              consumers=q_consumers, mask_unroll=bn // 2),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- leaner variants


def with_guarded_mask(t: Tiles) -> Tiles:
    """A mask that loads run-time tensors goes a few elements at a time into a bit mask: fully unrolled, its loads
    and index arithmetic would be scheduled at once beside the accumulators."""
    return replace(t, mask_unroll=min(t.mask_unroll, 4))


def leaner(t: Tiles, kernel: str, head_dim: int) -> Tiles | None:
    """The next leaner variant of backward kernel `kernel`'s ("dkdv", "dq") tiling (fewer live registers, a little
    slower), or None: dK/dV's bias read where it is used, operands re-read from shared memory, then the mask
    evaluated 4, then 1 element at a time, then (mma.sync dK/dV) dK and dV in two sweeps; then steps of 64, then 32
    rows: keys for dQ, queries for dK/dV (the score and dP fragments shrink with them)."""
    if t.bias_preload and kernel == "dkdv":
        return replace(t, bias_preload="")
    if t.operands_in_regs:
        return replace(t, operands_in_regs=False)
    if t.mask_unroll > 4:
        return replace(t, mask_unroll=4)
    if t.mask_unroll > 1:
        return replace(t, mask_unroll=1)
    if kernel == "dkdv" and not t.wgmma and not t.split:
        return replace(t, split=True)
    if kernel == "dq" and t.block_n > 32:
        bn = 64 if t.block_n > 64 else 32
        smem = wgmma_dq_smem(t.block_m, bn, head_dim, t.stages) if t.wgmma else _dq_smem(t.block_m, bn, head_dim)
        return replace(t, block_n=bn, smem_bytes=smem)
    if kernel == "dkdv" and t.block_m > 32:
        bm = 64 if t.block_m > 64 else 32
        smem = wgmma_dkdv_smem(t.block_n, bm, head_dim, t.stages) if t.wgmma else _dkdv_smem(bm, t.block_n, head_dim)
        return replace(t, block_m=bm, smem_bytes=smem)
    return None


# ------------------------------------------------------------------------------------------- key-index gathers


@dataclass(frozen=True)
class GatherTiles:
    """The key-index gather kernels' tiling (a pattern `rest & key_indices()`, `plan.Gather`). Warps are independent
    work items, `warps` to a block. The forward and dQ kernels give a warp one query token and 16 of the query heads
    that share its list (the m16 rows of mma.sync), and walk the list `keys` keys at a time, `stages` gathers in
    flight; the dK/dV kernel gives a warp `keys` consecutive keys and walks the tokens that list any of them, the
    same depth of gathers in flight. Shared memory per warp: the stages' two row sets (K and V, or Q and dO) and
    2 `keys` words (the keys, or the rows' lse2 and Δ); the dK/dV kernel also keeps its own K and V rows."""

    keys: int
    stages: int
    warps: int

    def stage_bytes(self, d: int) -> int:
        return 2 * padded_smem(self.keys, d) + 8 * self.keys

    def smem_bytes(self, d: int, kernel: str) -> int:
        """Dynamic shared memory of a block of kernel "fwd", "dq" or "dkdv"."""
        own = 2 * padded_smem(self.keys, d) if kernel == "dkdv" else 0
        return self.warps * (self.stages * self.stage_bytes(d) + own)

    def __str__(self) -> str:
        return (
            f"one warp per (query token, 16 heads sharing its list), {self.keys} listed keys a step; dK/dV one warp "
            f"per {self.keys} keys over the tokens listing them; {self.stages}-stage cp.async gathers, "
            f"{self.warps} warps a block"
        )


GATHER_HEAD_DIMS = (32, 64, 96, 128)  # head_dim 256's O accumulator and Q fragments do not fit beside a gather
GATHER_KEYS = 16  # keys a step; the dK/dV kernel's keys per warp, the granularity of the inverse lists


def gather_tiles(d: int) -> GatherTiles:
    """Sixteen keys a step, three gathers in flight, four warps a block (two blocks an SM at head_dim 128)."""
    return GatherTiles(keys=GATHER_KEYS, stages=3, warps=4)
