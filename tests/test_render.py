"""Render: templates are strict, every forward specialization the planner emits compiles with NVRTC for sm_80
and sm_90 with zero spills and no stack, and the rendered source is self-contained."""

import jinja2
import pytest
import torch

import attngen as ag
from attngen import render
from attngen.launch import get_kernel
from attngen.plan import HEAD_DIMS, make_plan

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


def test_source_is_self_contained_and_readable():
    src = render.render_forward(make_plan(MASKS["mixture"], head_dim=64, dtype="bf16", arch="sm_90")).code
    includes = [line for line in src.splitlines() if line.startswith("#include")]
    assert includes == ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>"]
    assert "causal() & sliding_window(1024) | global_tokens(16) | predicate('k >= Sk - 4')" in src
    assert "__nv_bfloat16" in src and "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src
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


def test_templates_are_strict(monkeypatch):
    env = render._env()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ plan.no_such_field }}").render(
            plan=make_plan(ag.full(), head_dim=64, dtype="fp16", arch="sm_90")
        )


def test_plan_is_readable():
    kern = ag.compile(ag.causal() & ag.sliding_window(256), head_dim=128, dtype=torch.float16, arch="sm_90")
    text = str(kern.plan)
    for part in ("fp16, head_dim 128, sm_90", "BLOCK_M", "partial tiles only", "full (no mask)", "empty (skipped)"):
        assert part in text
