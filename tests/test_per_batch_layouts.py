"""Block layouts with a grid per batch element (`block_layout([B, H or 1, nbq, nbk], bs)`): the pattern and its
structure, the mask the kernels evaluate (run-time arguments bound as `attngen.bind` binds them), the schedule, and
calls end to end with the kernels replaced by the reference. The GPU test is in tests/test_kernels_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_nm_compile import assert_no_spills

import attngen as ag
from attngen import bind, prepare, reference, schedule
from attngen.errors import InputError
from attngen.plan import make_plan


def _grid(shape, seed: int = 0, density: float = 0.5) -> torch.Tensor:
    g = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    g[..., 0] = True  # every query block keeps a key block: no empty row unless the rest of the pattern empties it
    return g


def test_the_structure_knows_a_grid_per_batch_element():
    per_batch = ag.block_layout(_grid((3, 2, 4, 4)), 64)
    other = ag.block_layout(_grid((3, 2, 4, 4), seed=1), 64)
    per_head = ag.block_layout(_grid((2, 4, 4)), 64)
    assert per_batch.per_batch and per_batch.per_head and not per_head.per_batch
    assert per_batch.structure() == other.structure() != per_head.structure()  # one kernel for every such grid
    assert "per batch, per head, run-time grid" in repr(per_batch.structure())
    assert repr(per_batch).startswith("block_layout(<3x2x4x4 ")
    with pytest.raises(InputError, match=r"4-d \[batch, heads or 1, q_blocks, k_blocks\]"):
        ag.block_layout(torch.ones(1, 1, 1, 4, 4, dtype=torch.bool), 64)


@pytest.mark.parametrize("shape", [(3, 2, 5, 6), (3, 1, 5, 6), (1, 2, 5, 6)])
def test_the_mask_is_each_batch_elements_grid(shape):
    grid = _grid(shape)
    mask = ag.block_layout(grid, 16).mask(70, 90)
    assert mask.shape == (shape[0], shape[1], 70, 90)
    up = grid.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :70, :90]
    assert torch.equal(mask, up)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_kernels_step_over_the_batch_stride(arch):
    """The mask reads `layout0[b * layout0_sb + h * layout0_sh + ...]` from a `layout0_sb` argument that only
    per-batch grids have; the kernels compile without spills."""
    pat = ag.block_layout(_grid((2, 4, 4, 4)), 64) & ag.causal()
    plan = make_plan(pat, head_dim=64, dtype="bf16", arch=arch)
    assert "layout0[b * layout0_sb + h * layout0_sh + " in plan.mask_c
    assert [a.name for a in plan.runtime_args[:4]] == ["layout0", "layout0_sb", "layout0_sh", "layout0_nk"]
    shared = make_plan(ag.block_layout(_grid((4, 4, 4)), 64) & ag.causal(), head_dim=64, dtype="bf16", arch=arch)
    assert "layout0_sb" not in shared.mask_c and "layout0_sb" not in [a.name for a in shared.runtime_args]
    assert_no_spills(ag.compile(pat, head_dim=64, dtype=torch.bfloat16, arch=arch))


@pytest.mark.parametrize("batches", [3, 1])
def test_bound_values_follow_the_arguments(batches):
    """`bind.runtime_values` for a per-batch grid: its pointer, then the batch stride (0 for one grid for every
    batch element), the head stride and the key blocks, in the plan's argument order."""
    grid = _grid((batches, 2, 4, 5))
    pat = ag.block_layout(grid, 64)
    plan = make_plan(pat, head_dim=64, dtype="fp16", arch="sm_90")
    q = torch.zeros(3, 2, 256, 64, dtype=torch.float16)
    prep = prepare.prepare(pat, q, q, {"document_ids": None, "key_lengths": None})
    values = bind.runtime_values(plan, prep, 2)
    assert len(values) == len(plan.runtime_args) == 4
    assert [int(v) for v in values[1:]] == [2 * 4 * 5 if batches > 1 else 0, 4 * 5, 5]


def test_a_grid_for_another_batch_is_refused():
    pat = ag.block_layout(_grid((3, 1, 4, 4)), 64)
    q = torch.zeros(2, 2, 256, 64, dtype=torch.float16)
    with pytest.raises(InputError, match="per-batch block layout has 3 batch elements; the query has 2"):
        prepare.prepare(pat, q, q, {"document_ids": None, "key_lengths": None})


def test_each_batch_elements_schedule_is_its_own():
    """Batch element 0 keeps only the diagonal blocks, element 1 every block: the schedule lists 4 and 16 tiles."""
    grid = torch.stack([torch.eye(4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)])[:, None]
    pat = ag.block_layout(grid, 64)
    sched = schedule.build(pat.structure(), 64, 64, 256, 256, "cpu", prepare.Prepared(layouts=(pat.tensor(),)))
    assert sched.counts.shape[0] == 2 and sched.counts[0].sum() == 4 and sched.counts[1].sum() == 16


@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (3, 1, 6, 5)])
def test_calls_attend_within_each_batch_elements_grid(shape, reference_kernels):
    """Through attngen.attention (the kernels replaced by the float32 reference): the grid the call's op is given
    is each batch element's, out and gradients equal the float64 reference."""
    gen = torch.Generator().manual_seed(2)
    B, H, Sq, Sk, bs = 3, 4, 90, 75, 16
    grid = _grid(shape, seed=3)
    pat = ag.causal(align="bottom_right") | ag.block_layout(grid, bs)
    q = torch.randn(B, H, Sq, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(B, 2, Sk, 32, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = ag.attention(q, k, v, pat)
    want, _ = reference.attention(q, k, v, pat, dtype=torch.float64)
    assert (out.double() - want).abs().max() < 2e-2
    assert torch.equal(reference_kernels.calls[-1].prep.layouts[0].bool(), grid)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    got, ref = torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout.double())
    for g, r in zip(got, ref):
        assert ((g.double() - r).norm() / r.norm()) < 2e-2
    assert math.ceil(Sq / bs) <= shape[2] and math.ceil(Sk / bs) <= shape[3]


def test_block_top_k_chooses_among_each_batch_elements_blocks(reference_kernels):  # lifts the CUDA refusal
    """`layout & topk_blocks(k)`: each batch element's choice lies within its own grid (k of its kept blocks, or all
    of them where it keeps fewer)."""
    grid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    grid[0, :, :, :2] = True  # batch 0 keeps key blocks 0 and 1, batch 1 key blocks 2 and 3
    grid[1, :, :, 2:] = True
    pat = ag.block_layout(grid, 64) & ag.topk_blocks(1, block=64)
    q, k = (torch.randn(2, 3, 256, 32, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    chosen = ag.selected_blocks(q.half(), k.half(), pat)
    assert chosen.shape == (2, 3, 4, 4) and (chosen.sum(-1) == 1).all()
    assert not (chosen & ~grid).any()
