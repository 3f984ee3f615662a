"""The backward kernels of every head dim, dtype and arch render and compile with NVRTC (no GPU needed): the three
ABI entries are present, and ptxas reports no spills and no stack frame, also with the patterns whose masks
load run-time tensors on partial tiles (they need the most registers)."""

from concurrent.futures import ThreadPoolExecutor
from os import cpu_count

import pytest
import torch

import attngen.pattern as P
from attngen.kernel import build_backward
from attngen.plan import DTYPES, HEAD_DIMS, make_plan
from attngen.render import BACKWARD_ENTRIES, render_backward

ARCHS = ("sm_80", "sm_90")
PATTERNS = {
    "dense": P.full(),
    "causal_window": P.causal() & P.sliding_window(1024),
    "documents_padding": P.documents() & P.key_padding(),
    "block_layout": P.block_layout(torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3, 128),
    # Long affine masks: fully unrolled they spilled; the fallback steps their kernels down to a leaner tiling.
    "dilated_window": P.predicate(" | ".join(f"(k == q - {4 * i})" for i in range(17))),
    "cross_attention": P.predicate("k <= q + Sk - Sq"),
}
# The head dims that must be fast get every pattern; the others the one with run-time masks (its full tiles run
# the dense code path). Every case in both dtypes for both archs.
CASES = [
    (name, d, dtype, arch)
    for d in HEAD_DIMS
    for name in (PATTERNS if d in (64, 128) else ("documents_padding",))
    for dtype in DTYPES
    for arch in ARCHS
]


@pytest.fixture(scope="module")
def binaries():
    """Every case compiled once, in parallel (NVRTC releases the GIL)."""

    def build(case):
        name, d, dtype, arch = case
        return build_backward(make_plan(PATTERNS[name], head_dim=d, dtype=dtype, arch=arch))[2]

    with ThreadPoolExecutor(max(1, cpu_count() or 1)) as pool:
        return dict(zip(CASES, pool.map(build, CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_compiles_without_spills(binaries, case):
    binary = binaries[case]
    assert binary.entries == BACKWARD_ENTRIES
    for entry, res in binary.resources:
        assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{entry}: {res}"
        assert 0 < res.registers <= 255
    assert binary.performance_notes == ()  # e.g. no wgmma serialised by ptxas


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_shared_memory_fits(d):
    """Dynamic shared memory as planned: within the 227 KB a block may have on sm_80 / sm_90."""
    plan = make_plan(P.full(), head_dim=d, dtype="bf16", arch="sm_90")
    for tiles in (plan.dkdv, plan.dq):
        assert 0 < tiles.smem_bytes <= 227 * 1024


def test_runtime_arguments_follow_the_fixed_prefix():
    """dK/dV and dQ take the plan's run-time arguments, in order, right after `tiles_cap` (docs/design.md)."""
    plan = make_plan(PATTERNS["documents_padding"], head_dim=64, dtype="fp16", arch="sm_90")
    code = " ".join(render_backward(plan).code.split())
    tail = ", ".join(f"{a.ctype} {a.name}" for a in plan.runtime_args)
    assert [a.name for a in plan.runtime_args] == ["qdoc", "qdoc_sb", "kdoc", "kdoc_sb", "key_len"]
    assert code.count(f"int tiles_cap, {tail}) {{") == 2
    assert "int Hq, int Sq, int Sq_pad) {" in code  # the preprocess kernel takes no run-time arguments
