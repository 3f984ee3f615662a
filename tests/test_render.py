"""Render: templates are strict, every forward specialization the planner emits compiles with NVRTC for sm_80
and sm_90 with zero spills and no stack, and the rendered source is self-contained."""

import pytest
import torch

import attngen as ag
from attngen import render
from attngen.kernel import compiled
from attngen.plan import HEAD_DIMS, make_plan
from attngen.prepare import Prepared


def get_kernel(pattern, head_dim, dtype, arch):
    return ag.compile(pattern, head_dim=head_dim, dtype=dtype, arch=arch)


# One pattern per kind of mask code the planner can lower: none, affine, layout (per head), call-time inputs,
# and a heavy mixture (the one that pushes the fast tiling over the register budget).
MASKS = {
    "dense": ag.full(),
    "affine": ag.causal(align="bottom_right") & ag.sliding_window(1024, align="bottom_right"),
    "layout": ag.block_layout(torch.rand(4, 8, 8) < 0.3, 64) & ag.causal(),
    "runtime": ag.documents() & ag.key_padding() & ag.causal(),
    "mixture": ag.causal() & ag.sliding_window(1024) | ag.global_tokens(16) | ag.predicate("k >= Sk - 4"),
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mask", list(MASKS))
def test_forward_compiles_without_spills(mask, head_dim, dtype, arch):
    kern = get_kernel(MASKS[mask], head_dim, dtype, arch)
    ((entry, res),) = kern.resources
    assert entry == "attngen_fwd"
    assert res.registers > 0
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), str(res)
    assert kern.forward_binary.performance_notes == ()  # e.g. no wgmma serialised by ptxas


def test_hopper_forward_is_wgmma_elsewhere_mma_sync():
    """sm_90 gets the TMA + wgmma family (compiled for sm_90a) where its head dims allow; the rest mma.sync."""
    for d in HEAD_DIMS:
        for arch in ("sm_80", "sm_89", "sm_90", "sm_100"):
            kern = get_kernel(ag.causal(), d, "fp16", arch)
            wgmma = arch == "sm_90" and d in (64, 128, 256)
            assert kern.kernel_plan.fwd.wgmma is wgmma
            assert kern.forward_binary.arch == ("sm_90a" if wgmma else arch)
            assert ("wgmma.mma_async" in kern.source) is wgmma


def test_tiles_line_up_with_layout_blocks():
    """Tiles inside one layout block are full or empty, never partial: the sm_90 kernels shrink to 64-wide tiles
    for 64-blocks and keep 128 for multiples of 128."""
    from attngen.schedule import PARTIAL, classes

    for bs, rows in ((64, 64), (128, 128), (256, 128)):
        layout = torch.rand(4096 // bs, 4096 // bs, generator=torch.Generator().manual_seed(bs)) < 0.3
        pattern = ag.block_layout(layout, bs)
        plan = make_plan(pattern, head_dim=64, dtype="fp16", arch="sm_90")
        assert plan.fwd.block_m == plan.dq.block_m == plan.dkdv.block_n == rows  # rows of a block: queries / keys
        grids = Prepared(layouts=(pattern.tensor(),))
        for t in (plan.fwd, plan.dkdv, plan.dq):
            assert not (classes(plan.positions, t.block_m, t.block_n, 4096, 4096, "cpu", grids) == PARTIAL).any(), t


def test_tile_height_follows_the_tile_map():
    """On sm_90 at head_dim 64 the planner prefers 192-row tiles (three warpgroups), unless they would leave more
    than PARTIAL_SHARE of the pattern's tiles partial (a narrow band): then 128 rows."""
    from attngen.plan import PARTIAL_SHARE, _partial_share

    rows = {
        ag.full(): 192,
        ag.causal(): 192,
        ag.sliding_window(4096): 192,
        ag.sliding_window(1024): 128,
        ag.local(517, 3) & ag.causal(): 128,
    }
    for pat, expect in rows.items():
        plan = make_plan(pat, head_dim=64, dtype="fp16", arch="sm_90")
        assert plan.fwd.block_m == expect, pat
        assert (_partial_share(pat, plan.fwd) <= PARTIAL_SHARE) is (expect == 192), pat
    assert make_plan(ag.documents() & ag.causal(), head_dim=64, dtype="fp16", arch="sm_90").fwd.block_m == 192


def test_source_is_self_contained_and_readable():
    src = render.render_forward(make_plan(MASKS["mixture"], head_dim=64, dtype="bf16", arch="sm_90")).code
    assert "#include" not in src  # not even CUDA's own headers: NVRTC needs nothing beside itself
    assert "causal() & sliding_window(1024) | global_tokens(16) | predicate('k >= Sk - 4')" in src
    assert "cvt.rn.bf16x2.f32" in src and "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in src
    assert "k >= Sk - 4" in src  # the mask is lowered to C


def test_runtime_arguments_follow_the_plan():
    plan = make_plan(MASKS["runtime"] & MASKS["layout"], head_dim=64, dtype="fp16", arch="sm_90")
    src = render.render_forward(plan).code
    signature = src[src.index("attngen_fwd(") : src.index(") {", src.index("attngen_fwd("))]
    assert [a.name for a in plan.runtime_args] == [
        "layout0",
        "layout0_sh",
        "layout0_nk",
        "qdoc",
        "qdoc_sb",
        "kdoc",
        "kdoc_sb",
        "key_len",
    ]
    for a in plan.runtime_args:
        assert f"{a.ctype} {a.name}" in signature


def test_new_layouts_reuse_the_compiled_kernels():
    """Kernels depend on a pattern's structure, never on its data: another grid of the same shape of pattern (a
    layout built per training step, say) renders the same source and compiles nothing new."""
    gen = torch.Generator().manual_seed(1)
    grids = [torch.rand(3, 16, 16, generator=gen) < p for p in (0.2, 0.5, 0.9)]
    kernels = [ag.compile(ag.block_layout(g, 64) & ag.causal(), head_dim=64, arch="sm_90") for g in grids]
    assert len({id(kern.compiled) for kern in kernels}) == 1
    assert kernels[0].source == kernels[2].source and "0.2" not in kernels[0].source
    assert compiled.cache_info().currsize >= 1
    assert "layout 0: per head, run-time grid" in kernels[0].source  # the structure, printed in the header
    assert [k.pattern for k in kernels] != [kernels[0].pattern] * 3  # each Kernel keeps its own grid to run with


def test_plan_is_readable():
    kern = ag.compile(ag.causal() & ag.sliding_window(256), head_dim=128, dtype=torch.float16, arch="sm_90")
    text = str(kern.plan)
    for part in ("fp16, head_dim 128, sm_90", "BLOCK_M", "partial tiles only", "full (no mask)", "empty (skipped)"):
        assert part in text
