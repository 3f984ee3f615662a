"""The planner: a plan is a printable value holding every knob the templates branch on and the selection rule;
it depends on a pattern's structure, never its data; compositions with selection rules are checked; the spill
fallback steps every kernel down to a leaner tiling; shared-memory sizes are the templates' own carve-ups."""

import dataclasses
import gc
import weakref

import pytest
import torch

import attngen as ag
from attngen import pattern as P
from attngen import reference, tiling
from attngen.errors import InputError
from attngen.plan import make_plan, next_tiling
from attngen.render import render_backward, render_forward
from attngen.select import NONE, Selection, split_selection


@dataclasses.dataclass(frozen=True, repr=False)
class KeepEven(P.Selector):
    """A stand-in selection rule (keeps even keys) for checking how rules compose; it has no kernel template."""

    def selection(self):
        return Selection(rule="keep_even", params=(("parity", 0),))

    def reference_keep(self, scores, allowed, **runtime):
        return (torch.arange(scores.shape[-1]) % 2 == 0).expand_as(scores)

    def __repr__(self):
        return "keep_even()"


def plan(pat, d=64, arch="sm_90", dtype="fp16"):
    return make_plan(pat, head_dim=d, dtype=dtype, arch=arch)


def test_plan_prints_every_knob_and_the_selection():
    text = str(plan(ag.documents() & ag.causal(), d=96, arch="sm_80"))
    for part in ("forward", "dK/dV", "dQ", "mask unrolled x", "operands in registers", "select    none", "qdoc"):
        assert part in text, part
    assert "dK and dV in two sweeps" in str(plan(ag.causal(), d=256, arch="sm_80"))
    assert "wgmma warpgroups" in str(plan(ag.causal()))


def test_knobs_are_chosen_by_the_planner():
    affine, loads = plan(ag.causal() & ag.sliding_window(512)), plan(ag.documents() & ag.causal())
    # Compares fully unrolled; masks that load tensors a few elements at a time.
    assert affine.fwd.mask_unroll == affine.fwd.block_n // 2 and loads.fwd.mask_unroll == 4
    assert affine.dkdv.mask_unroll == affine.dkdv.block_m // 2 and loads.dkdv.mask_unroll == 4
    assert affine.dq.mask_unroll == affine.dq.block_n // 2 and loads.dq.mask_unroll == 4
    assert plan(ag.causal(), d=256).fwd.mask_unroll == 4  # beside head_dim 256's large O accumulator
    sync = plan(ag.causal(), d=32, arch="sm_80")
    assert sync.fwd.operands_in_regs and sync.dkdv.operands_in_regs and not sync.dkdv.split
    # K and V fragments (D / 2) beside dK, dV (D) and Pᵀ, dPᵀ (BLOCK_M 96) exceed the 176-register budget.
    assert not plan(ag.causal(), d=64, arch="sm_80").dkdv.operands_in_regs
    assert plan(ag.causal()).select == NONE


def test_kernels_depend_on_structure_not_data():
    gen = torch.Generator().manual_seed(0)
    grids = [torch.rand(2, 8, 8, generator=gen) < p for p in (0.1, 0.9)]
    a, b = (ag.block_layout(g, 128) & ag.causal() for g in grids)
    assert a != b and a.structure() == b.structure() and hash(a.structure()) == hash(b.structure())
    assert plan(a) == plan(b)
    assert render_forward(plan(a)).code == render_forward(plan(b)).code
    assert plan(ag.block_layout(grids[0][0], 128)).pattern != plan(a).pattern  # per-head or not: a new structure
    assert plan(ag.block_layout(grids[0], 64)).pattern != plan(ag.block_layout(grids[0], 128)).pattern
    same = ag.block_layout(grids[0], 128)
    two = plan(same & ag.causal() | same & ag.global_tokens(4))
    assert len(two.layouts) == 1  # one grid, one slot
    three = plan(ag.block_layout(grids[0], 128) | ag.block_layout(grids[1], 128))
    assert [slot.index for slot in three.layouts] == [0, 1]
    names = [a.name for a in three.runtime_args]
    assert names == [f"layout{n}{suffix}" for n in (0, 1) for suffix in ("", "_sh", "_nk")]


def test_compiled_kernels_keep_no_layout_alive():
    pat = ag.block_layout(torch.rand(8, 8) < 0.5, 64) & ag.causal()
    leaf = weakref.ref(pat.layouts()[0])
    ag.compile(pat, head_dim=64, arch="sm_90")
    del pat
    gc.collect()
    assert leaf() is None


def test_selection_composition_rules():
    rule = KeepEven()
    assert split_selection(rule) == (ag.full(), rule)
    assert split_selection(ag.causal() & rule) == (ag.causal(), rule)
    assert split_selection(ag.causal() & ag.documents() & rule)[0] == ag.causal() & ag.documents()
    assert plan(ag.causal() & rule).select.rule == "keep_even"
    assert "keep_even(parity=0)" in str(plan(ag.causal() & rule))
    with pytest.raises(InputError, match="complement"):
        ~rule  # noqa: B018
    with pytest.raises(InputError, match="complement"):
        ~(ag.causal() & rule)
    with pytest.raises(InputError, match=r"supported: .*A & rule"):
        plan(ag.causal() | rule)
    with pytest.raises(InputError, match="2 selection rules"):
        plan(rule & ag.causal() & KeepEven())


def test_reference_applies_the_rule_among_allowed_keys():
    q, k, v = (torch.randn(1, 1, 6, 8, dtype=torch.float64) for _ in range(3))
    out, lse = reference.attention(q, k, v, ag.causal() & KeepEven())
    s = (q @ k.transpose(-1, -2))[0, 0] / 8**0.5
    keep = torch.tril(torch.ones(6, 6, dtype=torch.bool)) & (torch.arange(6) % 2 == 0)
    expect = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v[0, 0]
    assert torch.allclose(out[0, 0], expect)
    assert torch.allclose(lse[0, 0], torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1))


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_has_a_leaner_tiling(kernel, arch):
    p, steps = plan(ag.causal() & ag.sliding_window(256), arch=arch), 0
    while (lean := next_tiling(p, kernel)) is not None:
        before, after = p.tiles_of(kernel), lean.tiles_of(kernel)
        assert after != before and steps < 8
        assert (after.operands_in_regs, after.mask_unroll) <= (before.operands_in_regs, before.mask_unroll) or (
            kernel == "fwd"
        )
        p, steps = lean, steps + 1
    assert steps >= 1 and p.tiles_of(kernel).mask_unroll <= 4


def test_leaner_steps_end_at_one_element_at_a_time_then_split_sweeps():
    """Operands to shared memory, the mask one element at a time, then (mma.sync dK/dV only) two sweeps, then query
    steps (dK/dV) or key steps (dQ) of 64, then 32 rows, with the shared memory of that tile."""
    dkdv_last = [(False, 1, True, 128, 128), (False, 1, True, 64, 128), (False, 1, True, 32, 128)]
    dq_last = [(False, 1, False, 128, 128), (False, 1, False, 128, 64), (False, 1, False, 128, 32)]
    for kernel, t, last in (("dkdv", tiling.dkdv_tiles(32), dkdv_last), ("dq", tiling.dq_tiles(32), dq_last)):
        seen = [t]
        while (t := tiling.leaner(t, kernel, 32)) is not None:
            seen.append(t)
        steps = [(s.operands_in_regs, s.mask_unroll, s.split, s.block_m, s.block_n) for s in seen]
        assert steps[-len(last) :] == last and len(steps) == len(set(steps)), steps
    assert seen[-1].smem_bytes == 2 * 128 * 40 * 2 + 4 * 32 * 40 * 2  # dQ: Q and dO, two stages of 32 keys of K, V
    lean = dataclasses.replace(tiling.dkdv_tiles(64), split=True, operands_in_regs=False, mask_unroll=1)
    smallest = tiling.leaner(lean, "dkdv", 64)
    # K and V (128 keys), two stages of Q and dO (64 rows), their row statistics: rows of 64 + 8 padding elements
    assert smallest.block_m == 64 and smallest.smem_bytes == 2 * 128 * 72 * 2 + 4 * 64 * 72 * 2 + 4 * 64 * 4
    last = tiling.leaner(smallest, "dkdv", 64)
    assert last.block_m == 32 and last.smem_bytes == 2 * 128 * 72 * 2 + 4 * 32 * 72 * 2 + 4 * 32 * 4
    assert tiling.leaner(last, "dkdv", 64) is None
    wg_dkdv = dataclasses.replace(tiling.wgmma_backward_tiles(128)[0], mask_unroll=1)  # sm_90a: 64 then 32 rows
    assert wg_dkdv.block_m == 64 and tiling.leaner(wg_dkdv, "dkdv", 128).block_m == 32
    assert tiling.leaner(wg_dkdv, "dkdv", 128).smem_bytes == tiling.wgmma_dkdv_smem(128, 32, 128, wg_dkdv.stages)


def test_backward_rendering_follows_the_plan():
    p = plan(ag.documents() & ag.causal(), d=64, arch="sm_80")
    lean = dataclasses.replace(p, dkdv=tiling.leaner(p.dkdv, "dkdv", 64))
    assert render_backward(p).code != render_backward(lean).code  # the knob reaches the template
